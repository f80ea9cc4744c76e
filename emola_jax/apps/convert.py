"""`run.py convert --quantize`: a PyTorch checkpoint converted, then quantised, without ever holding
the whole unquantised model: the converter writes an unquantised copy one tensor at a time, and
`checkpoint.quantize_checkpoint` rewrites it one weight entry at a time."""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path

from converters import convert, plan_conversion
from emola_jax.atomic import check_apart, lock_staging, remove_dead_staging, staging_path
from emola_jax.checkpoint import quantize_checkpoint
from emola_jax.models.tree import decoder_kernels, param_shapes
from emola_jax.quantization import Quantization


def convert_quantized(src: str | Path, out: str | Path, quantization: Quantization, *, overwrite: bool = False,
                      **convert_args) -> Path:
    """Converts `src` (`converters.convert`, one tensor at a time) into a staging folder of `out`,
    then quantises that one weight entry at a time into `out`; the unquantised copy is removed, also
    on failure. Host memory stays near one layer's kernel.

    The copy lives in `out`'s own staging folder (`.OUT.tmp-unquantized-*`, locked while this runs),
    so a killed run's copy is removed by the next command that writes `out`, as any staging
    leftover. Raises ValueError, before any weight is read, when `out` is, holds or lies inside one
    of the inputs (plain `convert`'s guard), or when the block size does not fit a kernel of the
    model the source describes (its config files alone say).
    """
    check_apart("OUT", out, {"the source": src, "--clip": convert_args.get("clip"),
                             "--base": convert_args.get("base")})
    config, _, _ = plan_conversion(src, clip=convert_args.get("clip"), base=convert_args.get("base"),
                                   dtype=convert_args.get("dtype", "float32"))
    quantization.check(decoder_kernels(param_shapes(config)), where="--block-size")
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
        return quantize_checkpoint(unquantized, out, quantization, overwrite=overwrite,
                                   progress=convert_args.get("progress", True))
    finally:
        shutil.rmtree(holder, ignore_errors=True)
        os.close(lock)
