"""LLaMA decoder (Vicuna-7B v1.5, LLaMA-2/3 family), names mirroring transformers' `LlamaModel`."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from emola_jax.config import LoRAConfig, TextConfig
from emola_jax.models.layers import Linear, RMSNorm, scan_layers, stack_layers
from emola_jax.models.rope import apply_rope, rope_cos_sin


def _adapter(lora: LoRAConfig | None, name: str) -> LoRAConfig | None:
    return lora if lora is not None and name in lora.targets else None


class LlamaAttention(nnx.Module):
    def __init__(self, config: TextConfig, lora: LoRAConfig | None, *, dtype: jnp.dtype, rngs: nnx.Rngs):
        d, heads, kv_heads = config.hidden_size, config.num_attention_heads, config.num_key_value_heads
        self.head_dim = config.resolved_head_dim

        def proj(name, fan_in, fan_out):
            return Linear(
                fan_in, fan_out, use_bias=config.attention_bias, lora=_adapter(lora, name), dtype=dtype, rngs=rngs
            )

        self.q_proj = proj("q_proj", d, heads * self.head_dim)
        self.k_proj = proj("k_proj", d, kv_heads * self.head_dim)
        self.v_proj = proj("v_proj", d, kv_heads * self.head_dim)
        self.o_proj = proj("o_proj", heads * self.head_dim, d)

    def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array, mask: jax.Array, cache=None):
        """Without `cache`: attention over `x` itself. With `cache = (k, v, index)`, k and v
        `[batch, cache_len, kv_heads, head_dim]`: the new keys and values are written at `index`
        and the queries attend over the whole cache; returns `(out, (k, v))`."""
        batch, seq, _ = x.shape
        q = self.q_proj(x).reshape(batch, seq, -1, self.head_dim)  # [batch, seq, heads, head_dim]
        k = self.k_proj(x).reshape(batch, seq, -1, self.head_dim)  # [batch, seq, kv_heads, head_dim]
        v = self.v_proj(x).reshape(batch, seq, -1, self.head_dim)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k_cache, v_cache, index = cache
            k = jax.lax.dynamic_update_slice_in_dim(k_cache, k.astype(k_cache.dtype), index, axis=1)
            v = jax.lax.dynamic_update_slice_in_dim(v_cache, v.astype(v_cache.dtype), index, axis=1)
        out = jax.nn.dot_product_attention(q, k, v, mask=mask)  # grouped-query heads handled natively
        out = self.o_proj(out.reshape(batch, seq, -1))
        return out if cache is None else (out, (k, v))


class LlamaMLP(nnx.Module):
    def __init__(self, config: TextConfig, lora: LoRAConfig | None, *, dtype: jnp.dtype, rngs: nnx.Rngs):
        d, f, bias = config.hidden_size, config.intermediate_size, config.mlp_bias
        self.gate_proj = Linear(d, f, use_bias=bias, lora=_adapter(lora, "gate_proj"), dtype=dtype, rngs=rngs)
        self.up_proj = Linear(d, f, use_bias=bias, lora=_adapter(lora, "up_proj"), dtype=dtype, rngs=rngs)
        self.down_proj = Linear(f, d, use_bias=bias, lora=_adapter(lora, "down_proj"), dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


class LlamaDecoderLayer(nnx.Module):
    def __init__(self, config: TextConfig, lora: LoRAConfig | None, *, dtype: jnp.dtype, rngs: nnx.Rngs):
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype=dtype)
        self.self_attn = LlamaAttention(config, lora, dtype=dtype, rngs=rngs)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype=dtype)
        self.mlp = LlamaMLP(config, lora, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array, mask: jax.Array, cache=None):
        attended = self.self_attn(self.input_layernorm(x), cos, sin, mask, cache)
        if cache is not None:
            attended, cache = attended
        x = x + attended
        x = x + self.mlp(self.post_attention_layernorm(x))
        return x if cache is None else (x, cache)


def cached_attention_mask(kv_valid: jax.Array, index: jax.Array, seq: int) -> jax.Array:
    """Queries at cache slots `index .. index+seq-1` see valid slots up to their own:
    kv_valid `[batch, cache_len]` -> `[batch, 1, seq, cache_len]` bool."""
    slots = jnp.arange(kv_valid.shape[-1])
    causal = slots[None, :] <= (index + jnp.arange(seq))[:, None]  # [seq, cache_len]
    return causal[None, None] & kv_valid.astype(bool)[:, None, None, :]


def attention_mask_4d(attention_mask: jax.Array) -> jax.Array:
    """Causal mask combined with key padding: `[batch, seq]` of 0/1 -> `[batch, 1, seq, seq]` bool."""
    seq = attention_mask.shape[-1]
    causal = jnp.tril(jnp.ones((seq, seq), dtype=bool))
    return causal[None, None] & attention_mask.astype(bool)[:, None, None, :]


class LlamaModel(nnx.Module):
    """Embeddings, a scanned stack of decoder layers, and the final norm (no lm_head)."""

    def __init__(self, config: TextConfig, lora: LoRAConfig | None = None, *, dtype: jnp.dtype, rngs: nnx.Rngs):
        self.config = config
        self.embed_tokens = nnx.Embed(config.vocab_size, config.hidden_size, dtype=dtype, param_dtype=dtype, rngs=rngs)
        self.layers = stack_layers(
            lambda r: LlamaDecoderLayer(config, lora, dtype=dtype, rngs=r), config.num_hidden_layers, rngs
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype=dtype)

    def __call__(
        self, inputs_embeds: jax.Array, attention_mask: jax.Array, position_ids: jax.Array, *, remat: bool = False
    ) -> jax.Array:
        """inputs_embeds `[batch, seq, embed]`, attention_mask and position_ids `[batch, seq]`."""
        cos, sin = rope_cos_sin(self.config, position_ids, inputs_embeds.dtype)
        mask = attention_mask_4d(attention_mask)
        hidden = scan_layers(self.layers, inputs_embeds, cos, sin, mask, remat=remat)
        return self.norm(hidden)

    def init_cache(self, batch: int, length: int, dtype: jnp.dtype) -> tuple[jax.Array, jax.Array]:
        """Zeroed keys and values `[layers, batch, length, kv_heads, head_dim]`."""
        c = self.config
        shape = (c.num_hidden_layers, batch, length, c.num_key_value_heads, c.resolved_head_dim)
        return jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)

    def decode(self, inputs_embeds, position_ids, kv_valid, cache, index):
        """Runs `inputs_embeds [batch, seq, embed]` at cache slots `index ..`; returns the normed
        hidden states and the updated cache. `kv_valid [batch, cache_len]` marks real tokens."""
        cos, sin = rope_cos_sin(self.config, position_ids, inputs_embeds.dtype)
        mask = cached_attention_mask(kv_valid, index, inputs_embeds.shape[1])
        graphdef, state = nnx.split(self.layers)

        def body(hidden, xs):
            layer_state, k, v = xs
            hidden, (k, v) = nnx.merge(graphdef, layer_state)(hidden, cos, sin, mask, (k, v, index))
            return hidden, (k, v)

        hidden, cache = jax.lax.scan(body, inputs_embeds, (state, *cache))
        return self.norm(hidden), cache
