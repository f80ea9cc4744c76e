"""Building blocks shared by the towers: dense layers (with an optional LoRA adapter), norms.

Every weight names its logical axes where it is made (`axes_metadata`); `emola_jax.sharding`
maps those names to mesh axes. `None` declares an axis replicated.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from flax.nnx import spmd
from jax.ad_checkpoint import checkpoint_name

from emola_jax.config import LoRAConfig
from emola_jax.quantization import as_array
from emola_jax.sharding import axes_metadata


class Linear(nnx.Module):
    """`y = x @ kernel + bias`, plus `scale * (x @ lora_a) @ lora_b` when an adapter is attached.

    The adapter factors are `nnx.LoRAParam`s, so `nnx.split(model, nnx.LoRAParam, ...)` separates
    them from the frozen base; `W + BA` is never formed here. The kernel may be a `qwix.QArray`
    (`emola_jax.quantization`, a QLoRA base). `axes` are the kernel's logical axes
    `(in, out)`; the bias takes `out`, the factors `(in, "rank")` and `("rank", out)`.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        axes: tuple[str | None, str | None],
        use_bias: bool = True,
        lora: LoRAConfig | None = None,
        dtype: jnp.dtype = jnp.float32,
        rngs: nnx.Rngs,
    ):
        init = jax.nn.initializers.lecun_normal()
        in_axis, out_axis = axes
        kernel = init(rngs.params(), (in_features, out_features), dtype)
        self.kernel = nnx.Param(kernel, **axes_metadata(axes))  # [in, out]
        self.bias = nnx.Param(jnp.zeros((out_features,), dtype), **axes_metadata((out_axis,))) if use_bias else None
        if lora is None:
            self.lora_a = self.lora_b = None
            self.lora_scale = self.lora_dropout = 0.0
        else:
            # PEFT's default: A ~ kaiming_uniform(a=sqrt(5)) = U(-1/sqrt(in), 1/sqrt(in)), B = 0.
            bound = in_features**-0.5
            self.lora_a = nnx.LoRAParam(
                jax.random.uniform(rngs.params(), (in_features, lora.rank), jnp.float32, -bound, bound),
                **axes_metadata((in_axis, "rank")),
            )  # [in, rank]
            self.lora_b = nnx.LoRAParam(
                jnp.zeros((lora.rank, out_features), jnp.float32), **axes_metadata(("rank", out_axis))
            )  # [rank, out]
            self.lora_scale = lora.scale
            self.lora_dropout = lora.dropout

    def __call__(self, x: jax.Array, dropout_key: jax.Array | None = None) -> jax.Array:
        """With `dropout_key`, PEFT's LoRA dropout is applied to the adapter's input (training). The
        key is this layer's own: callers fold their module index into their key for each child."""
        if x.ndim > 2:  # as one [tokens, in] matrix: the weight gradients are then plain GEMMs
            return self(x.reshape(-1, x.shape[-1]), dropout_key).reshape(*x.shape[:-1], -1)
        y = x @ as_array(self.kernel[...], x.dtype)  # a quantised kernel is dequantised inside the matmul
        if self.bias is not None:
            y = y + self.bias[...]
        if self.lora_a is not None:
            a, b = self.lora_a[...].astype(x.dtype), self.lora_b[...].astype(x.dtype)
            if dropout_key is not None and self.lora_dropout > 0:
                keep = 1.0 - self.lora_dropout
                kept = jax.random.bernoulli(dropout_key, keep, x.shape)
                x = jnp.where(kept, x / jnp.asarray(keep, x.dtype), jnp.zeros_like(x))
            y = y + ((x @ a) @ b) * jnp.asarray(self.lora_scale, x.dtype)
        return y


class RMSNorm(nnx.Module):
    """LLaMA's RMSNorm, normalising in float32 as the reference does, then scaling in `dtype`."""

    def __init__(self, size: int, eps: float, *, dtype: jnp.dtype = jnp.float32):
        self.scale = nnx.Param(jnp.ones((size,), dtype), **axes_metadata(("norm",)))
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return self.scale[...] * x32.astype(x.dtype)


class MlpProjector(nnx.Module):
    """LLaVA's `mlp2x_gelu`: Linear -> GELU (exact) -> Linear. Serves both projectors of EmoLA.
    They train, so their weights and Adam moments are split like the decoder's: the hidden layer
    as an `mlp` axis, the output in the decoder's `embed` space."""

    def __init__(self, in_features: int, out_features: int, *, use_bias: bool, dtype: jnp.dtype, rngs: nnx.Rngs):
        self.linear_1 = Linear(in_features, out_features, axes=(None, "mlp"), use_bias=use_bias, dtype=dtype,
                               rngs=rngs)
        self.linear_2 = Linear(out_features, out_features, axes=("mlp", "embed"), use_bias=use_bias, dtype=dtype,
                               rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.linear_2(jax.nn.gelu(self.linear_1(x), approximate=False))


def stack_layers(make_layer, num_layers: int, rngs: nnx.Rngs) -> nnx.Module:
    """One layer module whose every parameter has a leading `[num_layers]` axis, for `scan`; its
    declared axes gain a leading `"layers"`, as `nnx.vmap` with `transform_metadata` adds it."""
    keys = jax.random.split(rngs.params(), num_layers)
    graphdef, _ = nnx.split(nnx.eval_shape(lambda: make_layer(nnx.Rngs(0))))
    states = jax.vmap(lambda key: nnx.split(make_layer(nnx.Rngs(key)))[1])(keys)
    states = spmd.add_axis(states, 0, {nnx.PARTITION_NAME: "layers"})
    return nnx.merge(graphdef, states)


LAYER_INPUT = "layer_input"  # each scanned layer's input, named for the offload policy
REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,  # recompute each layer in the backward pass
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,  # keep matmul outputs
    # as full, with the layer inputs (the only residuals full remat keeps, [layers, batch, seq, embed])
    # moved to the host's pinned memory during the forward pass and back for the backward pass
    "offload": jax.checkpoint_policies.save_and_offload_only_these_names(
        names_which_can_be_saved=[], names_which_can_be_offloaded=[LAYER_INPUT], offload_src="device",
        offload_dst="pinned_host"),
}


def remat_policy(remat: bool | str) -> str:
    """`True`/`False` or a name from `REMAT_POLICIES`."""
    name = {True: "full", False: "none"}.get(remat, remat)
    if name not in REMAT_POLICIES:
        raise ValueError(f"remat policy {remat!r} is unknown; choose one of {', '.join(REMAT_POLICIES)}")
    return name


def scan_layers(
    layers: nnx.Module,
    carry,
    *args,
    num_layers: int | None = None,
    remat: bool | str = False,
    dropout_key: jax.Array | None = None,
):
    """Runs the stacked `layers` (optionally only the first `num_layers`) over `carry` with scan.

    `dropout_key`, when given, reaches layer i as `fold_in(dropout_key, i)`: the one way every
    module here derives its children's dropout keys.
    """
    graphdef, state = nnx.split(layers)
    depth = jax.tree.leaves(state)[0].shape[0] if num_layers is None else num_layers
    if num_layers is not None:
        state = jax.tree.map(lambda p: p[:num_layers], state)

    def body(carry, xs):
        layer_state, index = xs
        layer = nnx.merge(graphdef, layer_state)
        carry = checkpoint_name(carry, LAYER_INPUT)
        if dropout_key is None:
            return layer(carry, *args), None
        return layer(carry, *args, dropout_key=jax.random.fold_in(dropout_key, index)), None

    policy = remat_policy(remat)
    if policy != "none":
        body = jax.checkpoint(body, policy=REMAT_POLICIES[policy])
    carry, _ = jax.lax.scan(body, carry, (state, jnp.arange(depth)))
    return carry
