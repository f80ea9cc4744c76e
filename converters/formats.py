"""Recognise a PyTorch checkpoint directory and read its architecture into an `EmolaConfig`.

The config files themselves are translated by `converters.hf_config`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from converters import hf_config
from emola_jax.config import EmolaConfig, LoRAConfig, VisionConfig
from emola_jax.lora import from_peft_config

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


def local_directory(src: str | Path, what: str = "the source") -> Path:
    """`src` as a local directory: a folder that exists, or else a Hugging Face hub id (`owner/name`)
    found in the local Hugging Face cache (`HF_HUB_CACHE`, default `HF_HOME/hub`), offline, by
    huggingface_hub's own lookup, as transformers' `from_pretrained(..., local_files_only=True)`
    finds a model: the snapshot `refs/main` points to.

    Raises FileNotFoundError, in one sentence naming the cache and how to fill it, when `src` is
    neither."""
    path = Path(src)
    if path.is_dir():
        return path
    if path.exists():
        raise NotADirectoryError(f"{what} {src} is a file, not a checkpoint directory")
    # deferred: import time (huggingface_hub's http stack), for the sources that are not folders
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    try:
        return Path(snapshot_download(str(src), local_files_only=True))
    except HFValidationError:  # not shaped like a hub id: a folder that is not there
        raise FileNotFoundError(f"{what} {src} is not a directory") from None
    except LocalEntryNotFoundError:
        raise FileNotFoundError(
            f"{what} {src} is neither a directory nor a model in the Hugging Face cache ({constants.HF_HUB_CACHE}); "
            f"download it with `hf download {src}` (or set HF_HOME to the cache that holds it)") from None


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


def llava_hf_config(src: Path, dtype: str) -> EmolaConfig:
    """The `EmolaConfig` of a llava-hf directory (its `config.json`)."""
    return hf_config.llava_from_hf(read_json(src / "config.json"), dtype, where=str(src / "config.json"))


def llava_original_config(config_file: Path, vision: VisionConfig, dtype: str) -> EmolaConfig:
    """LLaVA's own config: LlamaConfig fields plus `mm_*` fields; the vision tower comes separately."""
    return hf_config.run_from_hf(read_json(config_file), vision, dtype, where=str(config_file))


def lora_config_from_peft(adapter_config: Path, num_layers: int) -> LoRAConfig:
    """The LoRA of an official EmoLA run's PEFT adapter, resolved by PEFT's rules over the module
    names of LLaVA's `LlavaLlamaForCausalLM` as PEFT saw them (the vision tower is loaded later)."""
    others = ["lm_head", "model.embed_tokens", "model.norm", *(f"model.{projector}.{i}" for projector in
              ("mm_projector", "landmark_feature_projector") for i in (0, 2))]
    others += [f"model.layers.{i}.{block}" for i in range(num_layers) for block in ("self_attn", "mlp")]
    return from_peft_config(read_json(adapter_config), module_name="model.layers.{i}.{linear}", num_layers=num_layers,
                            other_modules=others, where=str(adapter_config))


def tokenizer_files(*directories: Path | None) -> list[Path]:
    """Tokenizer and processor files of the first directory that holds a tokenizer."""
    for directory in directories:
        if directory is None or not any((directory / n).is_file() for n in ("tokenizer.json", "tokenizer.model")):
            continue
        return [directory / name for name in TOKENIZER_FILES if (directory / name).is_file()]
    return []
