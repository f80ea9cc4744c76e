"""Where every array lives: a `(data, fsdp, tensor)` mesh and logical axis rules.

Each weight declares its logical axes (`("embed", "mlp")`) where the model makes it, as flax's
`out_sharding` metadata; `logical_axes_table` reads them and one rules table maps logical names to
mesh axes. Changing the parallelism changes the mesh sizes (or this table), never the model.
LoRA factors, the optimiser state (same shapes as the trainable weights) and gradients follow
the weights they belong to; activations follow the batch, split over `data` and `fsdp`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from emola_jax.weights import Path_, path_name

MESH_AXES = ("data", "fsdp", "tensor")
Axes = tuple[str | None, ...]


def axes_metadata(axes: Axes) -> dict:
    """Variable metadata declaring a weight's logical axes, one per dimension.

    Flax's own key (`out_sharding`, what `nnx.with_partitioning` sets and `nnx.get_partition_spec`
    reads). Eager sharding is off: these are logical names, not mesh axes, and the model is built
    without a mesh; `state_shardings` places the weights once the mesh is known.
    """
    return {"out_sharding": tuple(axes), "eager_sharding": False}


# logical axis -> mesh axes (None: replicated); an axis declared `None` is replicated too
LOGICAL_RULES: dict[str, str | tuple[str, ...] | None] = {
    "batch": ("data", "fsdp"),
    "embed": "fsdp",
    "heads": "tensor",
    "mlp": "tensor",
    "vocab": "tensor",
    "layers": None,
    "rank": None,
    "norm": None,
}

@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Mesh axis sizes; one of them may be -1 (all devices the others leave)."""

    data: int = -1
    fsdp: int = 1
    tensor: int = 1

    def __post_init__(self):
        for axis in MESH_AXES:
            size = getattr(self, axis)
            if not (isinstance(size, int) and (size >= 1 or size == -1)):
                raise ValueError(f"mesh axis {axis} must be a size of at least 1, or -1 (the devices left), "
                                 f"not {size!r}")

    @classmethod
    def parse(cls, text: str) -> MeshConfig:
        """`data=2,fsdp=2,tensor=2` (axes left out keep their defaults)."""
        sizes = {}
        for part in filter(None, text.split(",")):
            name, _, value = part.partition("=")
            if name not in MESH_AXES or not value.lstrip("-").isdigit():
                raise ValueError(f"mesh {text!r}: expected axis=size with axes {', '.join(MESH_AXES)}")
            sizes[name] = int(value)
        return dataclasses.replace(cls(), **sizes)

    def shape(self, device_count: int) -> tuple[int, int, int]:
        sizes = [self.data, self.fsdp, self.tensor]
        if sizes.count(-1) > 1:
            raise ValueError(f"mesh {self}: at most one axis may be -1")
        known = math.prod(s for s in sizes if s != -1)
        if -1 in sizes:
            if device_count % known:
                raise ValueError(f"mesh {self}: {device_count} devices do not split into axes of {known}")
            sizes[sizes.index(-1)] = device_count // known
        if math.prod(sizes) > device_count:
            raise ValueError(f"mesh {self} needs {math.prod(sizes)} devices; there are {device_count}")
        return tuple(sizes)


def make_mesh(config: MeshConfig, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """All devices of all processes, ordered by process so each host's rows of the batch are local."""
    devices = list(devices if devices is not None else jax.devices())
    devices.sort(key=lambda d: (d.process_index, d.id))
    shape = config.shape(len(devices))
    if math.prod(shape) < len(devices):
        print(f"mesh {dict(zip(MESH_AXES, shape, strict=True))} uses {math.prod(shape)} of the {len(devices)} devices")
        devices = devices[: math.prod(shape)]
    return Mesh(np.asarray(devices, dtype=object).reshape(shape), MESH_AXES)


def logical_axes_table(model: nnx.Module) -> dict[Path_, Axes]:
    """`{weight path: logical axes}` as each weight declared them where it was made (works on the
    abstract model). A weight without declared axes, or with more or fewer than its rank, is an
    error naming it: nothing is replicated by omission."""
    table = {}
    for key, var in nnx.to_flat_state(nnx.state(model)):
        path = tuple(map(str, key))
        axes, ndim = var.get_metadata("out_sharding", None), len(var.get_value().shape)
        if axes is None:
            raise ValueError(f"weight {path_name(path)} declares no logical axes (out_sharding) where it is made")
        if len(axes) != ndim:
            raise ValueError(f"weight {path_name(path)} declares axes {tuple(axes)} for its {ndim} dimensions")
        table[path] = tuple(axes)
    return table


def partition_spec(axes: Sequence[str | None], shape: Sequence[int], mesh: Mesh) -> PartitionSpec:
    """Logical axes -> mesh axes; a dimension the mesh axes do not divide stays replicated."""
    used: set[str] = set()
    spec = []
    for name, size in zip(axes, shape, strict=True):
        if name is not None and name not in LOGICAL_RULES:
            raise ValueError(f"logical axis {name!r} has no rule in LOGICAL_RULES")
        mesh_axes = LOGICAL_RULES[name] if name else None
        mesh_axes = (mesh_axes,) if isinstance(mesh_axes, str) else tuple(mesh_axes or ())
        mesh_axes = tuple(a for a in mesh_axes if a not in used and mesh.shape[a] > 1)
        if mesh_axes and size % math.prod(mesh.shape[a] for a in mesh_axes) == 0:
            used.update(mesh_axes)
            spec.append(mesh_axes[0] if len(mesh_axes) == 1 else mesh_axes)
        else:
            spec.append(None)
    return PartitionSpec(*spec)


def param_sharding(path: Sequence[str], shape: Sequence[int], mesh: Mesh,
                   axes: Mapping[Path_, Axes]) -> NamedSharding:
    """The sharding of the weight at `path` (or of an array shaped like it), from `axes`
    (`logical_axes_table`)."""
    path = tuple(map(str, path))
    if path not in axes:
        raise ValueError(f"{path_name(path)} is not a weight of the model: no logical axes declared for it")
    if len(axes[path]) != len(shape):
        raise ValueError(f"weight {path_name(path)} declares axes {axes[path]}; the array has shape {tuple(shape)}")
    return NamedSharding(mesh, partition_spec(axes[path], shape, mesh))


def state_shardings(state, mesh: Mesh, axes: Mapping[Path_, Axes]):
    """A `NamedSharding` for every leaf of a tree that holds weights: an `nnx.State`, a pure dict,
    or a training state whose optimiser moments nest the weights' paths deeper. A leaf is placed
    by the part of its path that starts at a model root (`language_model/...`, the first names in
    `axes`); leaves outside the model (step counters, RNG keys) are replicated."""
    roots = {path[0] for path in axes}

    def place(path, x):
        names = [_key_name(k) for k in path if not _is_value_attr(k)]
        start = next((i for i, name in enumerate(names) if name in roots), None)
        if start is None:
            return NamedSharding(mesh, PartitionSpec())
        return param_sharding(names[start:], x.shape, mesh, axes)

    return jax.tree_util.tree_map_with_path(place, state)


def batch_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
    """Rows over `data` x `fsdp`, everything else whole."""
    return NamedSharding(mesh, PartitionSpec(LOGICAL_RULES["batch"], *([None] * (ndim - 1))))


def global_batch(local: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Each process's rows of the batch -> global arrays sharded over the batch axes."""
    return {
        name: jax.make_array_from_process_local_data(batch_sharding(mesh, value.ndim), value)
        for name, value in local.items()
    }


def _is_value_attr(key) -> bool:
    """The `.value` step into an `nnx.Variable` in a tree path, or the step into a quantised
    kernel's codes or scales (`qwix.QArray` fields, placed by the kernel's axes)."""
    return isinstance(key, jax.tree_util.GetAttrKey) and key.name in ("value", "qvalue", "scale", "zero_point")


def _key_name(key) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)
