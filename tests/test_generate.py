"""KV-cache decoding gives the same greedy tokens as transformers' `generate`."""

import jax
import numpy as np
import pytest
import torch

import emola_jax
from converters import convert
from emola_jax.generate import GenerationConfig, generate, generate_shared, sample_next
from tests import reference as ref

NEW = 12


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gen")
    config = ref.llava_config()
    hf = ref.build_llava(config, seed=5)
    hf.save_pretrained(tmp / "hf")
    model, _ = emola_jax.load_pretrained(convert(tmp / "hf", tmp / "jax", progress=False))
    return config, hf, model


def _hf_generate(hf, ids, pixels, mask, eos):
    with torch.no_grad():
        out = hf.generate(
            input_ids=torch.tensor(ids), pixel_values=torch.tensor(pixels).permute(0, 3, 1, 2),
            attention_mask=torch.tensor(mask), do_sample=False, max_new_tokens=NEW, min_new_tokens=0,
            eos_token_id=eos, pad_token_id=0,
        )
    new = out[:, ids.shape[1]:].numpy()
    return np.pad(new, ((0, 0), (0, NEW - new.shape[1])), constant_values=0)


@pytest.mark.parametrize("pad", [[0, 0, 0], [0, 4, 7]], ids=["no_padding", "left_padding"])
def test_greedy_tokens_match_transformers(converted, pad):
    config, hf, model = converted
    ids, pixels, mask = ref.inputs(config, batch=3, pad=pad, side="left", seed=2)
    # an EOS that one row produces mid-way, so that per-row stopping is exercised
    free_run = _hf_generate(hf, ids, pixels, mask, eos=None)
    eos = int(free_run[1, 4])
    expected = _hf_generate(hf, ids, pixels, mask, eos=eos)
    got = np.asarray(generate(model, ids, pixels, mask, None, jax.random.key(0),
                              GenerationConfig(max_new_tokens=NEW, eos_token_id=eos, pad_token_id=0)))
    np.testing.assert_array_equal(got, expected)
    assert (got[1, 5:] == 0).all()


def test_questions_sharing_an_image_prefix_match_transformers_per_question(converted):
    """Two questions about each of three images, the image side and the shared prefix run once:
    each question's tokens are transformers' `generate` on that question's whole prompt."""
    config, hf, model = converted
    ids, pixels, _ = ref.inputs(config, batch=3, suffix=2, seed=4)
    rng = np.random.default_rng(9)
    questions = [rng.integers(3, ref.IMAGE_TOKEN, n) for n in (3, 6)]  # left-padded to 6 below
    suffixes = np.zeros((2, 6), np.int32)
    suffix_mask = np.zeros((2, 6), np.int32)
    for q, tokens in enumerate(questions):
        suffixes[q, 6 - len(tokens):], suffix_mask[q, 6 - len(tokens):] = tokens, 1
    free_run = _hf_generate(hf, np.concatenate([ids, np.tile(questions[1], (3, 1))], 1), pixels,
                            np.ones((3, ids.shape[1] + 6), np.int64), eos=None)
    eos = int(free_run[2, 3])  # one row of the second question stops early
    got = np.asarray(generate_shared(model, ids.astype(np.int32), pixels, None, suffixes, suffix_mask,
                                     jax.random.key(0), GenerationConfig(max_new_tokens=NEW, eos_token_id=eos)))
    assert got.shape == (2, 3, NEW)
    for q, tokens in enumerate(questions):
        prompts = np.concatenate([ids, np.tile(tokens, (3, 1))], 1)
        expected = _hf_generate(hf, prompts, pixels, np.ones_like(prompts), eos=eos)
        np.testing.assert_array_equal(got[q], expected)
    assert (got[1, 2, 4:] == 0).all()
    with pytest.raises(ValueError, match=r"^a suffix holds image placeholders; they belong to the shared prefix$"):
        generate_shared(model, ids, pixels, None, np.full((1, 2), config.image_token_index), np.ones((1, 2)),
                        jax.random.key(0), GenerationConfig(max_new_tokens=2))
    with pytest.raises(ValueError, match=r"^row 0 of suffix_mask is not left-padded with its last token real$"):
        generate_shared(model, ids, pixels, None, suffixes, suffix_mask[:, ::-1], jax.random.key(0),
                        GenerationConfig(max_new_tokens=2))


def test_wrong_placeholder_count_is_refused_before_tracing(converted):
    config, _, model = converted
    ids, pixels, mask = ref.inputs(config, batch=2, pad=[0, 2], side="left", image_tokens=1)
    expected = ref.image_seq_length(config)
    with pytest.raises(ValueError, match=rf"^row 0 of input_ids holds 1 image tokens; this model expects exactly "
                                         rf"{expected} per row \(visual tokens\)$"):
        generate(model, ids, pixels, mask, None, jax.random.key(0), GenerationConfig(max_new_tokens=2))


def test_right_padded_prompt_is_refused(converted):
    config, _, model = converted
    ids, pixels, mask = ref.inputs(config, batch=2, pad=[0, 2], side="right")
    with pytest.raises(ValueError, match=r"^row 1 of attention_mask is not left-padded with its last token real$"):
        generate(model, ids, pixels, mask, None, jax.random.key(0), GenerationConfig(max_new_tokens=2))


def test_prompt_past_the_context_is_refused(converted):
    config, _, model = converted
    ids, pixels, mask = ref.inputs(config, batch=2, pad=[0, 2], side="left")
    context = config.text_config.max_position_embeddings
    new = context - ids.shape[1] + 1  # row 0 (no padding) would need one position more than there are
    with pytest.raises(ValueError, match=rf"^a prompt of {ids.shape[1]} tokens and {new} new tokens exceed the "
                                         rf"model's context of {context} positions$"):
        generate(model, ids, pixels, mask, None, jax.random.key(0), GenerationConfig(max_new_tokens=new))


def test_top_p_keeps_only_the_nucleus():
    logits = np.log(np.array([[0.5, 0.3, 0.15, 0.05]], np.float32))
    config = GenerationConfig(temperature=1.0, top_p=0.7)
    draws = {int(sample_next(logits, config, jax.random.key(i))[0]) for i in range(200)}
    assert draws == {0, 1}  # 0.5 + 0.3 reaches 0.7: tokens 2 and 3 are never drawn
    greedy = GenerationConfig(temperature=0.0)
    assert int(sample_next(logits, greedy, jax.random.key(0))[0]) == 0


def test_blockwise_causal_attention_equals_full_attention():
    import jax.numpy as jnp

    from emola_jax.models.llama import causal_blockwise_attention, heads_first_attention

    rng = np.random.default_rng(0)
    batch, seq, heads, kv_heads, dim = 3, 150, 8, 2, 16
    q = jnp.asarray(rng.standard_normal((batch, seq, heads, dim)), jnp.float32)
    k, v = (jnp.asarray(rng.standard_normal((batch, kv_heads, seq, dim)), jnp.float32) for _ in range(2))
    valid = np.ones((batch, seq), bool)
    valid[1, :17], valid[2, :90] = False, False  # left padding
    full = heads_first_attention(q, k, v, jnp.asarray(np.tril(np.ones((seq, seq), bool)) & valid[:, None, None, :]))
    blocks = causal_blockwise_attention(q, k, v, jnp.asarray(valid), block=64)
    np.testing.assert_allclose(np.asarray(blocks)[valid], np.asarray(full)[valid], atol=1e-6)
