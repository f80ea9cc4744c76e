"""LoRA as pure functions over the model's state: the adapters are their own pytree.

The decoder's `Linear` layers hold `lora_a [in, r]` and `lora_b [r, out]` as `nnx.LoRAParam`s;
everything else is the frozen base. `split_lora` separates the two trees (differentiate and keep
optimiser state only for the small one); `merge_lora` folds `scale * A @ B` into the kernels once,
for export and fast inference, and returns a model without adapters.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from emola_jax.models.emola import EmolaForConditionalGeneration


def split_lora(model: nnx.Module) -> tuple[nnx.GraphDef, nnx.State, nnx.State]:
    """`(graphdef, lora_state, base_state)`; `nnx.merge(graphdef, lora_state, base_state)` rebuilds."""
    return nnx.split(model, nnx.LoRAParam, ...)


def _linears_with_lora(model: nnx.Module):
    for path, module in nnx.iter_graph(model):
        if getattr(module, "lora_a", None) is not None:
            yield path, module


@jax.jit
def _fold(kernel: jax.Array, lora_a: jax.Array, lora_b: jax.Array, scale: float) -> jax.Array:
    """kernel + scale * A @ B, batched over any leading (layer) axes, computed in float32."""
    delta = jnp.einsum("...ir,...ro->...io", lora_a.astype(jnp.float32), lora_b.astype(jnp.float32))
    return (kernel.astype(jnp.float32) + scale * delta).astype(kernel.dtype)


def merge_lora(model: EmolaForConditionalGeneration) -> EmolaForConditionalGeneration:
    """A new model, without adapters, whose kernels have the LoRA update folded in."""
    config = dataclasses.replace(model.config, lora=None)
    merged_kernels = {
        tuple(path): _fold(m.kernel.get_value(), m.lora_a.get_value(), m.lora_b.get_value(), m.lora_scale)
        for path, m in _linears_with_lora(model)
    }
    abstract = nnx.eval_shape(lambda: EmolaForConditionalGeneration(config, rngs=nnx.Rngs(0)))
    graphdef, target = nnx.split(abstract)
    source = nnx.state(model, nnx.Not(nnx.LoRAParam))
    values = {tuple(path): var.get_value() for path, var in nnx.to_flat_state(source)}
    flat = nnx.to_flat_state(target)
    for path, var in flat:
        module_path = tuple(path[:-1])
        if path[-1] == "kernel" and module_path in merged_kernels:
            var.set_value(merged_kernels[module_path])
        else:
            var.set_value(values[tuple(path)])
    return nnx.merge(graphdef, nnx.from_flat_state(flat))
