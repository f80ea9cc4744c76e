"""`python run.py demo`: the whole import path on a tiny model, no download, under a minute.

A tiny `LlavaForConditionalGeneration` with random weights is written the way transformers saves
it, converted into an emola-jax checkpoint, loaded, and checked logit-for-logit against PyTorch;
then a tiny EmoLA (configs/tiny.py) runs a jitted forward pass with its facial prior token.
"""

from __future__ import annotations

import time
from pathlib import Path

import jax
import numpy as np
from flax import nnx

from emola_jax.checkpoint import load_pretrained
from emola_jax.config import EmolaConfig
from emola_jax.models import EmolaForConditionalGeneration


def _tiny_llava_hf(directory: Path, seed: int):
    import torch
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    config = LlavaConfig(
        vision_config=CLIPVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                                       num_attention_heads=4, image_size=56, patch_size=14),
        text_config=LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                                num_key_value_heads=2, vocab_size=512, initializer_range=0.1),
        image_token_index=511,
    )
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config).eval()
    model.save_pretrained(directory)
    return model


def run(workdir: str | Path, model_config: EmolaConfig, seed: int = 0) -> dict:
    import torch

    from converters import convert

    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    summary = {}

    start = time.perf_counter()
    reference = _tiny_llava_hf(workdir / "llava-hf", seed)
    checkpoint = convert(workdir / "llava-hf", workdir / "checkpoint", overwrite=True, progress=False)
    model, config = load_pretrained(checkpoint)
    rng = np.random.default_rng(seed)
    ids = np.concatenate([[1, 7, 9], np.full(config.image_seq_length, config.image_token_id), rng.integers(3, 500, 8)])
    ids = ids[None].astype(np.int32)
    pixels = rng.standard_normal((1, 56, 56, 3)).astype(np.float32)
    ours = np.asarray(nnx.jit(lambda m, i, p: m(i, p))(model, ids, pixels))
    with torch.no_grad():
        theirs = reference(input_ids=torch.tensor(ids, dtype=torch.long),
                           pixel_values=torch.tensor(pixels).permute(0, 3, 1, 2)).logits.numpy()
    summary["converted_checkpoint"] = str(checkpoint)
    summary["max_abs_logit_diff_vs_transformers"] = float(np.abs(ours - theirs).max())
    summary["import_and_check_seconds"] = round(time.perf_counter() - start, 2)

    emola = EmolaForConditionalGeneration(model_config, rngs=nnx.Rngs(seed))
    n_image = model_config.image_seq_length
    ids = np.concatenate([[1, 5], np.full(n_image, model_config.image_token_id), [6, 7, 8]])[None].astype(np.int32)
    size = model_config.vision.image_size
    pixels = rng.standard_normal((1, size, size, 3)).astype(np.float32)
    landmarks = rng.random((1, model_config.prior_dim)).astype(np.float32)
    forward = nnx.jit(lambda m, i, p, lm: m(i, p, landmarks=lm))
    logits = forward(emola, ids, pixels, landmarks)
    summary["emola_logits_shape"] = tuple(logits.shape)
    summary["emola_image_side_tokens"] = (
        f"{model_config.num_visual_tokens} visual + prior token {model_config.prior_position}"
    )
    summary["lora_parameters"] = int(sum(x.size for x in jax.tree.leaves(nnx.state(emola, nnx.LoRAParam))))
    return summary
