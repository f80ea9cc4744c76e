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
from typing import TypeVar

import jax
import numpy as np
from flax import nnx
from jax.experimental import mesh_utils
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


BATCH_AXES = ("data", "fsdp")  # the mesh axes that split the rows of a batch

# (logical axis, mesh axes), applied in this order: each rule gives a dimension of that logical
# axis the mesh axes the weight does not use yet, as far as they divide it (MaxText's rule list).
# The rules after the first block are ZeRO-3's: a weight whose `embed` axis did not take `fsdp`
# (LoRA-B `[rank, heads|mlp]`, the projectors' hidden layer) is split over `fsdp` by its other
# axis, so every trainable weight and its Adam moments shrink as 1/fsdp. Logical axes named by no
# rule (`layers`, `rank`, `norm`, `None`) stay whole.
LOGICAL_RULES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("batch", BATCH_AXES),
    ("embed", ("fsdp",)),
    ("heads", ("tensor",)),
    ("mlp", ("tensor",)),
    ("vocab", ("tensor",)),
    ("heads", ("fsdp",)),
    ("mlp", ("fsdp",)),
    ("vocab", ("fsdp",)),
)
LOGICAL_AXES = frozenset({name for name, _ in LOGICAL_RULES} | {"layers", "rank", "norm"})


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Mesh axis sizes. `data`, `fsdp`, `tensor` are the axes inside one slice (ICI; one of them
    may be -1: the devices the others leave); `dcn_*` split the same axes across slices joined by
    the data-centre network (MaxText's `dcn_*_parallelism`), so each mesh axis has
    `ici size x dcn size` devices. Keep `fsdp` and `tensor` inside a slice: their collectives run
    every layer, while data parallelism across slices all-reduces the gradients once a step."""

    data: int = -1
    fsdp: int = 1
    tensor: int = 1
    dcn_data: int = 1
    dcn_fsdp: int = 1
    dcn_tensor: int = 1

    def __post_init__(self):
        for axis in MESH_AXES:
            size = getattr(self, axis)
            if not (isinstance(size, int) and (size >= 1 or size == -1)):
                raise ValueError(f"mesh axis {axis} must be a size of at least 1, or -1 (the devices left), "
                                 f"not {size!r}")
            size = getattr(self, f"dcn_{axis}")
            if not (isinstance(size, int) and size >= 1):
                raise ValueError(f"mesh axis dcn_{axis} must be a number of slices of at least 1, not {size!r}")

    @classmethod
    def parse(cls, text: str) -> MeshConfig:
        """`data=2,fsdp=2,tensor=2[,dcn_data=2]` (axes left out keep their defaults)."""
        names = [f.name for f in dataclasses.fields(cls)]
        sizes = {}
        for part in filter(None, text.split(",")):
            name, _, value = part.partition("=")
            if name not in names or not value.lstrip("-").isdigit():
                raise ValueError(f"mesh {text!r}: expected axis=size with axes {', '.join(names)}")
            sizes[name] = int(value)
        return dataclasses.replace(cls(), **sizes)

    @property
    def slices(self) -> int:
        """How many slices the mesh spans (the product of the `dcn_*` sizes)."""
        return self.dcn_data * self.dcn_fsdp * self.dcn_tensor

    def dcn_shape(self) -> tuple[int, int, int]:
        return self.dcn_data, self.dcn_fsdp, self.dcn_tensor

    def shape(self, device_count: int) -> tuple[int, int, int]:
        """The ICI sizes `(data, fsdp, tensor)` inside one slice of `device_count` devices."""
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


def slice_count(devices: Sequence[jax.Device]) -> int:
    """How many TPU slices `devices` span (1 where devices carry no slice index: CPUs, GPUs, one slice)."""
    return len({getattr(d, "slice_index", 0) for d in devices})


def make_mesh(config: MeshConfig, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """The `(data, fsdp, tensor)` mesh over all devices of all processes.

    On TPUs it follows the machine: inside a slice, `mesh_utils.create_device_mesh` lays the axes
    on the ICI torus (the last axis on the closest chips); across slices,
    `create_hybrid_device_mesh` puts the `dcn_*` part of each axis between slices. On CPUs and
    GPUs devices are taken in process order (each host's rows of the batch stay local), the
    `dcn_*` part of each axis outermost; a mesh smaller than the devices uses the first ones.

    Raises ValueError when the sizes do not fit the devices, or the devices span a number of
    slices other than the `dcn_*` sizes' product.
    """
    devices = list(devices if devices is not None else jax.devices())
    on_tpu = devices[0].platform == "tpu"
    slices = slice_count(devices)
    if on_tpu and slices != config.slices:
        raise ValueError(f"the TPU devices span {slices} slice(s); the mesh's dcn_data x dcn_fsdp x dcn_tensor is "
                         f"{config.slices}: set them to multiply to {slices}")
    if len(devices) % config.slices:
        raise ValueError(f"{len(devices)} devices do not split into {config.slices} slices (mesh {config})")
    ici = config.shape(len(devices) // config.slices)
    dcn = config.dcn_shape()
    if on_tpu:
        if math.prod(ici) * config.slices != len(devices):
            raise ValueError(f"mesh {dict(zip(MESH_AXES, ici, strict=True))} per slice x {config.slices} slices "
                             f"uses {math.prod(ici) * config.slices} of the {len(devices)} TPU devices; on TPUs a "
                             "mesh takes every device (set one axis to -1)")
        grid = (mesh_utils.create_hybrid_device_mesh(ici, dcn, devices, allow_split_physical_axes=True)
                if slices > 1 else mesh_utils.create_device_mesh(ici, devices, allow_split_physical_axes=True))
        return Mesh(grid, MESH_AXES)
    devices.sort(key=lambda d: (d.process_index, d.id))
    used = math.prod(ici) * config.slices
    if used < len(devices):
        sizes = {a: i * d for a, i, d in zip(MESH_AXES, ici, dcn, strict=True)}
        print(f"mesh {sizes} uses {used} of the {len(devices)} devices")
        devices = devices[:used]
    # [dcn_data, dcn_fsdp, dcn_tensor, data, fsdp, tensor] -> each axis as (dcn, ici), dcn outer
    grid = np.asarray(devices, dtype=object).reshape(*dcn, *ici).transpose(0, 3, 1, 4, 2, 5)
    return Mesh(grid.reshape([i * d for i, d in zip(ici, dcn, strict=True)]), MESH_AXES)


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
    """Logical axes -> mesh axes by `LOGICAL_RULES`, in their order. A mesh axis of size 1 is
    skipped, each mesh axis serves one dimension, and a dimension takes a mesh axis only where
    the product of its mesh axes divides its size (else it stays whole on that axis)."""
    for name in axes:
        if name is not None and name not in LOGICAL_AXES:
            raise ValueError(f"logical axis {name!r} has no rule in LOGICAL_RULES")
    taken: list[list[str]] = [[] for _ in axes]
    used: set[str] = set()
    for logical, mesh_axes in LOGICAL_RULES:
        for dim, (name, size) in enumerate(zip(axes, shape, strict=True)):
            if name != logical:
                continue
            for axis in mesh_axes:
                if axis in used or mesh.shape.get(axis, 1) == 1:
                    continue
                if size % math.prod(mesh.shape[a] for a in (*taken[dim], axis)) == 0:
                    taken[dim].append(axis)
                    used.add(axis)
    return PartitionSpec(*(None if not t else t[0] if len(t) == 1 else tuple(t) for t in taken))


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
    return NamedSharding(mesh, PartitionSpec(BATCH_AXES, *([None] * (ndim - 1))))


Rows = TypeVar("Rows")


def global_batch(local: Rows, mesh: Mesh) -> Rows:
    """Each process's rows of a batch (any pytree of `[rows, ...]` arrays: a `data.pipeline.Batch`
    whose `ids` are None, as they stay on the host) -> the same tree of global arrays, sharded over
    the batch axes."""
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(batch_sharding(mesh, x.ndim), x), local)


def _is_value_attr(key) -> bool:
    """The `.value` step into an `nnx.Variable` in a tree path, or the step into a quantised
    kernel's codes or scales (`qwix.QArray` fields, placed by the kernel's axes)."""
    return isinstance(key, jax.tree_util.GetAttrKey) and key.name in ("value", "qvalue", "scale", "zero_point")


def _key_name(key) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)
