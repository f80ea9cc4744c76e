"""A quantised frozen base (QLoRA): the decoder's projection kernels stored as int8 or NF4 codes.

Only the kernels of the decoder layers (`language_model/layers/.../kernel`, the seven projections
LoRA adapts) are quantised; LoRA factors, projectors, norms, embeddings, `lm_head` and the vision
tower keep their dtype. A quantised kernel is a `qwix.QArray` held in the same `nnx.Param`: codes
`[..., in, out]` and float32 scales `[..., in / block, out]` (one scale per output channel and
block of `block_size` consecutive inputs, as bitsandbytes blocks a torch weight's rows; 0: one
block spanning the whole input). `Linear` dequantises it inside its matmul (`as_array`), so a
device holds the codes, never the dequantised base.

This module is the numbers only; which kernels are quantised is the model tree's fact
(`models/tree.py: is_decoder_kernel`), and how a quantised checkpoint is laid out on disk is the
storage side's (`checkpoint.py`).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import qwix

from emola_jax.settings import Quantize, choices
from emola_jax.weights import Path_, path_name

SLAB_WEIGHTS = 1 << 22  # weights quantised at once (about 0.3 GiB of NF4 search on a CPU)
QTYPES = {"int8": jnp.int8, "nf4": "nf4"}  # qwix's name of each method's code type


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
        if self.method not in QTYPES:
            raise ValueError(f"quantization {self.method!r} is unknown; choose one of {', '.join(choices(Quantize))}")
        if not isinstance(self.block_size, int) or self.block_size < 0:
            raise ValueError(f"quantization block size must be a whole number at least 0 (0: one block per "
                             f"output channel), not {self.block_size!r}")

    @classmethod
    def of(cls, method: str, block_size: int) -> Quantization | None:
        """None for `method="none"`; raises ValueError for an unknown method or a negative block size."""
        if method == "none":
            return None
        return cls(method, block_size)

    def check(self, kernels: Mapping[Path_, Any], where: str = "train.quantization_block_size") -> None:
        """Raises ValueError, before anything is read or compiled, when `block_size` does not divide
        the input dimension of one of `kernels` (`{path: spec [..., in, out]}`, the kernels to be
        quantised), or, for nf4, its output dimension is odd (codes pack in pairs on disk)."""
        for path, spec in kernels.items():
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
        return qwix.quantize(kernel.astype(jnp.float32), QTYPES[self.method], channelwise_axes=channelwise,
                             tiled_axes=tiled)

    def scale_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        blocks = shape[-2] // self.block_size if self.block_size else 1
        return (*shape[:-2], blocks, shape[-1])
