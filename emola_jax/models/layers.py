"""Building blocks shared by the towers: dense layers (with an optional LoRA adapter), norms."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from emola_jax.config import LoRAConfig


class Linear(nnx.Module):
    """`y = x @ kernel + bias`, plus `scale * (x @ lora_a) @ lora_b` when an adapter is attached.

    The adapter factors are `nnx.LoRAParam`s, so `nnx.split(model, nnx.LoRAParam, ...)` separates
    them from the frozen base; `W + BA` is never formed here.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        use_bias: bool = True,
        lora: LoRAConfig | None = None,
        dtype: jnp.dtype = jnp.float32,
        rngs: nnx.Rngs,
    ):
        init = jax.nn.initializers.lecun_normal()
        self.kernel = nnx.Param(init(rngs.params(), (in_features, out_features), dtype))  # [in, out]
        self.bias = nnx.Param(jnp.zeros((out_features,), dtype)) if use_bias else None
        if lora is None:
            self.lora_a = self.lora_b = None
            self.lora_scale = 0.0
        else:
            # PEFT's default: A ~ kaiming_uniform(a=sqrt(5)) = U(-1/sqrt(in), 1/sqrt(in)), B = 0.
            bound = in_features**-0.5
            self.lora_a = nnx.LoRAParam(
                jax.random.uniform(rngs.params(), (in_features, lora.rank), jnp.float32, -bound, bound)
            )  # [in, rank]
            self.lora_b = nnx.LoRAParam(jnp.zeros((lora.rank, out_features), jnp.float32))  # [rank, out]
            self.lora_scale = lora.scale

    def __call__(self, x: jax.Array) -> jax.Array:
        y = x @ self.kernel[...]
        if self.bias is not None:
            y = y + self.bias[...]
        if self.lora_a is not None:
            a, b = self.lora_a[...].astype(x.dtype), self.lora_b[...].astype(x.dtype)
            y = y + ((x @ a) @ b) * jnp.asarray(self.lora_scale, x.dtype)
        return y


class RMSNorm(nnx.Module):
    """LLaMA's RMSNorm, normalising in float32 as the reference does, then scaling in `dtype`."""

    def __init__(self, size: int, eps: float, *, dtype: jnp.dtype = jnp.float32):
        self.scale = nnx.Param(jnp.ones((size,), dtype))
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return self.scale[...] * x32.astype(x.dtype)


class MlpProjector(nnx.Module):
    """LLaVA's `mlp2x_gelu`: Linear -> GELU (exact) -> Linear. Serves both projectors of EmoLA."""

    def __init__(self, in_features: int, out_features: int, *, use_bias: bool, dtype: jnp.dtype, rngs: nnx.Rngs):
        self.linear_1 = Linear(in_features, out_features, use_bias=use_bias, dtype=dtype, rngs=rngs)
        self.linear_2 = Linear(out_features, out_features, use_bias=use_bias, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.linear_2(jax.nn.gelu(self.linear_1(x), approximate=False))


def stack_layers(make_layer, num_layers: int, rngs: nnx.Rngs) -> nnx.Module:
    """One layer module whose every parameter has a leading `[num_layers]` axis, for `scan`."""
    keys = jax.random.split(rngs.params(), num_layers)
    graphdef, _ = nnx.split(nnx.eval_shape(lambda: make_layer(nnx.Rngs(0))))
    states = jax.vmap(lambda key: nnx.split(make_layer(nnx.Rngs(key)))[1])(keys)
    return nnx.merge(graphdef, states)


def scan_layers(layers: nnx.Module, carry, *args, num_layers: int | None = None, remat: bool = False):
    """Runs the stacked `layers` (optionally only the first `num_layers`) over `carry` with scan."""
    graphdef, state = nnx.split(layers)
    if num_layers is not None:
        state = jax.tree.map(lambda p: p[:num_layers], state)

    def body(carry, layer_state):
        return nnx.merge(graphdef, layer_state)(carry, *args), None

    if remat:
        body = jax.checkpoint(body)
    carry, _ = jax.lax.scan(body, carry, state)
    return carry
