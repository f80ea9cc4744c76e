"""Facts about EmoLA's weight tree: its shapes without memory, the decoder layers stacked on one
leading axis, and the role each weight path plays (what QLoRA quantises, what LoRA adapts, which
projector a path belongs to). Storage, conversion and training read these here, so that a change to
the tree is made in one file.

A path is the tuple of names `nnx` gives a weight (`weights.flat`), e.g. `("language_model",
"layers", "self_attn", "q_proj", "kernel")`; on disk each layer is its own entry, with the layer
index after `layers` (`layer_path`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
from flax import nnx

from emola_jax import weights
from emola_jax.config import EmolaConfig
from emola_jax.models.emola import EmolaForConditionalGeneration
from emola_jax.quantization import Quantization
from emola_jax.weights import Path_

LAYER_AXIS_PARENT = "layers"  # the scanned decoder layers: every weight under it has a leading [layers] axis

# Trainable groups as `train.trainable` names them (regexes over path names, big_vision style): the
# adapters, the prior projectors, and LLaVA's multi-modal projector.
LORA_PATTERN = r"language_model/.*/lora_[ab]"
PRIOR_PROJECTOR_PATTERN = r"prior_projector(_[^/]+)?/.*"  # every prior's projector (`PriorToken.projector_name`)
PROJECTOR_PATTERN = r"multi_modal_projector/.*"


def abstract_model(config: EmolaConfig) -> EmolaForConditionalGeneration:
    """The model with `ShapeDtypeStruct` leaves: no memory, no random init (Tunix-style)."""
    return weights.abstract(lambda rngs: EmolaForConditionalGeneration(config, rngs=rngs))


def param_shapes(config: EmolaConfig) -> dict[Path_, jax.ShapeDtypeStruct]:
    """Every weight of the model, keyed by its path (stacked layers keep their leading axis)."""
    return weights.flat(abstract_model(config))


def is_stacked(path: Path_) -> bool:
    """A weight of the scanned decoder layers (leading `[layers]` axis)."""
    return LAYER_AXIS_PARENT in path


def layer_path(path: Path_, layer: int) -> Path_:
    """('language_model', 'layers', 'mlp', ...) -> ('language_model', 'layers', '3', 'mlp', ...)."""
    at = path.index(LAYER_AXIS_PARENT) + 1
    return path[:at] + (str(layer),) + path[at:]


def is_decoder_kernel(path: Path_) -> bool:
    """A decoder projection kernel, `language_model/layers/[i/]<block>/<proj>/kernel`: the seven
    projections LoRA adapts and QLoRA stores quantised."""
    return len(path) > 2 and path[0] == "language_model" and path[1] == LAYER_AXIS_PARENT and path[-1] == "kernel"


def decoder_kernels(shapes: Mapping[Path_, Any]) -> dict[Path_, Any]:
    """The entries of `shapes` that are decoder projection kernels."""
    return {path: spec for path, spec in shapes.items() if is_decoder_kernel(path)}


def quantize_model(model: EmolaForConditionalGeneration, quantization: Quantization) -> EmolaForConditionalGeneration:
    """Quantises every decoder kernel of `model` in place (an abstract model gets abstract
    `QArray`s: memory plans) and returns it. Raises ValueError when a kernel does not fit the block size."""
    kernels = decoder_kernels(weights.flat(model))
    quantization.check(kernels)
    for path in kernels:
        module = model
        for part in path[:-1]:
            module = getattr(module, part)
        variable: nnx.Variable = getattr(module, path[-1])
        kernel = variable.get_value()
        if isinstance(kernel, jax.ShapeDtypeStruct):
            variable.set_value(jax.eval_shape(quantization.quantize, kernel))
        else:
            variable.set_value(quantization.quantize(kernel))
    return model
