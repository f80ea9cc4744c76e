"""Prior features keyed by record id, in one ArrayRecord file.

Record encoding (little-endian), one record per image:

    uint32 n | n bytes: the record id, UTF-8 | 212 x float32: the feature

The last record of a file is a footer, `FOOTER_MAGIC` followed by a uint64 count of the
records before it. ArrayRecord opens a truncated file without complaint (it reports zero
records), so the footer is what tells a complete file from a partial one: `read_landmarks`
refuses a file without it. Files are written under a temporary name and renamed into place,
so a file under its final name is always complete.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np

from emola_jax.atomic import atomic_file
from emola_jax.config import LANDMARK_DIM

FOOTER_MAGIC = b"\x00emola-jax landmarks end\x00"
_FEATURE_BYTES = 4 * LANDMARK_DIM
# group_size 1: every record is its own chunk, so a lookup decodes only that record
WRITER_OPTIONS = "group_size:1"


def encode(record_id: str, feature: np.ndarray) -> bytes:
    """One record: the id (length-prefixed UTF-8) and the 212 float32 values."""
    feature = np.asarray(feature, dtype="<f4").reshape(-1)
    if feature.shape != (LANDMARK_DIM,):
        raise ValueError(f"record {record_id}: a prior feature has {LANDMARK_DIM} values, not {feature.size}")
    key = record_id.encode("utf-8")
    return struct.pack("<I", len(key)) + key + feature.tobytes()


def decode(data: bytes) -> tuple[str, np.ndarray]:
    """The inverse of `encode`; anything else is an error."""
    if len(data) < 4:
        raise ValueError("landmark record shorter than its header")
    (n,) = struct.unpack_from("<I", data)
    if len(data) != 4 + n + _FEATURE_BYTES:
        raise ValueError(f"landmark record of {len(data)} bytes does not match its id length {n}")
    key = data[4:4 + n].decode("utf-8")
    return key, np.frombuffer(data, dtype="<f4", offset=4 + n).astype(np.float32)


def _footer(count: int) -> bytes:
    return FOOTER_MAGIC + struct.pack("<Q", count)


def write_file(path: str | Path, items: Iterable[tuple[str, np.ndarray]]) -> int:
    """Writes `items` to `path` atomically (temporary name, fsync, rename); returns the count."""
    from array_record.python.array_record_module import ArrayRecordWriter

    count = 0
    with atomic_file(path) as tmp:
        writer = ArrayRecordWriter(str(tmp), WRITER_OPTIONS)
        try:
            for record_id, feature in items:
                writer.write(encode(record_id, feature))
                count += 1
            writer.write(_footer(count))
        finally:
            writer.close()
    return count


def iter_file(path: str | Path) -> Iterator[tuple[str, np.ndarray]]:
    """`(id, feature)` pairs of a complete landmark file, in file order."""
    from array_record.python.array_record_module import ArrayRecordReader

    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{path} is a folder, not a landmark file (FEATURES.array_record)")
    if not path.is_file():
        raise FileNotFoundError(f"landmark file {path} does not exist")
    incomplete = f"{path} is not a complete landmark file (truncated, or still being written)"
    try:
        reader = ArrayRecordReader(str(path))
        total = reader.num_records()
        footer = reader.read([total - 1])[0] if total else b""
    except RuntimeError:  # ArrayRecord's error for a damaged file
        raise ValueError(incomplete) from None
    try:
        if not footer.startswith(FOOTER_MAGIC) or struct.unpack("<Q", footer[len(FOOTER_MAGIC):])[0] != total - 1:
            raise ValueError(incomplete)
        step = 4096
        for start in range(0, total - 1, step):
            for data in reader.read(start, min(start + step, total - 1)):
                try:
                    yield decode(data)
                except ValueError as err:
                    raise ValueError(f"{path}: {err}") from None
    finally:
        try:
            reader.close()
        except RuntimeError:  # closing re-reports a damaged file; the footer check has spoken already
            pass


def read_landmarks(path: str | Path) -> dict[str, np.ndarray]:
    """All features of a landmark file, by record id (20k images: about 17 MB)."""
    out: dict[str, np.ndarray] = {}
    for record_id, feature in iter_file(path):
        if record_id in out:
            raise ValueError(f"{path}: record id {record_id} appears twice")
        out[record_id] = feature
    return out


class LandmarkTable:
    """Features of a landmark file as one `[N, 212]` array plus an id index: compact to pickle
    into data-loader workers, O(1) lookup."""

    def __init__(self, features: dict[str, np.ndarray], source: str = "landmarks"):
        self.source = source
        self.index = {key: i for i, key in enumerate(features)}
        self.array = (np.stack(list(features.values())).astype(np.float32) if features
                      else np.zeros((0, LANDMARK_DIM), np.float32))

    @classmethod
    def open(cls, path: str | Path) -> LandmarkTable:
        return cls(read_landmarks(path), source=str(path))

    def __contains__(self, record_id: str) -> bool:
        return record_id in self.index

    def __len__(self) -> int:
        return len(self.index)

    def get(self, record_id: str) -> np.ndarray:
        if record_id not in self.index:
            raise KeyError(f"record {record_id} has no landmark feature in {self.source}")
        return self.array[self.index[record_id]]
