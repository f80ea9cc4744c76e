"""The model a run trains: the base checkpoint's weights plus freshly initialised additions.

Nothing is random-initialised only to be overwritten: weights the base holds are read from it
one parameter at a time and placed straight into their shardings; the rest (LoRA factors, the
prior projector when the base is plain LLaVA) are initialised inside one `jit` that computes only
them (XLA drops the unused rest of the init).
"""

from __future__ import annotations

from pathlib import Path

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from emola_jax.checkpoint import (
    abstract_model,
    is_stacked,
    layer_path,
    load_config,
    param_shapes,
    read_params,
    stored_params,
)
from emola_jax.config import EmolaConfig
from emola_jax.models import EmolaForConditionalGeneration
from emola_jax.sharding import param_sharding
from emola_jax.train.config import Experiment

# What must agree between the base checkpoint and the config's model (the towers' architecture).
_TEXT_FIELDS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads")


def training_config(experiment: Experiment) -> tuple[EmolaConfig, EmolaConfig | None]:
    """`(model config to train, base config)`: the base's towers with the config's LoRA, prior
    token and dtype. A base whose architecture differs from the config's is an error, before any
    compile."""
    model, base = experiment.model, experiment.train.base
    if base is None:
        return model, None
    if not Path(base).is_dir():
        raise FileNotFoundError(f"base checkpoint {base} does not exist (train.base); convert one with run.py convert")
    base_config = load_config(base)
    diffs = [f"vision.{k}: {v} there, {getattr(model.vision, k)} here"
             for k, v in vars(base_config.vision).items() if getattr(model.vision, k) != v]
    diffs += [f"text.{k}: {getattr(base_config.text, k)} there, {getattr(model.text, k)} here"
              for k in _TEXT_FIELDS if getattr(base_config.text, k) != getattr(model.text, k)]
    if diffs:
        raise ValueError(f"base checkpoint {base} does not match the config's model ({'; '.join(diffs)})")
    config = base_config.replace(
        lora=model.lora, prior_position=model.prior_position, prior_dim=model.prior_dim, dtype=model.dtype
    )
    return config, base_config


def _join(path) -> str:
    return "/".join(path)


def build_model(experiment: Experiment, mesh: Mesh) -> tuple[EmolaForConditionalGeneration, list[str]]:
    """The sharded model to train and the names of the weights that did not come from the base."""
    config, base_config = training_config(experiment)
    shapes = param_shapes(config)
    in_base: set = set()
    if base_config is not None:
        stored = set(stored_params(experiment.train.base, base_config))
        for path, spec in shapes.items():
            keys = [layer_path(path, i) for i in range(spec.shape[0])] if is_stacked(path) else [path]
            if all(k in stored for k in keys):
                in_base.add(path)
    fresh = [path for path in shapes if path not in in_base]
    values = {path: _read_base(experiment.train.base, path, shapes[path], mesh) for path in shapes if path in in_base}
    values.update(_init_fresh(config, fresh, experiment.train.seed, mesh))

    graphdef, state = nnx.split(abstract_model(config))
    flat = nnx.to_flat_state(state)
    for key, var in flat:
        var.set_value(values[tuple(str(p) for p in key)])
    return nnx.merge(graphdef, nnx.from_flat_state(flat)), [_join(p) for p in fresh]


def _read_base(base: str, path, spec: jax.ShapeDtypeStruct, mesh: Mesh) -> jax.Array:
    """One weight (all its layers), cast to the run's dtype and placed in its sharding."""
    if is_stacked(path):
        keys = [layer_path(path, i) for i in range(spec.shape[0])]
        per_layer = jax.ShapeDtypeStruct(spec.shape[1:], spec.dtype)
        read = read_params(base, {k: per_layer for k in keys})
        host = np.stack([np.asarray(read[k]) for k in keys])
    else:
        host = np.asarray(read_params(base, {path: spec})[path])
    host = host.astype(spec.dtype)
    sharding = param_sharding(path, spec.shape, mesh)
    return jax.make_array_from_callback(spec.shape, sharding, lambda index: host[index])


def _init_fresh(config: EmolaConfig, paths: list, seed: int, mesh: Mesh) -> dict:
    if not paths:
        return {}
    shapes = param_shapes(config)
    wanted = set(paths)

    def init():
        model = EmolaForConditionalGeneration(config, rngs=nnx.Rngs(seed))
        flat = nnx.to_flat_state(nnx.state(model))
        return {_join(tuple(map(str, k))): v.get_value() for k, v in flat if tuple(map(str, k)) in wanted}

    shardings = {_join(p): param_sharding(p, shapes[p].shape, mesh) for p in paths}
    values = jax.jit(init, out_shardings=shardings)()
    return {p: values[_join(p)] for p in paths}
