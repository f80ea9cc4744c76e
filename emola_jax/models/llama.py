"""LLaMA decoder (Vicuna-7B v1.5, LLaMA-2/3 family), names mirroring transformers' `LlamaModel`."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from emola_jax.config import LoRAConfig, TextConfig
from emola_jax.lora import adapter_for
from emola_jax.models.layers import Linear, RMSNorm, scan_layers, stack_layers
from emola_jax.models.rope import apply_rope, rope_cos_sin
from emola_jax.models.splash import splash_attention
from emola_jax.sharding import axes_metadata


def _projection(lora: LoRAConfig | None, path: str, fan_in: int, fan_out: int, axes: tuple[str, str], bias: bool,
                dtype: jnp.dtype, rngs: nnx.Rngs) -> Linear:
    return Linear(fan_in, fan_out, axes=axes, use_bias=bias, lora=adapter_for(lora, path), dtype=dtype, rngs=rngs)


def _key(key: jax.Array | None, i: int) -> jax.Array | None:
    """Child i's dropout key: the parent's key with the child's index folded in (None: no dropout)."""
    return None if key is None else jax.random.fold_in(key, i)


# Kernels for causal self-attention over right-padded rows; `resolve_attention` picks one for "auto".
ATTENTION_IMPLEMENTATIONS = ("auto", "xla", "cudnn", "blockwise", "splash")


class LlamaAttention(nnx.Module):
    """Self-attention with three entry points, each with one return type: `__call__` over a whole
    sequence (training, scoring), `prefill` and `decode` over a KV cache (generation).

    `implementation` (static, resolved: xla, cudnn, blockwise or splash) is the kernel of
    causal-only attention, and of the prompt's attention in `prefill` where it is splash;
    `LlamaModel.set_attention` chooses it.
    """

    def __init__(self, config: TextConfig, lora: LoRAConfig | None, *, implementation: str, dtype: jnp.dtype,
                 rngs: nnx.Rngs):
        d, heads, kv_heads = config.hidden_size, config.num_attention_heads, config.num_key_value_heads
        self.head_dim = config.resolved_head_dim
        self.implementation = implementation

        def proj(name, fan_in, fan_out, axes):
            return _projection(lora, f"self_attn.{name}", fan_in, fan_out, axes, config.attention_bias, dtype, rngs)

        self.q_proj = proj("q_proj", d, heads * self.head_dim, ("embed", "heads"))
        self.k_proj = proj("k_proj", d, kv_heads * self.head_dim, ("embed", "heads"))
        self.v_proj = proj("v_proj", d, kv_heads * self.head_dim, ("embed", "heads"))
        self.o_proj = proj("o_proj", heads * self.head_dim, d, ("heads", "embed"))

    def _qkv(self, x: jax.Array, cos: jax.Array, sin: jax.Array, dropout_key: jax.Array | None = None):
        """Rotated queries `[batch, seq, heads, hd]`, rotated keys and values `[batch, seq, kv_heads, hd]`."""
        batch, seq, _ = x.shape
        q = self.q_proj(x, _key(dropout_key, 0)).reshape(batch, seq, -1, self.head_dim)
        k = self.k_proj(x, _key(dropout_key, 1)).reshape(batch, seq, -1, self.head_dim)
        v = self.v_proj(x, _key(dropout_key, 2)).reshape(batch, seq, -1, self.head_dim)
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

    def _out(self, out: jax.Array, dropout_key: jax.Array | None = None) -> jax.Array:
        batch, seq = out.shape[:2]
        return self.o_proj(out.reshape(batch, seq, -1), _key(dropout_key, 3))

    def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array, mask: jax.Array | None = None,
                 dropout_key: jax.Array | None = None) -> jax.Array:
        """Attention of `x [batch, seq, embed]` over itself. `mask [batch, 1, seq, seq]` (bool)
        masks padding anywhere; None attends causally with `self.implementation`, which is exact
        for the real tokens of right-padded rows (padding is never seen by a real token)."""
        q, k, v = self._qkv(x, cos, sin, dropout_key)
        if mask is None:
            out = causal_attention(q, k, v, self.implementation)
        else:
            out = jax.nn.dot_product_attention(q, k, v, mask=mask)  # grouped-query heads handled natively
        return self._out(out, dropout_key)

    def prefill(self, x: jax.Array, cos: jax.Array, sin: jax.Array, key_valid: jax.Array,
                cache: tuple[jax.Array, jax.Array]) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
        """The prompt `x [batch, seq, embed]` attends to itself, block by block (`key_valid
        [batch, seq]` masks its padding); its keys and values fill slots `0 .. seq-1` of the empty
        `cache` (k, v `[batch, kv_heads, cache_len, head_dim]`). Returns `(out, (k, v))`."""
        q, k, v = self._qkv(x, cos, sin)
        k_cache, v_cache = cache
        k, v = _heads_first(k, k_cache.dtype), _heads_first(v, v_cache.dtype)
        if self.implementation == "splash":
            out = splash_attention(q, k, v, key_valid)
        else:
            out = causal_blockwise_attention(q, k, v, key_valid)
        cache = (jax.lax.dynamic_update_slice_in_dim(k_cache, k, 0, axis=2),
                 jax.lax.dynamic_update_slice_in_dim(v_cache, v, 0, axis=2))
        return self._out(out), cache

    def decode(self, x: jax.Array, cos: jax.Array, sin: jax.Array, mask: jax.Array,
               cache: tuple[jax.Array, jax.Array], index: jax.Array) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
        """`x [batch, seq, embed]` (one token per step in a decode loop) is written at cache slots
        `index ..` and attends over the whole cache under `mask [batch, 1, seq, cache_len]`.
        Returns `(out, (k, v))`."""
        q, k, v = self._qkv(x, cos, sin)
        k_cache, v_cache = cache
        k = jax.lax.dynamic_update_slice_in_dim(k_cache, _heads_first(k, k_cache.dtype), index, axis=2)
        v = jax.lax.dynamic_update_slice_in_dim(v_cache, _heads_first(v, v_cache.dtype), index, axis=2)
        return self._out(heads_first_attention(q, k, v, mask)), (k, v)


def _heads_first(x: jax.Array, dtype: jnp.dtype) -> jax.Array:
    """`[batch, seq, kv_heads, hd]` -> the cache's layout `[batch, kv_heads, seq, hd]`."""
    return x.transpose(0, 2, 1, 3).astype(dtype)


def heads_first_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
    """Attention over a cache laid out heads-first.

    q `[batch, seq, heads, head_dim]`; k, v `[batch, kv_heads, cache_len, head_dim]`; mask
    `[batch, 1, seq, cache_len]`. With the batch and head axes leading, both contractions are
    plain batched matmuls: on CPU this is over ten times faster per decode step than attention
    over a `[batch, cache_len, heads, head_dim]` cache, which XLA transposes on every call. The
    queries are scaled before the first contraction and the softmax is normalised after the
    second, on `[.., seq, head_dim]` rather than on the `[.., seq, cache_len]` scores: two passes
    fewer over the largest array (measured on CPU: the prefill's attention 12 % faster).
    """
    batch, seq, heads, head_dim = q.shape
    kv_heads = k.shape[1]
    q = (q * jnp.asarray(head_dim**-0.5, q.dtype)).reshape(batch, seq, kv_heads, heads // kv_heads, head_dim)
    scores = jnp.einsum("bkgtd,bksd->bkgts", q.transpose(0, 2, 3, 1, 4), k, preferred_element_type=jnp.float32)
    scores = jnp.where(mask[:, :, None], scores, jnp.finfo(jnp.float32).min)  # [batch, kv, group, seq, cache]
    weights = jnp.exp(scores - jax.lax.stop_gradient(scores.max(axis=-1, keepdims=True)))
    total = weights.sum(axis=-1, keepdims=True)
    out = jnp.einsum("bkgts,bksd->bkgtd", weights.astype(v.dtype), v) / total.astype(v.dtype)
    return out.transpose(0, 3, 1, 2, 4).reshape(batch, seq, heads, head_dim)


def resolve_attention(implementation: str, dtype: jnp.dtype, platform: str | None = None) -> str:
    """`auto`: the Pallas splash kernel on TPUs, cuDNN flash attention on GPUs in 16-bit,
    block-causal einsums on CPU, XLA elsewhere. `platform` is where the model will run (default:
    the default backend; a plan for a TPU topology names `tpu`)."""
    if implementation not in ATTENTION_IMPLEMENTATIONS:
        choices = ", ".join(ATTENTION_IMPLEMENTATIONS)
        raise ValueError(f"attention {implementation!r} is unknown; choose one of {choices}")
    if implementation != "auto":
        return implementation
    backend = platform or jax.default_backend()
    if backend == "tpu":
        return "splash"
    if backend == "gpu" and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16):
        return "cudnn"
    return "blockwise" if backend == "cpu" else "xla"


def causal_attention(q: jax.Array, k: jax.Array, v: jax.Array, implementation: str) -> jax.Array:
    """Causal self-attention without a padding mask, by a resolved implementation (xla, cudnn,
    blockwise or splash). q `[batch, seq, heads, head_dim]`, k and v `[batch, seq, kv_heads, head_dim]`."""
    if implementation == "blockwise":
        return causal_blockwise_attention(q, k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3), None)
    if implementation == "splash":
        return splash_attention(q, k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3))
    return jax.nn.dot_product_attention(
        q, k, v, is_causal=True, implementation=None if implementation == "xla" else implementation
    )


def causal_blockwise_attention(
    q: jax.Array, k: jax.Array, v: jax.Array, key_valid: jax.Array | None, block: int = 128
) -> jax.Array:
    """Causal self-attention that skips the masked upper triangle a block of queries at a time.

    q `[batch, seq, heads, head_dim]`; k, v heads-first `[batch, kv_heads, seq, head_dim]`;
    key_valid `[batch, seq]`. Query block i sees keys `[0, end_i)` in one exact softmax, so about
    half of the score matrix is never computed (measured on CPU: the prompt's attention is the
    largest cost of a prefill after the matmuls).
    """
    seq = q.shape[1]
    outputs = []
    for start in range(0, seq, block):
        end = min(start + block, seq)
        causal = jnp.arange(end)[None, :] <= jnp.arange(start, end)[:, None]  # [block, end]
        mask = causal[None, None] if key_valid is None else causal[None, None] & key_valid[:, None, None, :end]
        outputs.append(heads_first_attention(q[:, start:end], k[:, :, :end], v[:, :, :end], mask))
    return jnp.concatenate(outputs, axis=1)


class LlamaMLP(nnx.Module):
    def __init__(self, config: TextConfig, lora: LoRAConfig | None, *, dtype: jnp.dtype, rngs: nnx.Rngs):
        d, f, bias = config.hidden_size, config.intermediate_size, config.mlp_bias
        self.gate_proj = _projection(lora, "mlp.gate_proj", d, f, ("embed", "mlp"), bias, dtype, rngs)
        self.up_proj = _projection(lora, "mlp.up_proj", d, f, ("embed", "mlp"), bias, dtype, rngs)
        self.down_proj = _projection(lora, "mlp.down_proj", f, d, ("mlp", "embed"), bias, dtype, rngs)

    def __call__(self, x: jax.Array, dropout_key: jax.Array | None = None) -> jax.Array:
        gate, up = self.gate_proj(x, _key(dropout_key, 0)), self.up_proj(x, _key(dropout_key, 1))
        return self.down_proj(jax.nn.silu(gate) * up, _key(dropout_key, 2))


class LlamaDecoderLayer(nnx.Module):
    """Pre-norm attention and MLP blocks; `__call__`, `prefill` and `decode` as `LlamaAttention`'s."""

    def __init__(self, config: TextConfig, lora: LoRAConfig | None, *, attention: str, dtype: jnp.dtype,
                 rngs: nnx.Rngs):
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype=dtype)
        self.self_attn = LlamaAttention(config, lora, implementation=attention, dtype=dtype, rngs=rngs)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype=dtype)
        self.mlp = LlamaMLP(config, lora, dtype=dtype, rngs=rngs)

    def _feed_forward(self, x: jax.Array, dropout_key: jax.Array | None = None) -> jax.Array:
        return x + self.mlp(self.post_attention_layernorm(x), dropout_key)

    def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array, mask: jax.Array | None = None,
                 dropout_key: jax.Array | None = None) -> jax.Array:
        attended = self.self_attn(self.input_layernorm(x), cos, sin, mask, _key(dropout_key, 0))
        return self._feed_forward(x + attended, _key(dropout_key, 1))

    def prefill(self, x, cos, sin, key_valid, cache) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
        attended, cache = self.self_attn.prefill(self.input_layernorm(x), cos, sin, key_valid, cache)
        return self._feed_forward(x + attended), cache

    def decode(self, x, cos, sin, mask, cache, index) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
        attended, cache = self.self_attn.decode(self.input_layernorm(x), cos, sin, mask, cache, index)
        return self._feed_forward(x + attended), cache


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
    """Embeddings, a scanned stack of decoder layers, and the final norm (no lm_head).

    `attention` names the kernel of causal-only attention (see `set_attention`): a runtime choice,
    kept out of `TextConfig` and so out of saved configs.
    """

    def __init__(self, config: TextConfig, lora: LoRAConfig | None = None, *, attention: str = "auto",
                 dtype: jnp.dtype, rngs: nnx.Rngs):
        self.config = config
        implementation = resolve_attention(attention, dtype)
        self.embed_tokens = nnx.Embed(config.vocab_size, config.hidden_size, dtype=dtype, param_dtype=dtype, rngs=rngs,
                                      embedding_metadata=axes_metadata(("vocab", "embed")))
        self.layers = stack_layers(
            lambda r: LlamaDecoderLayer(config, lora, attention=implementation, dtype=dtype, rngs=r),
            config.num_hidden_layers, rngs,
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype=dtype)

    def set_attention(self, implementation: str, platform: str | None = None) -> None:
        """Chooses the kernel of causal-only attention (one of `ATTENTION_IMPLEMENTATIONS`),
        resolved here once for this model's dtype and `platform` (`resolve_attention`). It is
        static: set it before `nnx.split`/jit."""
        self.layers.self_attn.implementation = resolve_attention(implementation, self.embed_tokens.dtype, platform)

    def __call__(
        self,
        inputs_embeds: jax.Array,
        attention_mask: jax.Array,
        position_ids: jax.Array,
        *,
        right_padded: bool = False,
        remat: bool | str = False,
        dropout_key: jax.Array | None = None,
    ) -> jax.Array:
        """inputs_embeds `[batch, seq, embed]`, attention_mask and position_ids `[batch, seq]`.

        By default padding is masked wherever it lies (exact for left padding too). `right_padded`
        says every row's padding comes after its real tokens: causal attention alone is then exact
        for the real tokens, and runs on the kernel `set_attention` chose (training).
        """
        cos, sin = rope_cos_sin(self.config, position_ids, inputs_embeds.dtype)
        mask = None if right_padded else attention_mask_4d(attention_mask)
        hidden = scan_layers(self.layers, inputs_embeds, cos, sin, mask, remat=remat, dropout_key=dropout_key)
        return self.norm(hidden)

    def init_cache(self, batch: int, length: int, dtype: jnp.dtype) -> list[tuple[jax.Array, jax.Array]]:
        """Zeroed keys and values per layer, `[batch, kv_heads, length, head_dim]` (heads first)."""
        c = self.config
        shape = (batch, c.num_key_value_heads, length, c.resolved_head_dim)
        return [(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)) for _ in range(c.num_hidden_layers)]

    def unstacked_layers(self) -> list[LlamaDecoderLayer]:
        """One module per layer, sliced once from the stacked weights (outside the decode loop).

        Prefill and decode unroll the layers, each with its own cache buffers: in a decode loop, a
        scan over stacked layers and a stacked cache copies both on every step (measured 2x slower
        on CPU).
        """
        graphdef, state = nnx.split(self.layers)
        layer = lambda i: nnx.merge(graphdef, jax.tree.map(lambda p: p[i], state))  # noqa: E731
        return [layer(i) for i in range(self.config.num_hidden_layers)]

    def prefill(self, inputs_embeds, attention_mask, position_ids, cache, layers=None):
        """Runs the left-padded prompt `inputs_embeds [batch, seq, embed]` (attention_mask and
        position_ids `[batch, seq]`) into cache slots `0 .. seq-1` of the empty `cache`; returns the
        normed hidden states and the filled cache."""
        cos, sin = rope_cos_sin(self.config, position_ids, inputs_embeds.dtype)
        key_valid = attention_mask.astype(bool)
        hidden, new_cache = inputs_embeds, []
        for layer, kv in zip(layers or self.unstacked_layers(), cache, strict=True):
            hidden, kv = layer.prefill(hidden, cos, sin, key_valid, kv)
            new_cache.append(kv)
        return self.norm(hidden), new_cache

    def decode(self, inputs_embeds, position_ids, kv_valid, cache, index, layers=None, mask=None):
        """Runs `inputs_embeds [batch, seq, embed]` at cache slots `index ..`; returns the normed
        hidden states and the updated cache. `kv_valid [batch, cache_len]` marks real tokens. `mask`
        `[batch, 1, seq, cache_len]`: what each query sees (default: the valid slots up to its own,
        `cached_attention_mask`; a cache used as a ring, whose slot order is not time order, gives
        its own)."""
        cos, sin = rope_cos_sin(self.config, position_ids, inputs_embeds.dtype)
        if mask is None:
            mask = cached_attention_mask(kv_valid, index, inputs_embeds.shape[1])
        hidden, new_cache = inputs_embeds, []
        for layer, kv in zip(layers or self.unstacked_layers(), cache, strict=True):
            hidden, kv = layer.decode(hidden, cos, sin, mask, kv, index)
            new_cache.append(kv)
        return self.norm(hidden), new_cache
