"""Batched decoding with a KV cache: one prefill, then a jitted `while_loop` of single-token steps.

Prompts are left-padded to one length (a bucket) so that every row writes its next token into
the same cache slot; position ids skip the padding, exactly as transformers' `generate` does.
Shapes are static (batch, prompt bucket, max_new_tokens), so each bucket compiles once.
"""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from emola_jax.models.emola import EmolaForConditionalGeneration, check_inputs, check_padding, default_position_ids


@dataclasses.dataclass(frozen=True)
class GenerationConfig:
    """Decoding settings, range-checked when made (before any work)."""

    max_new_tokens: int = 512
    eos_token_id: int = 2
    pad_token_id: int = 0
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be at least 1, not {self.max_new_tokens}")
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise ValueError(f"temperature must be a number >= 0 (0 decodes greedily), not {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1] (1 keeps every token), not {self.top_p}")


def sample_next(logits: jax.Array, config: GenerationConfig, key: jax.Array) -> jax.Array:
    """Greedy at temperature 0; else temperature + nucleus (top-p) sampling. logits `[batch, vocab]`."""
    if config.temperature == 0.0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits.astype(jnp.float32) / config.temperature
    if config.top_p < 1.0:
        logits = top_p_filter(logits, config.top_p)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


def top_p_filter(logits: jax.Array, top_p: float | jax.Array) -> jax.Array:
    """`logits [batch, vocab]` with the tokens outside the nucleus (the smallest set of the most
    likely tokens whose probability reaches `top_p`) at -inf; the top token is always kept."""
    order = jnp.argsort(-logits, axis=-1)
    sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    sorted_logits = jnp.where(mass_before < top_p, sorted_logits, -jnp.inf)
    return jnp.full_like(logits, -jnp.inf).at[jnp.arange(logits.shape[0])[:, None], order].set(sorted_logits)


def sample_rows(logits: jax.Array, temperature: jax.Array, top_p: jax.Array, keys: jax.Array) -> jax.Array:
    """`sample_next` with settings of each row's own: logits `[rows, vocab]`, temperature and top_p
    `[rows]`, keys `[rows]`; each row draws what `sample_next` draws for it alone with its key. The
    nucleus sort runs only when some sampled row asks for it (it costs more than the rest of a
    small model's step)."""
    sampled = temperature > 0
    scaled = logits.astype(jnp.float32) / jnp.where(sampled, temperature, 1.0)[:, None]

    def nucleus(rows: jax.Array) -> jax.Array:
        kept = jax.vmap(lambda row, p: top_p_filter(row[None], p)[0])(rows, top_p)
        return jnp.where((top_p < 1.0)[:, None], kept, rows)

    scaled = jax.lax.cond(jnp.any(sampled & (top_p < 1.0)), nucleus, lambda rows: rows, scaled)
    drawn = jax.vmap(lambda key, row: jax.random.categorical(key, row[None], axis=-1)[0])(keys, scaled)
    return jnp.where(sampled, drawn, jnp.argmax(logits, axis=-1)).astype(jnp.int32)


def generate(
    model: EmolaForConditionalGeneration,
    input_ids: jax.Array,
    pixel_values: jax.Array | None,
    attention_mask: jax.Array,
    landmarks: jax.Array | None,
    key: jax.Array,
    config: GenerationConfig,
) -> jax.Array:
    """New tokens `[batch, max_new_tokens]`; after a row's EOS, the rest of it is `pad_token_id`.

    input_ids and attention_mask `[batch, prompt]` must be left-padded. The concrete inputs are
    checked here, before tracing (`check_inputs`: placeholders per row, shapes, padding, finite
    landmarks, room in the context); the jitted decoder could not see their values.
    """
    check_inputs(model.config, input_ids, pixel_values, attention_mask, landmarks, padding="left",
                 max_new_tokens=config.max_new_tokens)
    return _generate(model, input_ids, pixel_values, attention_mask, landmarks, key, config)


def generate_step(model, input_ids, pixel_values, attention_mask, landmarks, key,
                  config: GenerationConfig) -> jax.Array:
    """`generate` after its checks, to be traced: one prefill of the prompt, then a `while_loop`
    of decode steps (what `generate` jits, and what `emola_jax.plan` compiles for a TPU)."""
    batch, prompt_len = input_ids.shape
    lm = model.language_model
    embeds = model.embed(input_ids, pixel_values, landmarks)
    positions = default_position_ids(attention_mask)
    cache = lm.init_cache(batch, prompt_len + config.max_new_tokens, embeds.dtype)
    kv_valid = jnp.concatenate([attention_mask.astype(bool), jnp.ones((batch, config.max_new_tokens), bool)], axis=1)
    layers = lm.unstacked_layers()
    hidden, cache = lm.prefill(embeds, attention_mask, positions, cache, layers)
    return _decode_loop(model, layers, hidden[:, -1], cache, kv_valid, positions[:, -1:], prompt_len, key, config)


def _decode_loop(model, layers, last_hidden: jax.Array, cache, kv_valid: jax.Array, last_position: jax.Array,
                 start: int, key: jax.Array, config: GenerationConfig) -> jax.Array:
    """New tokens `[rows, max_new_tokens]` after a prompt whose keys and values fill cache slots
    `0 .. start-1`: `last_hidden [rows, embed]` is the prompt's last normed hidden state,
    `last_position [rows, 1]` its position id; `kv_valid [rows, cache_len]` marks real slots."""
    lm = model.language_model
    batch = last_hidden.shape[0]
    key, step_key = jax.random.split(key)
    first = sample_next(model.logits(last_hidden), config, step_key)
    out = jnp.full((batch, config.max_new_tokens), config.pad_token_id, jnp.int32).at[:, 0].set(first)

    def cond(state):
        step, _, _, done, _, _ = state
        return (step < config.max_new_tokens) & ~jnp.all(done)

    def body(state):
        step, token, cache, done, out, key = state
        position = last_position + step  # the token written at slot start + step - 1
        hidden, cache = lm.decode(lm.embed_tokens(token[:, None]), position, kv_valid, cache, start + step - 1, layers)
        key, step_key = jax.random.split(key)
        token = sample_next(model.logits(hidden[:, -1]), config, step_key)
        token = jnp.where(done, config.pad_token_id, token)
        out = out.at[:, step].set(token)
        done = done | (token == config.eos_token_id)
        return step + 1, token, cache, done, out, key

    state = (jnp.int32(1), first, cache, first == config.eos_token_id, out, key)
    return jax.lax.while_loop(cond, body, state)[4]


_generate = nnx.jit(generate_step, static_argnames=("config",))


def generate_shared(
    model: EmolaForConditionalGeneration,
    prefix_ids: jax.Array,
    pixel_values: jax.Array | None,
    landmarks: jax.Array | None,
    suffix_ids: jax.Array,
    suffix_mask: jax.Array,
    key: jax.Array,
    config: GenerationConfig,
) -> jax.Array:
    """New tokens `[questions, batch, max_new_tokens]`: several questions about each image of a
    batch, the image side and the prompt prefix they share run once per image (prefix sharing).

    prefix_ids `[batch, prefix]`: the tokens every question's prompt starts with (the image's
    placeholders among them), without padding; suffix_ids and suffix_mask `[questions, suffix]`:
    the rest of each question's prompt, left-padded. Question q's answer about image b is the one
    `generate` gives for the prompt `prefix_ids[b] + suffix_ids[q]` (greedy: the same tokens, up
    to float rounding): the prefix is prefilled once, its keys and values copied to a cache row per
    question, each suffix run on its copy, then every row decodes in one loop. The concrete inputs
    are checked here, before tracing; ValueError names what is wrong.
    """
    suffix_ids, suffix_mask = np.asarray(suffix_ids), np.asarray(suffix_mask)
    if suffix_ids.ndim != 2 or suffix_ids.shape != suffix_mask.shape:
        raise ValueError(f"suffix_ids and suffix_mask must both be [questions, suffix], not {suffix_ids.shape} "
                         f"and {suffix_mask.shape}")
    if (suffix_ids == model.config.image_token_id).any():
        raise ValueError("a suffix holds image placeholders; they belong to the shared prefix")
    check_padding(suffix_mask, "left", "suffix_mask")  # every question keeps its prompt's last token
    prefix_mask = np.ones(np.shape(prefix_ids), np.int32)
    check_inputs(model.config, prefix_ids, pixel_values, prefix_mask, landmarks, padding="left",
                 max_new_tokens=int(suffix_mask.sum(axis=1).max()) + config.max_new_tokens)
    return _generate_shared(model, prefix_ids, pixel_values, landmarks, suffix_ids, suffix_mask, key, config)


def generate_shared_step(model, prefix_ids, pixel_values, landmarks, suffix_ids, suffix_mask, key,
                         config: GenerationConfig) -> jax.Array:
    """`generate_shared` after its checks, to be traced. Cache rows are question-major
    (row `q * batch + b`)."""
    batch, prefix_len = prefix_ids.shape
    questions, suffix_len = suffix_ids.shape
    rows = questions * batch
    lm = model.language_model
    layers = lm.unstacked_layers()
    embeds = model.embed(prefix_ids, pixel_values, landmarks)
    prefix_positions = jnp.broadcast_to(jnp.arange(prefix_len, dtype=jnp.int32), (batch, prefix_len))
    cache = lm.init_cache(batch, prefix_len + suffix_len + config.max_new_tokens, embeds.dtype)
    _, cache = lm.prefill(embeds, jnp.ones((batch, prefix_len), jnp.int32), prefix_positions, cache, layers)
    cache = [(jnp.tile(k, (questions, 1, 1, 1)), jnp.tile(v, (questions, 1, 1, 1))) for k, v in cache]
    mask = jnp.repeat(suffix_mask, batch, axis=0)  # [rows, suffix]
    positions = prefix_len + default_position_ids(mask)
    kv_valid = jnp.concatenate([jnp.ones((rows, prefix_len), bool), mask.astype(bool),
                                jnp.ones((rows, config.max_new_tokens), bool)], axis=1)
    suffix_embeds = lm.embed_tokens(jnp.repeat(suffix_ids, batch, axis=0))
    hidden, cache = lm.decode(suffix_embeds, positions, kv_valid, cache, prefix_len, layers)
    tokens = _decode_loop(model, layers, hidden[:, -1], cache, kv_valid, positions[:, -1:], prefix_len + suffix_len,
                          key, config)
    return tokens.reshape(questions, batch, config.max_new_tokens)


_generate_shared = nnx.jit(generate_shared_step, static_argnames=("config",))


# ---------------------------------------------------------------------------------------------
# continuous batching: a fixed set of rows ("slots") that requests join and leave between steps


class Slots(NamedTuple):
    """The decoding state of `rows` requests that joined at different times (`run.py serve`).

    The cache (k, v `[rows, kv_heads, length, head_dim]` per layer) is a ring: step `clock` writes
    every row's next key and value at slot `clock % length`, and a joining request's prompt fills
    the slots just before it. Slot order is not time order across rows, and need not be: each key
    carries its RoPE angle from its own position, and each row attends to exactly the slots
    `kv_valid` marks as its own. A request with a prompt of `p` tokens and up to `n` new ones keeps
    its slots while it runs as long as `p + n <= length`.
    """

    cache: list[tuple[jax.Array, jax.Array]]
    kv_valid: jax.Array  # [rows, length] bool
    token: jax.Array  # [rows] int32: the token each row feeds next
    position: jax.Array  # [rows] int32: its position id
    key: jax.Array  # [rows] PRNG keys, each row's own chain
    temperature: jax.Array  # [rows] float32
    top_p: jax.Array  # [rows] float32
    active: jax.Array  # [rows] bool
    clock: jax.Array  # int32: the steps taken


def empty_slots(model: EmolaForConditionalGeneration, rows: int, length: int, dtype: jnp.dtype) -> Slots:
    """`rows` free slots over a ring of `length` cache slots."""
    return Slots(cache=model.language_model.init_cache(rows, length, dtype),
                 kv_valid=jnp.zeros((rows, length), bool), token=jnp.zeros(rows, jnp.int32),
                 position=jnp.zeros(rows, jnp.int32), key=jax.random.split(jax.random.key(0), rows),
                 temperature=jnp.zeros(rows, jnp.float32), top_p=jnp.ones(rows, jnp.float32),
                 active=jnp.zeros(rows, bool), clock=jnp.int32(0))


def prefill_one(model: EmolaForConditionalGeneration, input_ids: jax.Array, pixel_values: jax.Array | None,
                attention_mask: jax.Array, landmarks: jax.Array | None, layers=None):
    """One request's prompt (`input_ids`, `attention_mask` `[1, prompt]`, left-padded) through the
    model, as `generate_step` prefills it: `(cache, last_hidden [1, embed], last_position [1])`.
    `layers`: as `step_slots`'s."""
    lm = model.language_model
    embeds = model.embed(input_ids, pixel_values, landmarks)
    positions = default_position_ids(attention_mask)
    cache = lm.init_cache(1, input_ids.shape[1], embeds.dtype)
    hidden, cache = lm.prefill(embeds, attention_mask, positions, cache, layers)
    return cache, hidden[:, -1], positions[:, -1]


def join_slot(model: EmolaForConditionalGeneration, slots: Slots, row: jax.Array, cache, attention_mask: jax.Array,
              last_hidden: jax.Array, last_position: jax.Array, temperature: jax.Array, top_p: jax.Array,
              key: jax.Array) -> tuple[Slots, jax.Array]:
    """A prefilled request (`prefill_one`'s outputs) takes slot `row`: its keys and values fill the
    ring's slots just before the next step's, and its first token is drawn as `generate`'s first
    is (`key` split once for it, as there). Returns the new state and that token `[]`."""
    length = slots.kv_valid.shape[1]
    where = (slots.clock - attention_mask.shape[1] + jnp.arange(attention_mask.shape[1])) % length
    ring = []
    for (k, v), (new_k, new_v) in zip(slots.cache, cache, strict=True):
        ring.append(tuple(old.at[row].set(old[row].at[:, where].set(new[0])) for old, new in ((k, new_k), (v, new_v))))
    key, step_key = jax.random.split(key)
    first = sample_rows(model.logits(last_hidden), temperature[None], top_p[None], step_key[None])[0]
    return Slots(cache=ring, kv_valid=slots.kv_valid.at[row].set(jnp.zeros(length, bool).at[where].set(
                     attention_mask[0].astype(bool))),
                 token=slots.token.at[row].set(first), position=slots.position.at[row].set(last_position[0] + 1),
                 key=slots.key.at[row].set(key), temperature=slots.temperature.at[row].set(temperature),
                 top_p=slots.top_p.at[row].set(top_p), active=slots.active.at[row].set(True),
                 clock=slots.clock), first


def leave_slot(slots: Slots, row: jax.Array) -> Slots:
    """Slot `row` free again (its keys and values are overwritten when it is next taken)."""
    return slots._replace(active=slots.active.at[row].set(False), kv_valid=slots.kv_valid.at[row].set(False))


def step_slots(model: EmolaForConditionalGeneration, slots: Slots, layers=None) -> tuple[Slots, jax.Array]:
    """One decode step of every slot, each at its own position: tokens `[rows]` (a free slot's
    is meaningless). `layers`: the decoder's layers sliced once (`LlamaModel.unstacked_layers`), as
    a server keeps them; else they are sliced from the stacked weights inside the step, which
    copies every decoder weight on every call (measured on a CPU: 640 ms a step against 32 ms)."""
    lm = model.language_model
    slot = slots.clock % slots.kv_valid.shape[1]
    kv_valid = slots.kv_valid.at[:, slot].set(slots.active)
    hidden, cache = lm.decode(lm.embed_tokens(slots.token[:, None]), slots.position[:, None], kv_valid, slots.cache,
                              slot, layers, mask=kv_valid[:, None, None, :])
    split = jax.vmap(jax.random.split)(slots.key)
    tokens = sample_rows(model.logits(hidden[:, -1]), slots.temperature, slots.top_p, split[:, 1])
    return slots._replace(cache=cache, kv_valid=kv_valid, token=tokens, position=slots.position + 1, key=split[:, 0],
                          clock=slots.clock + 1), tokens
