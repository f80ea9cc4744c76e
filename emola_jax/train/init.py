"""The model a run trains: the base checkpoint's weights plus freshly initialised additions.

Nothing is random-initialised only to be overwritten: weights the base holds are read from it
one parameter at a time and placed straight into their shardings; the rest (LoRA factors, the
prior projector when the base is plain LLaVA) are initialised inside one `jit` that computes only
them (XLA drops the unused rest of the init).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import jax
import numpy as np
import qwix
from flax import nnx
from jax.sharding import Mesh

from emola_jax import weights
from emola_jax.checkpoint import check_base, load_config, read_params, read_quantized, stored_params
from emola_jax.config import EmolaConfig, differences
from emola_jax.models import EmolaForConditionalGeneration
from emola_jax.models.tree import (
    abstract_model,
    decoder_kernels,
    is_decoder_kernel,
    is_stacked,
    layer_path,
    param_shapes,
)
from emola_jax.quantization import Quantization
from emola_jax.sharding import logical_axes_table, param_sharding
from emola_jax.train.config import Experiment, FromBase
from emola_jax.weights import path_name


def training_config(experiment: Experiment) -> tuple[EmolaConfig, EmolaConfig | None]:
    """`(model config to train, base config)`, checked before any compile.

    With `train.base`, the model is the base's with what the config adds (`FromBase`); a config
    that gives a whole `EmolaConfig` must agree with the base on every field but those additions,
    else the error lists each difference (no field is silently replaced by the base's)."""
    model, base = experiment.model, experiment.train.base
    if base is None:
        if isinstance(model, FromBase):
            raise ValueError("the config's model section gives only what training adds (FromBase): set train.base, "
                             "the converted checkpoint to start from")
        return model, None
    if not Path(base).is_dir():
        raise FileNotFoundError(f"base checkpoint {base} does not exist (train.base); convert one with run.py convert")
    base_config = load_config(base)
    if isinstance(model, EmolaConfig):
        diffs = differences(model, base_config, skip=frozenset(f.name for f in dataclasses.fields(FromBase)))
        if diffs:
            raise ValueError(f"base checkpoint {base} does not match the config's model ({'; '.join(diffs)}); with "
                             "train.base the model section may give only what training adds (FromBase)")
        model = FromBase.of(model)
    return model.apply_to(base_config), base_config


def build_model(experiment: Experiment, mesh: Mesh) -> tuple[EmolaForConditionalGeneration, list[str]]:
    """The sharded model to train and the names of the weights that did not come from the base."""
    config, base_config = training_config(experiment)
    shapes = param_shapes(config)
    quantization = Quantization.of(experiment.train.base_quantization, experiment.train.quantization_block_size)
    if quantization is not None:
        quantization.check(decoder_kernels(shapes))
    stored_as = check_base(quantization, experiment.train.base) if base_config is not None else None
    in_base: set = set()
    if base_config is not None:
        stored = set(stored_params(experiment.train.base, base_config))
        for path, spec in shapes.items():
            keys = [layer_path(path, i) for i in range(spec.shape[0])] if is_stacked(path) else [path]
            if all(k in stored for k in keys):
                in_base.add(path)
    fresh = [path for path in shapes if path not in in_base]
    axes = logical_axes_table(abstract_model(config))
    values = {path: _read_base(experiment.train.base, path, shapes[path], mesh, axes, quantization, stored_as)
              for path in shapes if path in in_base}
    values.update(_init_fresh(config, fresh, experiment.train.seed, mesh, axes))
    if quantization is not None:  # kernels not read from the base (a run from random weights)
        for path in fresh:
            if is_decoder_kernel(path):
                values[path] = _placed(quantization.quantize(values[path]), path, mesh, axes)

    return weights.from_flat(abstract_model(config), values), [path_name(p) for p in fresh]


def _read_base(base: str, path, spec: jax.ShapeDtypeStruct, mesh: Mesh, axes: dict,
               quantization: Quantization | None = None, stored_as: Quantization | None = None):
    """One weight (all its layers), cast to the run's dtype and placed in its sharding; a decoder
    kernel of a QLoRA run is a `QArray`, read as stored or quantised on its devices as it arrives."""
    if quantization is not None and is_decoder_kernel(path):
        keys = [layer_path(path, i) for i in range(spec.shape[0])]
        if stored_as is not None:
            q = jax.tree.map(lambda *x: np.stack(x), *read_quantized(base, keys, stored_as).values())
            return _placed(q, path, mesh, axes)
        return _placed(quantization.quantize(_read_base(base, path, spec, mesh, axes)), path, mesh, axes)
    if is_stacked(path):
        keys = [layer_path(path, i) for i in range(spec.shape[0])]
        per_layer = jax.ShapeDtypeStruct(spec.shape[1:], spec.dtype)
        read = read_params(base, {k: per_layer for k in keys})
        host = np.stack([np.asarray(read[k]) for k in keys])
    else:
        host = np.asarray(read_params(base, {path: spec})[path])
    host = host.astype(spec.dtype)
    sharding = param_sharding(path, spec.shape, mesh, axes)
    return jax.make_array_from_callback(spec.shape, sharding, lambda index: host[index])


def _placed(q: qwix.QArray, path, mesh: Mesh, axes: dict) -> qwix.QArray:
    """A quantised kernel's codes and scales, each placed by the kernel's logical axes."""
    def place(x):
        sharding = param_sharding(path, x.shape, mesh, axes)
        if isinstance(x, jax.Array):
            return jax.device_put(x, sharding)
        return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])

    return qwix.QArray(place(q.qvalue), place(q.scale), None, q.qtype)


def _init_fresh(config: EmolaConfig, paths: list, seed: int, mesh: Mesh, axes: dict) -> dict:
    if not paths:
        return {}
    shapes = param_shapes(config)
    wanted = set(paths)

    def init():
        params = weights.flat(EmolaForConditionalGeneration(config, rngs=nnx.Rngs(seed)))
        return {path_name(p): v for p, v in params.items() if p in wanted}

    shardings = {path_name(p): param_sharding(p, shapes[p].shape, mesh, axes) for p in paths}
    values = jax.jit(init, out_shardings=shardings)()
    return {p: values[path_name(p)] for p in paths}
