"""Rotary position embeddings in Hugging Face's rotate-half layout, with LLaMA's scaling types."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from emola_jax.config import TextConfig


def _base_inverse_frequencies(head_dim: int, theta: float | jax.Array) -> jax.Array:
    exponents = jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim
    return 1.0 / (theta**exponents)  # [head_dim // 2]


def inverse_frequencies(config: TextConfig, max_position: jax.Array | None = None) -> jax.Array:
    """Per-pair rotation speeds. `max_position` (the largest position id) drives "dynamic" NTK."""
    scaling, dim = config.rope_scaling, config.resolved_head_dim
    inv_freq = _base_inverse_frequencies(dim, config.rope_theta)
    if scaling.rope_type == "linear":
        return inv_freq / scaling.factor
    if scaling.rope_type == "dynamic":
        original = scaling.original_max_position_embeddings or config.max_position_embeddings
        if max_position is None:
            return inv_freq
        seq_len = jnp.maximum(max_position.astype(jnp.float32) + 1, original)
        theta = config.rope_theta * ((scaling.factor * seq_len / original) - (scaling.factor - 1)) ** (
            dim / (dim - 2)
        )
        return _base_inverse_frequencies(dim, theta)
    if scaling.rope_type == "llama3":
        original = scaling.original_max_position_embeddings
        low_wavelen = original / scaling.low_freq_factor
        high_wavelen = original / scaling.high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        scaled = jnp.where(wavelen > low_wavelen, inv_freq / scaling.factor, inv_freq)
        smooth = (original / wavelen - scaling.low_freq_factor) / (
            scaling.high_freq_factor - scaling.low_freq_factor
        )
        smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
        is_medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        return jnp.where(is_medium, smoothed, scaled)
    return inv_freq


def rope_cos_sin(config: TextConfig, position_ids: jax.Array, dtype: jnp.dtype) -> tuple[jax.Array, jax.Array]:
    """cos and sin tables `[batch, seq, head_dim]`, computed in float32 then cast like HF does."""
    max_position = jnp.max(position_ids) if config.rope_scaling.rope_type == "dynamic" else None
    inv_freq = inverse_frequencies(config, max_position)
    angles = position_ids.astype(jnp.float32)[..., None] * inv_freq  # [batch, seq, head_dim // 2]
    angles = jnp.concatenate([angles, angles], axis=-1)
    return jnp.cos(angles).astype(dtype), jnp.sin(angles).astype(dtype)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """x: `[batch, seq, heads, head_dim]`; cos, sin: `[batch, seq, head_dim]`."""
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos[:, :, None, :] + rotated * sin[:, :, None, :]
