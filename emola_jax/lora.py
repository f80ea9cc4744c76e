"""LoRA, all of it: which decoder projections carry an adapter, the fold `W + scale * A @ B`, the
model with its adapters merged, and PEFT's `adapter_config.json` in both directions.

The adapters themselves are `lora_a [in, r]` and `lora_b [r, out]` (`nnx.LoRAParam`s) on the
decoder's `Linear` layers (`models/layers.py`); training differentiates them with the other
trainable weights by path pattern (`train/step.py: split_trainable`). Which projections they sit
on follows PEFT's `target_modules` rules exactly (`config.peft_matches`, beside `LoRAConfig`, whose
targets it checks when a config is made).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

from emola_jax import weights
from emola_jax.config import DECODER_LINEARS, LoRAConfig, peft_matches
from emola_jax.quantization import as_array

LORA_FACTORS = ("lora_a", "lora_b")


def adapter_for(lora: LoRAConfig | None, linear: str) -> LoRAConfig | None:
    """`lora` when its targets name the decoder projection `linear` (`self_attn.q_proj`), else None."""
    return lora if lora is not None and peft_matches(lora.targets, linear) else None


@jax.jit
def fold(kernel: jax.Array, lora_a: jax.Array, lora_b: jax.Array, scale: jax.Array | float) -> jax.Array:
    """`kernel + scale * lora_a @ lora_b` in float32 at full matmul precision, as PEFT's
    `merge_and_unload` computes it. kernel `[..., in, out]`, lora_a `[..., in, rank]`, lora_b
    `[..., rank, out]` (any leading layer axes); returns float32 `[..., in, out]`."""
    delta = jnp.einsum("...ir,...ro->...io", lora_a.astype(jnp.float32), lora_b.astype(jnp.float32),
                       precision=jax.lax.Precision.HIGHEST)
    return kernel.astype(jnp.float32) + scale * delta


def merge_lora(model):
    """A new model of the same class, without adapters, whose kernels have the LoRA update folded
    in (in float32, then back to each kernel's dtype): what inference and `hf` export compute."""
    config = model.config
    if config.lora is None:
        return model
    params = weights.flat(model)
    merged = {}
    for path, value in params.items():
        if path[-1] in LORA_FACTORS:
            continue
        value = as_array(value, config.dtype)  # a quantised (QLoRA) kernel folds into its dequantised values
        if path[-1] == "kernel" and path[:-1] + ("lora_a",) in params:
            lora_a, lora_b = params[path[:-1] + ("lora_a",)], params[path[:-1] + ("lora_b",)]
            value = fold(value, lora_a, lora_b, config.lora.scale).astype(value.dtype)
        merged[path] = value
    plain = config.replace(lora=None)
    return weights.from_flat(weights.abstract(lambda rngs: type(model)(plain, rngs=rngs)), merged)


# --- PEFT's adapter_config.json ------------------------------------------------------------------


def to_peft_config(lora: LoRAConfig, *, target_modules: str | list[str], task_type: str | None,
                   base: str | None, modules_to_save: list[str] | None = None) -> dict[str, Any]:
    """PEFT's `adapter_config.json` for `lora` (the fields PEFT 0.4, which the official EmoLA code
    pins, and today's PEFT both read). `target_modules` in the form the target layout needs;
    `modules_to_save` names modules the adapter file carries whole (trained beside LoRA)."""
    return {
        "base_model_name_or_path": base,
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "layers_pattern": None,
        "layers_to_transform": None,
        "lora_alpha": int(lora.alpha) if float(lora.alpha).is_integer() else lora.alpha,
        "lora_dropout": float(lora.dropout),
        "modules_to_save": modules_to_save,
        "peft_type": "LORA",
        "r": lora.rank,
        "revision": None,
        "target_modules": target_modules,
        "task_type": task_type,
        "use_rslora": lora.use_rslora,
    }


def target_regex(lora: LoRAConfig, layers: str) -> str:
    """A `target_modules` regex naming exactly the adapted decoder projections under the layer
    stack `layers` (a regex for the module path up to `.layers`): a list of bare names would also
    catch CLIP's q_proj, k_proj and v_proj where the vision tower is part of the PEFT model."""
    linears = [re.escape(linear) for linear in DECODER_LINEARS if adapter_for(lora, linear)]
    return rf"{layers}\.\d+\.({'|'.join(linears)})"


def from_peft_config(data: dict[str, Any], *, module_name: str, num_layers: int,
                     other_modules: Sequence[str] = (), where: str) -> LoRAConfig:
    """The `LoRAConfig` of a PEFT `adapter_config.json` (`data`), for a decoder whose projection
    in layer i is called `module_name.format(i=i, linear="self_attn.q_proj")` in the PEFT model.

    Every target form PEFT accepts is resolved with PEFT's own rules over those names. Raises
    ValueError, naming `where`, for what this model cannot hold: adapters on `other_modules` (the
    PEFT model's modules outside the decoder projections), on some layers only, per-module ranks,
    DoRA, bias training, and `modules_to_save`.
    """
    if data.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"{where}: peft_type {data.get('peft_type')!r} is not LoRA")
    for field in ("rank_pattern", "alpha_pattern", "modules_to_save", "target_parameters"):
        if data.get(field):
            raise ValueError(f"{where}: {field} {data[field]!r} is not supported (LoRA on decoder projections only)")
    if data.get("bias", "none") != "none":
        raise ValueError(f"{where}: LoRA bias {data['bias']!r} is not supported (none only)")
    if data.get("use_dora"):
        raise ValueError(f"{where}: DoRA adapters are not supported")
    targets = data.get("target_modules")
    if not targets:
        raise ValueError(f"{where}: target_modules is empty")
    if targets == "all-linear":
        raise ValueError(f"{where}: target_modules 'all-linear' also adapts the projectors, which this model does "
                         "not support; list the decoder projections instead")
    rules = dict(exclude_modules=data.get("exclude_modules"), layers_to_transform=data.get("layers_to_transform"),
                 layers_pattern=data.get("layers_pattern"))
    outside = [name for name in other_modules if peft_matches(targets, name, **rules)]
    if outside:
        raise ValueError(f"{where}: target_modules {targets!r} also adapts {', '.join(outside[:3])}; only the "
                         "decoder's projections can carry LoRA here")
    adapted = []
    for linear in DECODER_LINEARS:
        layers = [i for i in range(num_layers)
                  if peft_matches(targets, module_name.format(i=i, linear=linear), **rules)]
        if layers and len(layers) != num_layers:
            raise ValueError(f"{where}: target_modules {targets!r} adapts {linear} in layers {layers} only; LoRA on "
                             f"some of the {num_layers} layers is not supported (all or none)")
        if layers:
            adapted.append(linear.rpartition(".")[2])
    if not adapted:
        raise ValueError(f"{where}: target_modules {targets!r} adapts none of the decoder's projections "
                         f"(names such as {module_name.format(i=0, linear=DECODER_LINEARS[0])})")
    return LoRAConfig(
        rank=int(data["r"]),
        alpha=float(data["lora_alpha"]),
        targets=tuple(adapted),
        use_rslora=bool(data.get("use_rslora", False)),
        dropout=float(data.get("lora_dropout") or 0.0),
    )
