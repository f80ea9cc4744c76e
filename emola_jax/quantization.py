"""A quantised frozen base (QLoRA): the decoder's projection kernels stored as int8 or NF4 codes.

Only the kernels of the decoder layers (`language_model/layers/.../kernel`, the seven projections
LoRA adapts) are quantised; LoRA factors, projectors, norms, embeddings, `lm_head` and the vision
tower keep their dtype. A quantised kernel is a `qwix.QArray` held in the same `nnx.Param`: codes
`[..., in, out]` and float32 scales `[..., in / block, out]` (one scale per output channel and
block of `block_size` consecutive inputs, as bitsandbytes blocks a torch weight's rows; 0: one
block spanning the whole input). `Linear` dequantises it inside its matmul (`as_array`), so a
device holds the codes, never the dequantised base.

On disk (`run.py convert --quantize`, `quantize_checkpoint`) each layer's kernel entry holds the
codes (int8, or two NF4 codes per uint8 byte along the output axis) beside a `kernel_scale` entry,
and `quantization.json` names the method; `checkpoint.read_params` dequantises them for readers
that want plain weights (the exporter), `read_quantized` returns them as they are.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import qwix

from emola_jax.weights import Path_, path_name

QUANTIZATIONS = ("none", "int8", "nf4")
SLAB_WEIGHTS = 1 << 22  # weights quantised at once (about 0.3 GiB of NF4 search on a CPU)
QUANTIZATION_FILE = "quantization.json"
SCALE_SUFFIX = "_scale"
_QTYPES = {"int8": jnp.int8, "nf4": "nf4"}


def is_quantized_path(path: Path_) -> bool:
    """A decoder projection kernel: `language_model/layers/[i/]<block>/<proj>/kernel`."""
    return len(path) > 2 and path[0] == "language_model" and path[1] == "layers" and path[-1] == "kernel"


def is_quantized(value: Any) -> bool:
    return isinstance(value, qwix.QArray)


def as_array(kernel: Any, dtype: jnp.dtype | None = None) -> jax.Array:
    """A kernel as a plain array: a `QArray` dequantised (float32 scales times code values), then
    cast to `dtype` (default float32); a plain array is returned as it is.

    The same numbers as `qwix.dequantize`, written so that XLA fuses the whole of it into one
    elementwise pass that writes only the `dtype` kernel: NF4 codes are looked up by a tree of 15
    selects on their bits, and the scales broadcast over `[..., in / block, block, out]`. qwix's
    own gathers each code through a flattened copy; on a TPU that kept several float32 copies of a
    7B layer's kernel alive at once (1.3 GiB of the QLoRA step's temporaries at rank 8).
    """
    if not is_quantized(kernel):
        return kernel
    codes, scale = kernel.qvalue, kernel.scale
    if kernel.qtype == "nf4":
        values = _nf4_values(codes)
    else:
        values = codes.astype(jnp.float32)
    *lead, fan_in, fan_out = values.shape
    blocks = scale.shape[-2]
    dense = (values.reshape(*lead, blocks, fan_in // blocks, fan_out) * scale[..., :, None, :].astype(jnp.float32))
    return dense.reshape(*lead, fan_in, fan_out).astype(dtype or jnp.float32)


# QLoRA's NormalFloat levels (Dettmers et al. 2023, Appendix E), the ones qwix quantises to
NF4_VALUES = np.asarray([-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
                         -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
                         0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
                         0.7229568362236023, 1.0], np.float32)


def _nf4_values(codes: jax.Array) -> jax.Array:
    """NF4 codes (uint4) -> their float32 levels, by selecting on one bit at a time."""
    codes = codes.astype(jnp.int32)
    level = [jnp.float32(v) for v in NF4_VALUES]
    for bit in range(4):
        high = (codes >> bit) & 1 == 1
        level = [jnp.where(high, level[2 * i + 1], level[2 * i]) for i in range(len(level) // 2)]
    return level[0]


@dataclasses.dataclass(frozen=True)
class Quantization:
    """How the frozen decoder kernels are stored: `method` int8 or nf4 (absmax-scaled, symmetric),
    one float32 scale per output channel and `block_size` consecutive inputs (0: all inputs)."""

    method: str
    block_size: int = 64

    def __post_init__(self):
        if self.method not in _QTYPES:
            raise ValueError(f"quantization {self.method!r} is unknown; choose one of {', '.join(QUANTIZATIONS)}")
        if not isinstance(self.block_size, int) or self.block_size < 0:
            raise ValueError(f"quantization block size must be a whole number at least 0 (0: one block per "
                             f"output channel), not {self.block_size!r}")

    @classmethod
    def of(cls, method: str, block_size: int) -> Quantization | None:
        """None for `method="none"`; raises ValueError for an unknown method or a negative block size."""
        if method == "none":
            return None
        return cls(method, block_size)

    def check(self, shapes: Mapping[Path_, Any], where: str = "train.quantization_block_size") -> None:
        """Raises ValueError, before anything is read or compiled, when `block_size` does not divide
        a quantised kernel's input dimension (or, for nf4, its output dimension is odd: codes pack in pairs)."""
        for path, spec in shapes.items():
            if not is_quantized_path(path):
                continue
            fan_in, fan_out = spec.shape[-2:]
            if self.block_size and fan_in % self.block_size:
                raise ValueError(f"{where} {self.block_size} does not divide the input dimension {fan_in} of "
                                 f"{path_name(path)}")
            if self.method == "nf4" and fan_out % 2:
                raise ValueError(f"nf4 packs two codes per byte along the output axis; {path_name(path)} has an odd "
                                 f"output dimension {fan_out}")

    def quantize(self, kernel: jax.Array) -> qwix.QArray:
        """`kernel [..., in, out]` -> a `QArray` with scales `[..., in / block, out]` (float32).
        Leading axes (stacked layers) keep a scale each.

        Quantised a slab of output channels at a time (`SLAB_WEIGHTS` weights; scales never span
        output channels, so the result is the same): qwix's NF4 search holds 16 float32 distances
        per weight, measured 5.8 GiB of host memory for a whole 4096 x 11008 kernel at once."""
        per_column = math.prod(kernel.shape[:-1])
        columns = max(2, SLAB_WEIGHTS // per_column // 2 * 2)
        if columns >= kernel.shape[-1]:
            return self._quantize(kernel)
        parts = [self._quantize(kernel[..., start:start + columns]) for start in range(0, kernel.shape[-1], columns)]
        return jax.tree.map(lambda *x: jnp.concatenate(x, axis=-1), *parts)

    @functools.partial(jax.jit, static_argnums=0)
    def _quantize(self, kernel: jax.Array) -> qwix.QArray:
        ndim = kernel.ndim
        channelwise = tuple(a for a in range(ndim) if a != ndim - 2)
        tiled = {ndim - 2: self.block_size} if self.block_size else {}
        return qwix.quantize(kernel.astype(jnp.float32), _QTYPES[self.method], channelwise_axes=channelwise,
                             tiled_axes=tiled)

    def scale_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        blocks = shape[-2] // self.block_size if self.block_size else 1
        return (*shape[:-2], blocks, shape[-1])

    # --- on disk ----------------------------------------------------------------------------

    def disk_specs(self, path: Path_, spec: jax.ShapeDtypeStruct) -> dict[Path_, jax.ShapeDtypeStruct]:
        """The entries a quantised kernel `path` (one layer's) is stored as: codes and scales."""
        shape = tuple(spec.shape)
        codes = (jax.ShapeDtypeStruct(shape, jnp.int8) if self.method == "int8"
                 else jax.ShapeDtypeStruct((*shape[:-1], shape[-1] // 2), jnp.uint8))
        return {path: codes, scale_path(path): jax.ShapeDtypeStruct(self.scale_shape(shape), jnp.float32)}

    def to_disk(self, q: qwix.QArray) -> tuple[np.ndarray, np.ndarray]:
        """`(codes, scales)` as numpy arrays for the checkpoint (NF4: two codes per byte, low nibble first)."""
        codes = np.asarray(q.qvalue)
        if self.method == "nf4":
            codes = codes.astype(np.uint8)
            codes = codes[..., 0::2] | (codes[..., 1::2] << 4)
        return codes, np.asarray(q.scale, np.float32)

    def from_disk(self, codes: np.ndarray, scales: np.ndarray) -> qwix.QArray:
        """The `QArray` (numpy leaves) for codes and scales read from a checkpoint."""
        codes = np.asarray(codes)
        if self.method == "nf4":
            packed = codes.astype(np.uint8)
            codes = np.stack([packed & 0xF, packed >> 4], axis=-1).reshape(*packed.shape[:-1], -1)
            codes = codes.astype(ml_dtypes.uint4)
        else:
            codes = codes.astype(np.int8)
        return qwix.QArray(codes, np.asarray(scales, np.float32), None, _QTYPES[self.method])

    def save(self, folder: Path) -> None:
        (Path(folder) / QUANTIZATION_FILE).write_text(json.dumps(dataclasses.asdict(self), indent=2) + "\n")


def scale_path(path: Path_) -> Path_:
    return (*path[:-1], path[-1] + SCALE_SUFFIX)


def is_scale_path(path: Path_) -> bool:
    """The `kernel_scale` entry stored beside a quantised kernel's codes."""
    return path[-1] == "kernel" + SCALE_SUFFIX and is_quantized_path((*path[:-1], "kernel"))


def checkpoint_quantization(checkpoint: str | Path) -> Quantization | None:
    """The quantisation a checkpoint's decoder kernels are stored in (None: unquantised)."""
    file = Path(checkpoint) / QUANTIZATION_FILE
    if not file.is_file():
        return None
    try:
        fields = json.loads(file.read_text())
        return Quantization(str(fields["method"]), int(fields["block_size"]))
    except (ValueError, KeyError, TypeError) as err:
        raise ValueError(f"{file} is not a readable quantisation record: {err}") from err


def check_base(wanted: Quantization | None, checkpoint: str | Path) -> Quantization | None:
    """The base's stored quantisation, after checking the run may use it: a quantised base is read
    as it is (same method and block size) or dequantised (`none`), never quantised a second time."""
    stored = checkpoint_quantization(checkpoint)
    if stored is not None and wanted is not None and wanted != stored:
        raise ValueError(f"base checkpoint {checkpoint} is quantised as {stored.method} with block size "
                         f"{stored.block_size}; set train.base_quantization={stored.method} and "
                         f"train.quantization_block_size={stored.block_size} (or none to dequantise it)")
    return stored


def quantize_checkpoint(src: str | Path, out: str | Path, quantization: Quantization, *, overwrite: bool = False,
                        progress: bool = False) -> Path:
    """Writes checkpoint `src` at `out` with its decoder kernels quantised, one weight entry at a
    time (host memory: one layer's kernel, its codes, and the writer's flush buffer).

    Raises ValueError when `src` is already quantised or a kernel does not fit the block size.
    """
    from emola_jax.checkpoint import (
        TOKENIZER_DIR,
        CheckpointWriter,
        disk_shapes,
        load_config,
        read_params,
        read_source,
        stored_params,
    )

    if checkpoint_quantization(src) is not None:
        raise ValueError(f"{src} is already quantised ({QUANTIZATION_FILE}); quantise the unquantised checkpoint")
    config = load_config(src)
    stored = stored_params(src, config)
    specs = disk_shapes(config)
    quantization.check(specs, where="--block-size")
    source = {**read_source(src), "quantized": dataclasses.asdict(quantization)}
    tokenizer = Path(src) / TOKENIZER_DIR
    with CheckpointWriter(out, overwrite=overwrite) as writer:
        for i, path in enumerate(specs):
            if progress and i % 50 == 0:
                print(f"quantising {i}/{len(specs)} weights", flush=True)
            value = np.asarray(read_params(src, {path: stored[path]})[path])
            if is_quantized_path(path):
                codes, scales = quantization.to_disk(jax.device_get(quantization.quantize(jnp.asarray(value))))
                writer.add(path, codes)
                writer.add(scale_path(path), scales)
            else:
                writer.add(path, value)
        quantization.save(writer.staging)
        files = sorted(tokenizer.iterdir()) if tokenizer.is_dir() else []
        out = writer.finish(config, source, files, quantization=quantization)
    return out


def quantize_model(model, quantization: Quantization):
    """Quantises every decoder kernel of `model` in place (an abstract model gets abstract
    `QArray`s: memory plans) and returns it. Raises ValueError when a kernel does not fit the block size."""
    from flax import nnx

    from emola_jax.weights import flat

    quantization.check(flat(model))
    for path in [p for p in flat(model) if is_quantized_path(p)]:
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


def convert_quantized(src: str | Path, out: str | Path, quantization: Quantization, *, overwrite: bool = False,
                      **convert_args) -> Path:
    """`run.py convert --quantize`: converts `src` (`converters.convert`, one tensor at a time) into
    a staging folder of `out`, then quantises that one weight entry at a time into `out`; the
    unquantised copy is removed, also on failure. Host memory stays near one layer's kernel.

    The copy lives in `out`'s own staging folder (`.OUT.tmp-unquantized-*`, locked while this runs),
    so a killed run's copy is removed by the next command that writes `out`, as any staging
    leftover. Raises ValueError when `out` is, holds or lies inside one of the inputs (plain
    `convert`'s guard), before anything is read.
    """
    import os
    import shutil
    import uuid

    from converters import convert
    from emola_jax.atomic import check_apart, lock_staging, remove_dead_staging, staging_path

    check_apart("OUT", out, {"the source": src, "--clip": convert_args.get("clip"),
                             "--base": convert_args.get("base")})
    out = Path(out).absolute()
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise FileExistsError(f"{out} exists and is not empty; pass --overwrite to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_dead_staging(out)  # a killed run's unquantised copy
    holder = staging_path(out, f"unquantized-{uuid.uuid4().hex[:8]}")
    holder.mkdir()
    lock = lock_staging(holder)
    try:
        unquantized = convert(src, holder / "checkpoint", **convert_args)
        return quantize_checkpoint(unquantized, out, quantization, overwrite=overwrite)
    finally:
        shutil.rmtree(holder, ignore_errors=True)
        os.close(lock)
