"""Write PyTorch checkpoint files one tensor at a time.

A safetensors file is a JSON header (every key's dtype, shape and byte range) followed by the
raw tensor bytes. When every shape and dtype is known before any data exists, as in an export,
the header can be written first and the tensors streamed after it in order, so the writer
never holds more than the tensor it is given. `.bin` files (torch's zip pickle) cannot be
streamed; `save_torch` is for the small ones the official EmoLA layout needs.
"""

from __future__ import annotations

import json
import re
import struct
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType

import ml_dtypes
import numpy as np

from converters.readers import SAFETENSORS_DTYPES

SAFETENSORS_NAMES = {np.dtype(dtype): name for name, dtype in SAFETENSORS_DTYPES.items()}
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(size: str | int) -> int:
    """'5GB' -> 5_000_000_000, '500MiB' -> 524_288_000 (transformers' `max_shard_size` units)."""
    if isinstance(size, int):
        return size
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B?)\s*", size.upper())
    if not match or match.group(2) not in _UNITS:
        raise ValueError(f"cannot read {size!r} as a size: use e.g. 5GB, 500MB or 2GiB")
    value = int(float(match.group(1)) * _UNITS[match.group(2)])
    if value <= 0:
        raise ValueError(f"size {size!r} must be positive")
    return value


def nbytes(dtype: np.dtype, shape: Sequence[int]) -> int:
    return int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize


class SafetensorsWriter:
    """One safetensors file: `entries` (key, dtype, shape) fix the header; `write` them in that order.

    `close()` checks that every entry was written; on an exception the partial file is left for
    the caller's staging folder to remove.
    """

    def __init__(
        self,
        path: str | Path,
        entries: Sequence[tuple[str, np.dtype, tuple[int, ...]]],
        metadata: dict[str, str] | None = None,
    ):
        self.path = Path(path)
        header: dict[str, object] = {}
        offset = 0
        for key, dtype, shape in entries:
            dtype = np.dtype(dtype)
            if dtype not in SAFETENSORS_NAMES:
                raise ValueError(f"{self.path}: tensor {key!r} has dtype {dtype}, which safetensors cannot store")
            if key in header:
                raise ValueError(f"{self.path}: tensor {key!r} is listed twice")
            size = nbytes(dtype, shape)
            header[key] = {
                "dtype": SAFETENSORS_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]
            }
            offset += size
        if metadata:
            header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)  # the data starts 8-byte aligned, as the reference writer does
        self._expected = [(key, np.dtype(dtype), tuple(shape)) for key, dtype, shape in entries]
        self._next = 0
        self.total_bytes = offset
        self._file = open(self.path, "wb")
        self._file.write(struct.pack("<Q", len(blob)) + blob)

    def write(self, key: str, array: np.ndarray) -> None:
        if self._next >= len(self._expected):
            raise ValueError(f"{self.path}: tensor {key!r} was not planned for this file")
        want_key, want_dtype, want_shape = self._expected[self._next]
        if key != want_key:
            raise ValueError(f"{self.path}: expected tensor {want_key!r} next, got {key!r}")
        array = np.ascontiguousarray(array)
        if array.dtype != want_dtype or array.shape != want_shape:
            raise ValueError(
                f"{self.path}: tensor {key!r} is {array.dtype}{list(array.shape)}, "
                f"the header says {want_dtype}{list(want_shape)}"
            )
        self._file.write(array.reshape(-1).view(np.uint8).data)
        self._next += 1

    def close(self) -> None:
        self._file.close()
        if self._next != len(self._expected):
            missing = self._expected[self._next][0]
            raise ValueError(f"{self.path}: tensor {missing!r} (and {len(self._expected) - self._next - 1} more) "
                             "was never written")

    def abort(self) -> None:
        """Closes the file without the completeness check (the caller discards it)."""
        self._file.close()

    def __enter__(self) -> SafetensorsWriter:
        return self

    def __exit__(self, exc_type: type | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def save_torch(path: str | Path, tensors: dict[str, np.ndarray]) -> None:
    """A `torch.save` dict of tensors (the `.bin` files LLaVA/EmoLA code loads); bfloat16 kept exact."""
    # deferred: start-up time (torch)
    import torch

    state = {}
    for key, array in tensors.items():
        array = np.ascontiguousarray(array)
        if array.dtype == ml_dtypes.bfloat16:
            state[key] = torch.from_numpy(array.view(np.int16)).view(torch.bfloat16)
        else:
            state[key] = torch.from_numpy(array)
    torch.save(state, Path(path))


def plan_shards(
    entries: Sequence[tuple[str, np.dtype, tuple[int, ...]]], max_bytes: int
) -> list[list[tuple[str, np.dtype, tuple[int, ...]]]]:
    """Consecutive groups of at most `max_bytes` (a larger tensor gets a shard of its own), as transformers splits."""
    shards: list[list[tuple[str, np.dtype, tuple[int, ...]]]] = [[]]
    size = 0
    for entry in entries:
        tensor_bytes = nbytes(entry[1], entry[2])
        if shards[-1] and size + tensor_bytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(entry)
        size += tensor_bytes
    return shards


def shard_names(count: int, stem: str = "model", ext: str = "safetensors") -> list[str]:
    """transformers' file names: `model.safetensors`, or `model-00001-of-00003.safetensors`..."""
    if count == 1:
        return [f"{stem}.{ext}"]
    return [f"{stem}-{i + 1:05d}-of-{count:05d}.{ext}" for i in range(count)]
