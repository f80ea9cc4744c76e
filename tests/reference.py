"""Tiny PyTorch reference models, built and saved by the tests themselves (no download)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file
from transformers import LlavaConfig, LlavaForConditionalGeneration

from converters import hf_config
from emola_jax.config import EmolaConfig, TextConfig, VisionConfig

IMAGE_TOKEN = 99
TINY = EmolaConfig(
    vision=VisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                        image_size=28, patch_size=14),
    text=TextConfig(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, vocab_size=100, max_position_embeddings=256, rms_norm_eps=1e-6),
    image_token_id=IMAGE_TOKEN, vision_feature_layer=-2, prior_position="off",
)
# initialisation only (no field of ours): large weights, logits of order 1-5, so that a small
# mistake shows above the tolerance
VISION_INIT = dict(projection_dim=16, initializer_factor=5.0)
TEXT_INIT = dict(initializer_range=0.2)


def llava_config(*, text: dict | None = None, vision: dict | None = None, **top) -> LlavaConfig:
    """The tiny LLaVA with some fields changed, given in transformers' names (`text`, `vision`: of
    the sub-configs), as transformers reads them; every field is one our config represents."""
    changed = hf_config.llava_to_hf(TINY)
    changed["text_config"].update(text or {})
    changed["vision_config"].update(vision or {})
    changed.update(top)
    data = hf_config.llava_to_hf(hf_config.llava_from_hf(changed))
    data["text_config"].update(TEXT_INIT)
    data["vision_config"].update(VISION_INIT)
    return hf_config.to_transformers(data)


def build_llava(config: LlavaConfig, seed: int = 0) -> LlavaForConditionalGeneration:
    """Random weights, with norms and biases perturbed so that no weight is a trivial 0 or 1."""
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                param.add_(0.1 * torch.randn_like(param))
    return model


def image_seq_length(config: LlavaConfig) -> int:
    v = config.vision_config
    return (v.image_size // v.patch_size) ** 2 + (config.vision_feature_select_strategy == "full")


def inputs(config: LlavaConfig, *, batch: int = 2, prefix: int = 3, suffix: int = 5, pad: list[int] | None = None,
           side: str = "left", image_tokens: int | None = None, seed: int = 0):
    """input_ids with the image placeholders expanded, pixel values (NHWC), attention mask."""
    rng = np.random.default_rng(seed)
    n_img = image_tokens if image_tokens is not None else image_seq_length(config)
    pad = pad or [0] * batch
    seq = prefix + n_img + suffix + max(pad)
    ids = np.zeros((batch, seq), np.int64)
    mask = np.zeros((batch, seq), np.int64)
    for b in range(batch):
        row = np.concatenate([
            rng.integers(3, IMAGE_TOKEN, prefix), np.full(n_img, config.image_token_index),
            rng.integers(3, IMAGE_TOKEN, suffix + max(pad) - pad[b]),
        ])
        start = pad[b] if side == "left" else 0
        ids[b, start:start + len(row)] = row
        mask[b, start:start + len(row)] = 1
    v = config.vision_config
    pixels = rng.standard_normal((batch, v.image_size, v.image_size, 3)).astype(np.float32)
    return ids, pixels, mask


def position_ids(mask: np.ndarray) -> np.ndarray:
    return np.maximum(np.cumsum(mask, -1) - 1, 0)


def hf_logits(model, ids, pixels, mask=None, **extra) -> np.ndarray:
    with torch.no_grad():
        kwargs = dict(input_ids=torch.tensor(ids), pixel_values=torch.tensor(pixels).permute(0, 3, 1, 2))
        if mask is not None:
            kwargs["attention_mask"] = torch.tensor(mask)
            kwargs["position_ids"] = torch.tensor(position_ids(mask))
        kwargs.update(extra)
        return model(**kwargs).logits.float().numpy()


def save_state(state: dict[str, torch.Tensor], directory: Path, *, shards: int = 1, fmt: str = "safetensors",
               config: dict | None = None) -> Path:
    """Writes tensors as a transformers-style directory: one file, or shards with an index."""
    directory.mkdir(parents=True, exist_ok=True)
    keys = sorted(state)
    groups = [keys[i::shards] for i in range(shards)]
    ext, stem = ("safetensors", "model") if fmt == "safetensors" else ("bin", "pytorch_model")
    weight_map = {}
    for i, group in enumerate(groups):
        name = f"{stem}.{ext}" if shards == 1 else f"{stem}-{i + 1:05d}-of-{shards:05d}.{ext}"
        tensors = {k: state[k].contiguous().clone() for k in group}
        if fmt == "safetensors":
            save_file(tensors, str(directory / name), metadata={"format": "pt"})
        else:
            torch.save(tensors, directory / name)
        weight_map.update(dict.fromkeys(group, name))
    if shards > 1:
        (directory / f"{stem}.{ext}.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    if config is not None:
        (directory / "config.json").write_text(json.dumps(config))
    return directory


def rename(state: dict[str, torch.Tensor], prefixes: list[tuple[str, str]]) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in state.items():
        for old, new in prefixes:
            if key.startswith(old):
                key = new + key[len(old):]
                break
        out[key] = value
    return out
