"""Hugging Face config files <-> emola-jax configs, each translation as a `*_to_hf` / `*_from_hf` pair.

    llama   TextConfig    <-> transformers `LlamaConfig` (a llava-hf `text_config`)
    clip    VisionConfig  <-> transformers `CLIPVisionConfig` (or a whole `CLIPConfig` when reading)
    llava   EmolaConfig   <-> transformers `LlavaConfig` (llava-hf/llava-1.5-7b-hf's `config.json`)
    run     EmolaConfig   <-> the `config.json` of an original LLaVA-1.5 / EmoLA run: LlamaConfig
                              fields plus LLaVA's `mm_*` fields (`LlavaLlamaForCausalLM`)

`*_to_hf` return plain JSON dicts; `to_transformers` turns a `llama`, `clip` or `llava` dict into
transformers' own config object. `*_from_hf` read through transformers' config classes, so a field
a file leaves out takes exactly the default transformers gives it (llava-hf configs leave many out).
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

from emola_jax.config import EmolaConfig, PriorToken, RopeScaling, TextConfig, VisionConfig, convert

# fields that keep their name and value between our configs and transformers'
LLAMA_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "max_position_embeddings", "rms_norm_eps", "hidden_act")
CLIP_VISION_FIELDS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "image_size",
                      "patch_size", "num_channels", "layer_norm_eps", "hidden_act")
# LLaVA's `mm_vision_select_feature` -> transformers' `vision_feature_select_strategy`
SELECT_FEATURE = {"patch": "default", "cls_patch": "full"}
LLAVA_ORIGINAL_IMAGE_TOKEN_ID = -200  # LLaVA's IMAGE_TOKEN_INDEX: a placeholder outside the vocabulary


def to_transformers(data: dict[str, Any]):
    """transformers' config object for a `llama`, `clip` or `llava` dict; its `model_type` picks the class."""
    # deferred: start-up time (transformers)
    from transformers import AutoConfig

    data = dict(data)
    return AutoConfig.for_model(data.pop("model_type"), **data)


# ---------------------------------------------------------------------------------------------
# LLaMA


def _rope_parameters(text: TextConfig) -> dict[str, Any]:
    """transformers 5's `rope_parameters` (rope_type, rope_theta and the type's own fields)."""
    scaling = text.rope_scaling
    out: dict[str, Any] = {"rope_type": scaling.rope_type, "rope_theta": text.rope_theta}
    if scaling.rope_type != "default":
        out.update({k: v for k, v in dataclasses.asdict(scaling).items() if v is not None and k != "rope_type"})
    return out


def _llama_fields(text: TextConfig, head_dim: int | None) -> dict[str, Any]:
    return {
        **{name: getattr(text, name) for name in LLAMA_FIELDS},
        "num_key_value_heads": text.num_key_value_heads,
        **({} if head_dim is None else {"head_dim": head_dim}),
        "tie_word_embeddings": text.tie_word_embeddings,
        "attention_bias": text.attention_bias,
        "mlp_bias": text.mlp_bias,
    }


def llama_to_hf(text: TextConfig) -> dict[str, Any]:
    """`LlamaConfig` fields; `head_dim` only when set (transformers derives the same default from
    hidden_size / num_attention_heads)."""
    return {"model_type": "llama", **_llama_fields(text, text.head_dim), "rope_parameters": _rope_parameters(text)}


def llama_from_hf(data: dict[str, Any]) -> TextConfig:
    """A `LlamaConfig` dict (transformers 4's `rope_theta`/`rope_scaling` or 5's `rope_parameters`)."""
    # deferred: start-up time (transformers)
    from transformers.models.llama.configuration_llama import LlamaConfig

    hf = LlamaConfig(**{k: v for k, v in data.items() if k not in ("model_type", "architectures")})
    rope = dict(getattr(hf, "rope_parameters", None) or {})
    rope_theta = rope.pop("rope_theta", getattr(hf, "rope_theta", 10000.0))
    allowed = {f.name for f in dataclasses.fields(RopeScaling)}
    return TextConfig(
        **{name: getattr(hf, name) for name in LLAMA_FIELDS},
        num_key_value_heads=hf.num_key_value_heads or hf.num_attention_heads,
        head_dim=getattr(hf, "head_dim", None),
        rope_theta=float(rope_theta),
        rope_scaling=RopeScaling(**{k: v for k, v in rope.items() if k in allowed and v is not None}),
        tie_word_embeddings=bool(hf.tie_word_embeddings),
        attention_bias=bool(hf.attention_bias),
        mlp_bias=bool(getattr(hf, "mlp_bias", False)),
    )


# ---------------------------------------------------------------------------------------------
# CLIP


def clip_to_hf(vision: VisionConfig) -> dict[str, Any]:
    return {"model_type": "clip_vision_model", **{name: getattr(vision, name) for name in CLIP_VISION_FIELDS}}


def clip_from_hf(data: dict[str, Any]) -> VisionConfig:
    """A `CLIPVisionConfig` dict, or a whole `CLIPConfig` (openai/clip-vit-large-patch14-336) whose
    `vision_config` is read."""
    # deferred: start-up time (transformers)
    from transformers.models.clip.configuration_clip import CLIPVisionConfig

    if "vision_config" in data:
        data = data["vision_config"]
    hf = CLIPVisionConfig(**{k: v for k, v in data.items() if k != "model_type"})
    return VisionConfig(**{name: getattr(hf, name) for name in CLIP_VISION_FIELDS})


# ---------------------------------------------------------------------------------------------
# llava-hf


def _feature_layer(value: Any, where: str) -> int:
    if not isinstance(value, int):
        raise ValueError(f"{where}: vision_feature_layer {value!r} is not supported (a single layer index only)")
    return value


def llava_to_hf(config: EmolaConfig, dtype: str | None = None) -> dict[str, Any]:
    """llava-hf's `LlavaConfig` for `LlavaForConditionalGeneration`, which has no prior token:
    `image_seq_length` counts the visual tokens only."""
    return {
        "model_type": "llava",
        "architectures": ["LlavaForConditionalGeneration"],
        "vision_config": clip_to_hf(config.vision),
        "text_config": llama_to_hf(config.text),
        "image_token_index": config.image_token_id,
        "image_seq_length": config.num_visual_tokens,
        "vision_feature_layer": config.vision_feature_layer,
        "vision_feature_select_strategy": config.vision_feature_select_strategy,
        "projector_hidden_act": config.projector_hidden_act,
        "multimodal_projector_bias": config.projector_bias,
        "tie_word_embeddings": config.text.tie_word_embeddings,
        **({} if dtype is None else {"dtype": dtype}),
    }


def llava_from_hf(data: dict[str, Any], dtype: str = "float32", *, where: str = "config.json") -> EmolaConfig:
    """A llava-hf `config.json`: plain LLaVA-1.5 (no prior token, no LoRA)."""
    # deferred: start-up time (transformers)
    from transformers.models.llava.configuration_llava import LlavaConfig

    hf = LlavaConfig(**{k: v for k, v in data.items() if k != "model_type"})
    return EmolaConfig(
        vision=clip_from_hf(hf.vision_config.to_dict()),
        text=llama_from_hf(hf.text_config.to_dict()),
        vision_feature_layer=_feature_layer(hf.vision_feature_layer, where),
        vision_feature_select_strategy=hf.vision_feature_select_strategy,
        projector_hidden_act=hf.projector_hidden_act,
        projector_bias=bool(getattr(hf, "multimodal_projector_bias", True)),
        image_token_id=int(getattr(hf, "image_token_id", None) or hf.image_token_index),
        prior_position="off",
        dtype=dtype,
    )


# ---------------------------------------------------------------------------------------------
# original LLaVA-1.5 / EmoLA run


def _clip_name(vision: VisionConfig) -> str:
    """LLaVA's `mm_vision_tower`: the OpenAI CLIP name for ViT-L/14, else a name ending in the image size
    (what `run_from_hf` checks against the CLIP directory given)."""
    if (vision.hidden_size, vision.num_hidden_layers, vision.patch_size) == (1024, 24, 14):
        return "openai/clip-vit-large-patch14" + ("" if vision.image_size == 224 else f"-{vision.image_size}")
    return f"clip-vit-patch{vision.patch_size}-{vision.image_size}"


def run_to_hf(config: EmolaConfig, dtype: str, *, pad_to_square: bool | None = None) -> dict[str, Any]:
    """A run's `config.json` as the official code (transformers 4.31) reads it: LlamaConfig fields and
    LLaVA's `mm_*` fields; an EmoLA model (a prior token) adds its landmark projector's input size.

    `pad_to_square` (how the model's training images were preprocessed; None: unknown) becomes LLaVA's
    `image_aspect_ratio`, which its inference reads from this file to decide whether to pad images.
    """
    text = config.text
    scaling = text.rope_scaling
    rope_scaling = None
    if scaling.rope_type != "default":  # transformers 4.x spelling; 5.x reads it too
        rope_scaling = {"type": scaling.rope_type, "factor": scaling.factor}
        rope_scaling.update({k: v for k, v in dataclasses.asdict(scaling).items()
                             if v is not None and k not in ("rope_type", "factor")})
    emola = config.prior_position != "off"
    out = {
        "architectures": ["EmoLlavaLlamaForCausalLM" if emola else "LlavaLlamaForCausalLM"],
        "model_type": "emollava" if emola else "llava_llama",
        **_llama_fields(text, text.resolved_head_dim),
        "rope_theta": text.rope_theta,
        "rope_scaling": rope_scaling,
        "pretraining_tp": 1,
        "use_cache": True,
        "torch_dtype": dtype,
        "mm_vision_tower": _clip_name(config.vision),
        "mm_hidden_size": config.vision.hidden_size,
        "mm_projector_type": "mlp2x_gelu",
        "mm_vision_select_layer": config.vision_feature_layer,
        "mm_vision_select_feature": {v: k for k, v in SELECT_FEATURE.items()}[config.vision_feature_select_strategy],
        "mm_use_im_start_end": False,
        "mm_use_im_patch_token": False,
        "use_mm_proj": True,
    }
    if emola:  # the official code builds its landmark projector from this size: the 2d106det prior's
        official = [p for p in config.priors if p.official]
        out["landmark_feature_hidden_size"] = (official or config.priors)[0].dim
        out["face_priors"] = priors_to_hf(config)
    return {**out, **pad_to_hf(pad_to_square)}


def priors_to_hf(config: EmolaConfig) -> list[dict[str, Any]]:
    """`face_priors` of an exported run's `config.json`: the prior tokens in order, `{"name", "dim"}` each."""
    return [dataclasses.asdict(p) for p in config.priors]


def priors_from_hf(data: dict[str, Any], where: str = "config.json") -> tuple[PriorToken, ...] | None:
    """The prior tokens a run's `config.json` lists (`face_priors`); None where it lists none
    (an official run: one 2d106det prior, its width read from the projector's weights)."""
    if "face_priors" not in data:
        return None
    try:
        return convert(data["face_priors"], tuple[PriorToken, ...], "face_priors")
    except ValueError as err:
        raise ValueError(f"{where}: {err}") from err


def run_from_hf(data: dict[str, Any], vision: VisionConfig, dtype: str = "float32", *,
                where: str = "config.json") -> EmolaConfig:
    """A run's `config.json` (LlamaConfig + `mm_*` fields), for the CLIP tower `vision` that comes
    separately. The prior token and LoRA are not in this file (the run's other files say them)."""
    if data.get("mm_projector_type", "linear") != "mlp2x_gelu":
        raise ValueError(
            f"{where}: mm_projector_type {data.get('mm_projector_type')!r} is not supported "
            "(LLaVA-1.5 and EmoLA use mlp2x_gelu)"
        )
    select = data.get("mm_vision_select_feature", "patch")
    if select not in SELECT_FEATURE:
        raise ValueError(f"{where}: mm_vision_select_feature {select!r} is not supported")
    tower = str(data.get("mm_vision_tower", ""))
    size = re.search(r"-(\d+)$", tower)
    if size and int(size.group(1)) != vision.image_size:
        raise ValueError(
            f"{where} was trained with vision tower {tower} ({size.group(1)} px) but the CLIP directory "
            f"given is a {vision.image_size} px model"
        )
    return EmolaConfig(
        vision=vision,
        text=llama_from_hf({k: v for k, v in data.items() if not k.startswith("mm_")}),
        vision_feature_layer=_feature_layer(data.get("mm_vision_select_layer", -2), where),
        vision_feature_select_strategy=SELECT_FEATURE[select],
        image_token_id=LLAVA_ORIGINAL_IMAGE_TOKEN_ID,
        prior_position="off",
        dtype=dtype,
    )


def pad_to_hf(pad_to_square: bool | None) -> dict[str, str]:
    """LLaVA's `image_aspect_ratio` field: "pad" for images padded to a square with the CLIP mean
    colour (`clip_preprocess(pad=True)`), else "square", the default of LLaVA's training
    `DataArguments` (resize and centre crop); LLaVA's `process_images` (llava/mm_utils.py) pads
    only for "pad". Nothing when unknown."""
    return {} if pad_to_square is None else {"image_aspect_ratio": "pad" if pad_to_square else "square"}


def pad_from_hf(data: dict[str, Any]) -> bool | None:
    """Whether a run's `config.json` says its images are padded to a square (None: it does not say)."""
    value = data.get("image_aspect_ratio")
    return None if value is None else value == "pad"
