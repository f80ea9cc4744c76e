"""Converted llava-hf models compute the same logits as transformers in PyTorch."""

import json

import numpy as np
import pytest

import emola_jax
from converters import convert
from tests import reference as ref

TOL = 1e-4

CONFIGS = {
    "gqa": {},
    "mha_last_layer": dict(text=dict(num_key_value_heads=4), vision_feature_layer=-1),
    "odd_sizes_layer3": dict(
        text=dict(hidden_size=40, num_attention_heads=5, num_key_value_heads=1, intermediate_size=72,
                  vocab_size=131),
        vision=dict(hidden_size=24, num_attention_heads=3, intermediate_size=40, image_size=42, num_hidden_layers=4),
        vision_feature_layer=-3,
    ),
    "full_select_first_layer": dict(vision_feature_select_strategy="full", vision_feature_layer=1),
    "tied_embeddings": dict(text=dict(tie_word_embeddings=True), tie_word_embeddings=True),
    "biases_head_dim": dict(text=dict(attention_bias=True, mlp_bias=True, head_dim=16),
                            multimodal_projector_bias=False),
    "rope_linear": dict(text=dict(rope_parameters=dict(rope_type="linear", factor=2.0, rope_theta=500.0))),
    "rope_llama3": dict(text=dict(rope_parameters=dict(
        rope_type="llama3", factor=8.0, rope_theta=500000.0, low_freq_factor=1.0, high_freq_factor=4.0,
        original_max_position_embeddings=8))),
    "rope_dynamic_past_max": dict(text=dict(
        max_position_embeddings=8, rope_parameters=dict(rope_type="dynamic", factor=2.0, rope_theta=10000.0))),
}


def _convert_hf(tmp_path, config, seed=0):
    model = ref.build_llava(config, seed)
    model.save_pretrained(tmp_path / "hf")
    out = convert(tmp_path / "hf", tmp_path / "jax", progress=False)
    jax_model, jax_config = emola_jax.load_pretrained(out)
    return model, jax_model, jax_config


@pytest.mark.parametrize("name", list(CONFIGS))
def test_logits_match_transformers(tmp_path, name):
    overrides = dict(CONFIGS[name])
    config = ref.llava_config(**overrides)
    hf, model, jax_config = _convert_hf(tmp_path, config)
    assert jax_config.image_seq_length == ref.image_seq_length(config)
    ids, pixels, _ = ref.inputs(config)
    expected = ref.hf_logits(hf, ids, pixels)
    got = np.asarray(model(ids, pixels))
    assert got.shape == expected.shape
    np.testing.assert_allclose(got, expected, atol=TOL, rtol=0)


@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_batch_matches_transformers(tmp_path, side):
    config = ref.llava_config()
    hf, model, _ = _convert_hf(tmp_path, config)
    ids, pixels, mask = ref.inputs(config, batch=3, pad=[0, 3, 5], side=side)
    expected = ref.hf_logits(hf, ids, pixels, mask)
    got = np.asarray(model(ids, pixels, attention_mask=mask))
    valid = mask.astype(bool)
    np.testing.assert_allclose(got[valid], expected[valid], atol=TOL, rtol=0)
    assert np.isfinite(got).all()


@pytest.mark.parametrize(
    "layout",
    [
        [("model.", "model.")],  # transformers 5 in-memory names: model.language_model.*, model.vision_tower.*
        [("model.language_model.", "language_model.model."), ("lm_head.", "language_model.lm_head."),
         ("model.vision_tower.", "vision_tower.vision_model."),
         ("model.multi_modal_projector.", "multi_modal_projector.")],
        [("model.vision_tower.", "model.vision_tower.vision_model.")],
    ],
    ids=["v5_names", "legacy_names", "v5_nested_vision_model"],
)
@pytest.mark.parametrize("shards,fmt", [(1, "safetensors"), (3, "safetensors"), (2, "bin")])
def test_key_layouts_and_file_formats(tmp_path, layout, shards, fmt):
    config = ref.llava_config()
    hf = ref.build_llava(config, seed=1)
    state = ref.rename(hf.state_dict(), layout)
    ref.save_state(state, tmp_path / "src", shards=shards, fmt=fmt, config=json.loads(config.to_json_string()))
    model, _ = emola_jax.load_pretrained(convert(tmp_path / "src", tmp_path / "jax", progress=False))
    ids, pixels, _ = ref.inputs(config, batch=1)
    np.testing.assert_allclose(np.asarray(model(ids, pixels)), ref.hf_logits(hf, ids, pixels), atol=TOL, rtol=0)


def test_bfloat16_logits_within_stated_tolerance(tmp_path):
    """bf16 weights and compute: logits stay within 5% of the float32 logit range."""
    config = ref.llava_config()
    hf = ref.build_llava(config)
    hf.save_pretrained(tmp_path / "hf")
    convert(tmp_path / "hf", tmp_path / "jax", dtype="bfloat16", progress=False)
    model, jax_config = emola_jax.load_pretrained(tmp_path / "jax", dtype="bfloat16")
    assert jax_config.dtype == "bfloat16"
    assert model.language_model.layers.mlp.up_proj.kernel.get_value().dtype == np.dtype("bfloat16")
    ids, pixels, _ = ref.inputs(config)
    expected = ref.hf_logits(hf, ids, pixels)
    got = np.asarray(model(ids, pixels))
    assert np.abs(got - expected).max() <= 0.05 * np.abs(expected).max()
    # and the greedy next token agrees almost everywhere
    assert (got.argmax(-1) == expected.argmax(-1)).mean() >= 0.9


def test_jit_compiles_once_per_shape(tmp_path):
    from flax import nnx

    config = ref.llava_config()
    hf, model, _ = _convert_hf(tmp_path, config)
    traces = []

    @nnx.jit
    def forward(m, ids, pixels):
        traces.append(1)
        return m(ids, pixels)

    for seed in range(3):
        ids, pixels, _ = ref.inputs(config, seed=seed)
        np.testing.assert_allclose(np.asarray(forward(model, ids, pixels)), ref.hf_logits(hf, ids, pixels), atol=TOL)
    assert len(traces) == 1


def test_wrong_image_token_count_is_an_error(tmp_path):
    config = ref.llava_config()
    _, model, _ = _convert_hf(tmp_path, config)
    ids, pixels, _ = ref.inputs(config, image_tokens=ref.image_seq_length(config) - 1)
    with pytest.raises(ValueError, match="image tokens"):
        model(ids, pixels)
