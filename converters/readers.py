"""Read PyTorch checkpoint files one tensor at a time.

safetensors files are read with plain `seek` + `readinto` from the header's offsets (no mmap, no
whole-file load), so the reader holds one tensor in memory. `.bin` files go through
`torch.load(weights_only=True, mmap=True)`: storages stay on disk until a tensor is touched.
Both check what can be checked before any data is read: a truncated file or a broken header is
an error that names the file.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterable
from pathlib import Path

import ml_dtypes
import numpy as np

SAFETENSORS_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}


class CheckpointFileError(ValueError):
    """A checkpoint file that cannot be read as what it claims to be."""


class SafetensorsFile:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        size = self.path.stat().st_size
        with open(self.path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointFileError(f"{self.path} is not a safetensors file: it is only {size} bytes")
            (header_len,) = struct.unpack("<Q", head)
            if header_len > size - 8:
                raise CheckpointFileError(
                    f"{self.path} is truncated or corrupt: its header claims {header_len} bytes, "
                    f"the file has {size - 8}"
                )
            try:
                header = json.loads(f.read(header_len))
            except (json.JSONDecodeError, UnicodeDecodeError) as err:
                raise CheckpointFileError(f"{self.path} has a corrupt safetensors header: {err}") from err
        header.pop("__metadata__", None)
        self._data_start = 8 + header_len
        self._entries = {}
        for key, entry in header.items():
            try:
                dtype = np.dtype(SAFETENSORS_DTYPES[entry["dtype"]])
                begin, end = entry["data_offsets"]
                shape = tuple(entry["shape"])
            except (KeyError, TypeError, ValueError) as err:
                raise CheckpointFileError(f"{self.path}: header entry for {key!r} is malformed") from err
            if end - begin != int(np.prod(shape, dtype=np.int64)) * dtype.itemsize:
                raise CheckpointFileError(f"{self.path}: tensor {key!r} has a size that does not match its shape")
            if self._data_start + end > size:
                raise CheckpointFileError(
                    f"{self.path} is truncated: tensor {key!r} ends at byte {self._data_start + end}, "
                    f"the file has {size}"
                )
            self._entries[key] = (dtype, shape, begin)

    def keys(self) -> Iterable[str]:
        return self._entries.keys()

    def shape(self, key: str) -> tuple[int, ...]:
        return self._entries[key][1]

    def read(self, key: str) -> np.ndarray:
        dtype, shape, begin = self._entries[key]
        out = np.empty(shape, dtype)
        with open(self.path, "rb") as f:
            f.seek(self._data_start + begin)
            view = memoryview(out.reshape(-1).view(np.uint8))
            if f.readinto(view) != out.nbytes:
                raise CheckpointFileError(f"{self.path} is truncated: could not read tensor {key!r}")
        return out


class TorchFile:
    """A `torch.save` file (zip format), opened lazily with `weights_only=True`."""

    def __init__(self, path: str | Path):
        # deferred: start-up time (torch)
        import torch

        self.path = Path(path)
        try:
            self._state = torch.load(self.path, map_location="cpu", weights_only=True, mmap=True)
        except Exception as err:  # torch raises RuntimeError, UnpicklingError, EOFError, ...
            raise CheckpointFileError(f"{self.path} could not be read as a PyTorch weights file: {err}") from err
        if not isinstance(self._state, dict) or not all(hasattr(v, "shape") for v in self._state.values()):
            raise CheckpointFileError(f"{self.path} does not hold a flat dict of tensors")

    def keys(self) -> Iterable[str]:
        return self._state.keys()

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._state[key].shape)

    def read(self, key: str) -> np.ndarray:
        # deferred: start-up time (torch)
        import torch

        tensor = self._state[key]
        try:
            if tensor.dtype == torch.bfloat16:
                return tensor.view(torch.int16).numpy().view(ml_dtypes.bfloat16).copy()
            return tensor.numpy().copy()
        except RuntimeError as err:
            raise CheckpointFileError(f"{self.path}: tensor {key!r} could not be read: {err}") from err


def open_file(path: Path) -> SafetensorsFile | TorchFile:
    if path.suffix == ".safetensors":
        return SafetensorsFile(path)
    return TorchFile(path)


class TensorStore:
    """All tensors of a set of files, by key; remembers which file holds each key."""

    def __init__(self, files: Iterable[Path]):
        self._files: dict[str, SafetensorsFile | TorchFile] = {}
        self.paths: list[Path] = []
        for path in files:
            opened = open_file(path)
            self.paths.append(path)
            for key in opened.keys():
                if key in self._files:
                    raise CheckpointFileError(f"tensor {key!r} appears in both {self._files[key].path} and {path}")
                self._files[key] = opened

    def keys(self) -> list[str]:
        return list(self._files)

    def __contains__(self, key: str) -> bool:
        return key in self._files

    def file_of(self, key: str) -> Path:
        return self._files[key].path

    def shape(self, key: str) -> tuple[int, ...]:
        return self._files[key].shape(key)

    def read(self, key: str) -> np.ndarray:
        return self._files[key].read(key)


# transformers' order for a local folder (modeling_utils.py, `_get_resolved_checkpoint_files`, with
# the default use_safetensors=None): the single safetensors file wins over the safetensors index,
# which wins over pytorch_model.bin, then its index; config.json's `transformers_weights` wins
# over all.
WEIGHT_FILE_NAMES = (
    "model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json",
)


def weight_files(directory: str | Path) -> list[Path]:
    """The weight files transformers' `from_pretrained` loads from a local folder (see above)."""
    directory = Path(directory)
    chosen = _explicit_weights(directory) or next(
        (directory / name for name in WEIGHT_FILE_NAMES if (directory / name).is_file()), None)
    if chosen is not None and chosen.name.endswith(".index.json"):
        index = chosen
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (json.JSONDecodeError, KeyError, AttributeError, TypeError) as err:
            raise CheckpointFileError(f"{index} is not a valid weight index: {err}") from err
        missing = [s for s in shards if not (directory / s).is_file()]
        if missing:
            raise CheckpointFileError(f"{index} lists {missing[0]}, which is not in {directory}")
        return [directory / s for s in shards]
    if chosen is not None:
        return [chosen]
    raise CheckpointFileError(
        f"{directory} holds no model weights (looked for model.safetensors[.index.json] and "
        "pytorch_model.bin[.index.json])"
    )


def _explicit_weights(directory: Path) -> Path | None:
    """The file config.json's `transformers_weights` names (transformers loads it before any other)."""
    try:
        name = json.loads((directory / "config.json").read_text()).get("transformers_weights")
    except (OSError, ValueError, AttributeError):
        return None
    if not isinstance(name, str):
        return None
    path = directory / name
    if not path.resolve().is_relative_to(directory.resolve()):
        raise CheckpointFileError(f"{directory / 'config.json'}: transformers_weights {name!r} lies outside the folder")
    if not path.is_file():
        raise CheckpointFileError(f"{directory / 'config.json'} names transformers_weights {name!r}, which is missing")
    return path
