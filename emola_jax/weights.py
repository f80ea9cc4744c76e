"""A model's weights as one flat `{path: array}` dict, and the model built back from one.

A path is the tuple of names `nnx` gives a weight (`("language_model", "layers", "mlp", "up_proj",
"kernel")`); scanned layers keep their leading `[layers]` axis. Loading a checkpoint, building a
training run's model, merging LoRA and reading a CLIP tower all end in `from_flat`: one place
checks that every weight is given once, with its shape.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
from flax import nnx, traverse_util

Path_ = tuple[str, ...]
_KEY_ENTRIES = (jax.tree_util.DictKey, jax.tree_util.GetAttrKey, jax.tree_util.SequenceKey,
                jax.tree_util.FlattenedIndexKey)


def path_name(path: Sequence[Any]) -> str:
    """`language_model/layers/mlp/up_proj/kernel` for an `nnx` state path or a `jax` key path."""
    keys = tuple(k if isinstance(k, _KEY_ENTRIES) else jax.tree_util.DictKey(k) for k in path)
    return jax.tree_util.keystr(keys, simple=True, separator="/")


def abstract(make: Callable[[nnx.Rngs], nnx.Module]) -> nnx.Module:
    """`make(rngs)` with `ShapeDtypeStruct` leaves: no memory, no random init."""
    return nnx.eval_shape(lambda: make(nnx.Rngs(0)))


def flat(model: nnx.Module) -> dict[Path_, Any]:
    """`{path: array}` of every weight of `model` (`ShapeDtypeStruct`s for an abstract one)."""
    return {tuple(map(str, k)): v for k, v in traverse_util.flatten_dict(nnx.to_pure_dict(nnx.state(model))).items()}


def from_flat(abstract_model: nnx.Module, params: Mapping[Path_, Any], *, source: str = "the weights") -> nnx.Module:
    """The model `abstract_model` describes, holding `params` (`{path: array}`, every weight once).

    Raises ValueError naming `source` and the first missing, unexpected or misshapen weights.
    """
    graphdef, state = nnx.split(abstract_model)
    expected = flat(abstract_model)
    missing, extra = sorted(expected.keys() - params.keys()), sorted(params.keys() - expected.keys())
    if missing or extra:
        problems = [f"missing {', '.join(map(path_name, missing[:3]))}" if missing else "",
                    f"unexpected {', '.join(map(path_name, extra[:3]))}" if extra else ""]
        raise ValueError(f"{source} do not fit the model: {'; '.join(p for p in problems if p)}")
    for path, spec in expected.items():
        if tuple(params[path].shape) != tuple(spec.shape):
            raise ValueError(f"{source}: weight {path_name(path)} has shape {tuple(params[path].shape)}, "
                             f"the model needs {tuple(spec.shape)}")
    nnx.replace_by_pure_dict(state, traverse_util.unflatten_dict(dict(params)))
    return nnx.merge(graphdef, state)
