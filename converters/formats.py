"""Recognise a PyTorch checkpoint directory and read its architecture into an `EmolaConfig`.

Hugging Face config files are parsed with transformers' own config classes, so missing fields
take exactly the defaults transformers would give them (llava-hf configs leave many out).
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from typing import Any

from emola_jax.config import EmolaConfig, LoRAConfig, RopeScaling, TextConfig, VisionConfig

LLAVA_ORIGINAL_IMAGE_TOKEN_ID = -200  # LLaVA's IMAGE_TOKEN_INDEX: a placeholder outside the vocabulary
DECODER_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
    "added_tokens.json", "chat_template.json", "chat_template.jinja", "processor_config.json",
    "preprocessor_config.json", "generation_config.json",
)


def read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} is missing") from None
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from err


def detect(src: Path) -> str:
    """'llava-hf', 'llava' (original LLaVA-1.5 layout) or 'emola' (an official EmoLA run)."""
    if not src.is_dir():
        raise FileNotFoundError(f"{src} is not a directory")
    if (src / "adapter_config.json").is_file() and (src / "non_lora_trainables.bin").is_file():
        return "emola"
    config = read_json(src / "config.json")
    if config.get("model_type") == "llava":
        return "llava-hf"
    if "mm_projector_type" in config or "mm_vision_tower" in config:
        return "llava"
    raise ValueError(
        f"cannot tell the format of {src}: its config.json is neither a llava-hf LlavaConfig "
        "(model_type 'llava') nor an original LLaVA config (mm_projector_type), and it is not an "
        "EmoLA run directory (adapter_config.json + non_lora_trainables.bin)"
    )


def text_config_from_hf(data: dict[str, Any]) -> TextConfig:
    from transformers.models.llama.configuration_llama import LlamaConfig

    data = {k: v for k, v in data.items() if k not in ("model_type", "architectures")}
    hf = LlamaConfig(**data)
    rope = dict(getattr(hf, "rope_parameters", None) or {})
    rope_theta = rope.pop("rope_theta", getattr(hf, "rope_theta", 10000.0))
    allowed = {f.name for f in dataclasses.fields(RopeScaling)}
    scaling = RopeScaling(**{k: v for k, v in rope.items() if k in allowed and v is not None})
    return TextConfig(
        **{name: getattr(hf, name) for name in LLAMA_FIELDS},
        num_key_value_heads=hf.num_key_value_heads or hf.num_attention_heads,
        head_dim=getattr(hf, "head_dim", None),
        rope_theta=float(rope_theta),
        rope_scaling=scaling,
        tie_word_embeddings=bool(hf.tie_word_embeddings),
        attention_bias=bool(hf.attention_bias),
        mlp_bias=bool(getattr(hf, "mlp_bias", False)),
    )


def vision_config_from_hf(data: dict[str, Any]) -> VisionConfig:
    from transformers.models.clip.configuration_clip import CLIPVisionConfig

    if "vision_config" in data:  # a full CLIPConfig (openai/clip-vit-large-patch14-336)
        data = data["vision_config"]
    hf = CLIPVisionConfig(**{k: v for k, v in data.items() if k != "model_type"})
    return VisionConfig(**{name: getattr(hf, name) for name in CLIP_VISION_FIELDS})


def _feature_layer(value: Any, where: Path) -> int:
    if not isinstance(value, int):
        raise ValueError(f"{where}: vision_feature_layer {value!r} is not supported (a single layer index only)")
    return value


def llava_hf_config(src: Path, dtype: str) -> EmolaConfig:
    from transformers.models.llava.configuration_llava import LlavaConfig

    data = read_json(src / "config.json")
    hf = LlavaConfig(**{k: v for k, v in data.items() if k != "model_type"})
    return EmolaConfig(
        vision=vision_config_from_hf(hf.vision_config.to_dict()),
        text=text_config_from_hf(hf.text_config.to_dict()),
        vision_feature_layer=_feature_layer(hf.vision_feature_layer, src / "config.json"),
        vision_feature_select_strategy=hf.vision_feature_select_strategy,
        projector_hidden_act=hf.projector_hidden_act,
        projector_bias=bool(getattr(hf, "multimodal_projector_bias", True)),
        image_token_id=int(getattr(hf, "image_token_id", None) or hf.image_token_index),
        prior_position="off",
        dtype=dtype,
    )


SELECT_FEATURE = {"patch": "default", "cls_patch": "full"}
# fields that keep their name and value between our configs and transformers' (import and export)
LLAMA_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "max_position_embeddings", "rms_norm_eps", "hidden_act")
CLIP_VISION_FIELDS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "image_size",
                      "patch_size", "num_channels", "layer_norm_eps", "hidden_act")


def llava_original_config(config_file: Path, vision: VisionConfig, dtype: str) -> EmolaConfig:
    """LLaVA's own config: LlamaConfig fields plus `mm_*` fields; the vision tower comes separately."""
    data = read_json(config_file)
    if data.get("mm_projector_type", "linear") != "mlp2x_gelu":
        raise ValueError(
            f"{config_file}: mm_projector_type {data.get('mm_projector_type')!r} is not supported "
            "(LLaVA-1.5 and EmoLA use mlp2x_gelu)"
        )
    select = data.get("mm_vision_select_feature", "patch")
    if select not in SELECT_FEATURE:
        raise ValueError(f"{config_file}: mm_vision_select_feature {select!r} is not supported")
    tower = str(data.get("mm_vision_tower", ""))
    size = re.search(r"-(\d+)$", tower)
    if size and int(size.group(1)) != vision.image_size:
        raise ValueError(
            f"{config_file} was trained with vision tower {tower} ({size.group(1)} px) but the CLIP directory "
            f"given is a {vision.image_size} px model"
        )
    text = {k: v for k, v in data.items() if not k.startswith("mm_")}
    return EmolaConfig(
        vision=vision,
        text=text_config_from_hf(text),
        vision_feature_layer=_feature_layer(data.get("mm_vision_select_layer", -2), config_file),
        vision_feature_select_strategy=SELECT_FEATURE[select],
        image_token_id=LLAVA_ORIGINAL_IMAGE_TOKEN_ID,
        prior_position="off",
        dtype=dtype,
    )


def lora_config_from_peft(adapter_config: Path) -> LoRAConfig:
    data = read_json(adapter_config)
    if data.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"{adapter_config}: peft_type {data.get('peft_type')!r} is not LoRA")
    for field in ("rank_pattern", "alpha_pattern"):
        if data.get(field):
            raise ValueError(f"{adapter_config}: per-module {field} is not supported")
    if data.get("bias", "none") != "none":
        raise ValueError(f"{adapter_config}: LoRA bias {data['bias']!r} is not supported (none only)")
    if data.get("use_dora"):
        raise ValueError(f"{adapter_config}: DoRA adapters are not supported")
    targets = data.get("target_modules") or []
    if isinstance(targets, str):
        targets = [name for name in DECODER_LINEARS if re.search(targets, f"model.layers.0.x.{name}")]
    unknown = sorted(set(targets) - set(DECODER_LINEARS))
    if unknown:
        raise ValueError(
            f"{adapter_config}: LoRA target modules {unknown} are outside the decoder's linear layers "
            f"{list(DECODER_LINEARS)}; only decoder adapters are supported"
        )
    return LoRAConfig(
        rank=int(data["r"]),
        alpha=float(data["lora_alpha"]),
        targets=tuple(name for name in DECODER_LINEARS if name in targets),
        use_rslora=bool(data.get("use_rslora", False)),
    )


def tokenizer_files(*directories: Path | None) -> list[Path]:
    """Tokenizer and processor files of the first directory that holds a tokenizer."""
    for directory in directories:
        if directory is None or not any((directory / n).is_file() for n in ("tokenizer.json", "tokenizer.model")):
            continue
        return [directory / name for name in TOKENIZER_FILES if (directory / name).is_file()]
    return []
