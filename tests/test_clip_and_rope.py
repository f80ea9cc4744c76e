"""The CLIP tower alone against `CLIPVisionModel`, and RoPE tables against transformers'."""

import json

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers import CLIPConfig, CLIPModel, CLIPVisionModel
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

from converters import hf_config, load_clip_vision
from emola_jax.config import TextConfig, VisionConfig
from emola_jax.models.rope import rope_cos_sin

VISION = {**hf_config.clip_to_hf(VisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                              num_attention_heads=4, image_size=42, patch_size=14)),
          "initializer_factor": 5.0}


def _hidden_states(model, pixels):
    with torch.no_grad():
        out = model(pixel_values=torch.tensor(pixels).permute(0, 3, 1, 2), output_hidden_states=True)
    return [h.numpy() for h in out.hidden_states]


@pytest.mark.parametrize("kind", ["clip_model", "vision_model"])
def test_clip_tower_matches_every_hidden_state(tmp_path, kind):
    torch.manual_seed(0)
    if kind == "clip_model":  # openai/clip-vit-large-patch14-336 layout: vision_model.* beside text_model.*
        full = CLIPModel(CLIPConfig(vision_config=VISION, text_config=dict(
            hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2))).eval()
        full.save_pretrained(tmp_path)
        reference = full.vision_model
    else:
        reference = CLIPVisionModel(hf_config.to_transformers(VISION)).eval()
        reference.save_pretrained(tmp_path)
    pixels = np.random.default_rng(0).standard_normal((2, 42, 42, 3)).astype(np.float32)
    expected = _hidden_states(reference, pixels)
    model, vision = load_clip_vision(tmp_path)
    assert vision.num_hidden_layers == 3 and vision.num_patches == 9
    for layers, hidden in enumerate(expected):  # hidden states reach |44|: float32 sums in another order differ
        np.testing.assert_allclose(np.asarray(model(pixels, layers)), hidden, atol=1e-4, rtol=1e-5)  # by ~1e-5 of that


def test_clip_rejects_wrong_image_size(tmp_path):
    CLIPVisionModel(hf_config.to_transformers(VISION)).save_pretrained(tmp_path)
    model, _ = load_clip_vision(tmp_path)
    with pytest.raises(ValueError, match="expects 42x42"):
        model(np.zeros((1, 28, 28, 3), np.float32))


ROPES = {
    "default": dict(rope_type="default", rope_theta=10000.0),
    "linear": dict(rope_type="linear", factor=4.0, rope_theta=10000.0),
    "llama3": dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                   original_max_position_embeddings=64, rope_theta=500000.0),
    "dynamic": dict(rope_type="dynamic", factor=2.0, rope_theta=10000.0),
}


@pytest.mark.parametrize("name", list(ROPES))
@pytest.mark.parametrize("length", [16, 200])
def test_rope_tables_match_transformers(name, length):
    text = TextConfig(hidden_size=128, num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64)
    hf = hf_config.to_transformers({**hf_config.llama_to_hf(text), "rope_parameters": ROPES[name]})
    config = hf_config.llama_from_hf(json.loads(hf.to_json_string()))
    assert config.rope_scaling.rope_type == name
    positions = np.arange(length)[None]
    x = torch.zeros(1, length, 128)
    with torch.no_grad():
        cos, sin = LlamaRotaryEmbedding(hf)(x, torch.tensor(positions))
    ours_cos, ours_sin = rope_cos_sin(config, jnp.asarray(positions), jnp.float32)
    np.testing.assert_allclose(np.asarray(ours_cos), cos.numpy(), atol=2e-5)
    np.testing.assert_allclose(np.asarray(ours_sin), sin.numpy(), atol=2e-5)
