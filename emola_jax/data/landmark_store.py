"""Prior features keyed by record id, in one ArrayRecord file.

Record encoding (little-endian), one record per image:

    uint32 n | n bytes: the record id, UTF-8 | dim x float32: the feature

The last record of a file is a footer, `FOOTER_MAGIC`, a uint64 count of the records before it,
then UTF-8 JSON `{"prior": name, "dim": dim, "recipe": ...}` naming the prior (`data/priors.py`)
whose features the file holds. ArrayRecord opens a truncated file without complaint (it reports
zero records), so the footer is what tells a complete file from a partial one: `read_landmarks`
refuses a file without it. A footer without the JSON (files written before priors were
pluggable) means 2d106det, 212 values. Readers that are told which prior they want refuse a
file of another prior or width. Files are written under a temporary name and renamed into
place, so a file under its final name is always complete.
"""

from __future__ import annotations

import dataclasses
import json
import struct
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
from array_record.python.array_record_module import ArrayRecordReader, ArrayRecordWriter

from emola_jax.atomic import atomic_file
from emola_jax.config import DEFAULT_PRIOR, LANDMARK_DIM

FOOTER_MAGIC = b"\x00emola-jax landmarks end\x00"
# group_size 1: every record is its own chunk, so a lookup decodes only that record
WRITER_OPTIONS = "group_size:1"


@dataclasses.dataclass(frozen=True)
class StoreInfo:
    """What a file's footer says: the prior (`data/priors.py` name), its width, the recipe that
    made it (informative, None when unknown) and the record count. A footer that names no prior
    (an older file) says 2d106det, 212 values."""

    prior: str = DEFAULT_PRIOR
    dim: int = LANDMARK_DIM
    recipe: str | None = None
    count: int = 0

    def check(self, path: str | Path, prior: str | None, dim: int | None) -> None:
        """ValueError in one sentence naming `path` unless it holds `prior` features of `dim` values
        (None: either is accepted)."""
        if (prior is not None and prior != self.prior) or (dim is not None and dim != self.dim):
            wanted = " of ".join(x for x in (f"{prior!r} features" if prior else "", f"{dim} values" if dim else "")
                                 if x)
            raise ValueError(f"{path} holds {self.prior!r} features of {self.dim} values, not {wanted}")


def encode(record_id: str, feature: np.ndarray, dim: int = LANDMARK_DIM) -> bytes:
    """One record: the id (length-prefixed UTF-8) and the `dim` float32 values."""
    feature = np.asarray(feature, dtype="<f4").reshape(-1)
    if feature.shape != (dim,):
        raise ValueError(f"record {record_id}: a prior feature has {dim} values, not {feature.size}")
    key = record_id.encode("utf-8")
    return struct.pack("<I", len(key)) + key + feature.tobytes()


def decode(data: bytes, dim: int = LANDMARK_DIM) -> tuple[str, np.ndarray]:
    """The inverse of `encode`; anything else is an error."""
    if len(data) < 4:
        raise ValueError("landmark record shorter than its header")
    (n,) = struct.unpack_from("<I", data)
    if len(data) != 4 + n + 4 * dim:
        raise ValueError(f"landmark record of {len(data)} bytes does not match its id length {n}")
    key = data[4:4 + n].decode("utf-8")
    return key, np.frombuffer(data, dtype="<f4", offset=4 + n).astype(np.float32)


def _footer(count: int, prior: str, dim: int, recipe: str | None) -> bytes:
    fields = json.dumps({"prior": prior, "dim": dim, "recipe": recipe}, sort_keys=True).encode("utf-8")
    return FOOTER_MAGIC + struct.pack("<Q", count) + fields


def _parse_footer(footer: bytes, total: int) -> StoreInfo | None:
    """The footer's information, or None when `footer` is not the footer of `total` records."""
    start = len(FOOTER_MAGIC) + 8
    if not footer.startswith(FOOTER_MAGIC) or len(footer) < start:
        return None
    if struct.unpack("<Q", footer[len(FOOTER_MAGIC):start])[0] != total - 1:
        return None
    if len(footer) == start:
        return StoreInfo(count=total - 1)
    try:
        fields = json.loads(footer[start:].decode("utf-8"))
        info = StoreInfo(str(fields["prior"]), int(fields["dim"]), fields.get("recipe"), total - 1)
    except (ValueError, KeyError, TypeError):
        return None
    return info if info.dim >= 1 else None


def write_file(path: str | Path, items: Iterable[tuple[str, np.ndarray]], *, prior: str = DEFAULT_PRIOR,
               dim: int = LANDMARK_DIM, recipe: str | None = None) -> int:
    """Writes `items` (features of `dim` values of prior `prior`) to `path` atomically (temporary
    name, fsync, rename); returns the count."""
    count = 0
    with atomic_file(path) as tmp:
        writer = ArrayRecordWriter(str(tmp), WRITER_OPTIONS)
        try:
            for record_id, feature in items:
                writer.write(encode(record_id, feature, dim))
                count += 1
            writer.write(_footer(count, prior, dim, recipe))
        finally:
            writer.close()
    return count


def read_info(path: str | Path) -> StoreInfo:
    """The footer of a complete landmark file (its prior, width and count); ValueError naming it
    when it is incomplete, FileNotFoundError when it is missing."""
    reader, info = _open(Path(path))
    _close(reader)
    return info


def _open(path: Path):
    if path.is_dir():
        raise ValueError(f"{path} is a folder, not a landmark file (FEATURES.array_record)")
    if not path.is_file():
        raise FileNotFoundError(f"landmark file {path} does not exist")
    incomplete = f"{path} is not a complete landmark file (truncated, damaged, or still being written)"
    try:
        reader = ArrayRecordReader(str(path))
        total = reader.num_records()
        footer = reader.read([total - 1])[0] if total else b""
    except RuntimeError:  # ArrayRecord's error for a damaged file
        raise ValueError(incomplete) from None
    info = _parse_footer(footer, total)
    if info is None:
        _close(reader)
        raise ValueError(incomplete)
    return reader, info


def _close(reader) -> None:
    try:
        reader.close()
    except RuntimeError:  # closing re-reports a damaged file; the footer check has spoken already
        pass


def iter_file(path: str | Path, prior: str | None = None, dim: int | None = None) -> Iterator[tuple[str, np.ndarray]]:
    """`(id, feature)` pairs of a complete landmark file, in file order; with `prior` / `dim`, a
    file whose footer names another prior or width is a ValueError naming it."""
    path = Path(path)
    reader, info = _open(path)
    try:
        info.check(path, prior, dim)
        step = 4096
        for start in range(0, info.count, step):
            try:
                chunk = reader.read(start, min(start + step, info.count))
            except RuntimeError as err:  # a checksum that does not match: bytes changed on disk
                raise ValueError(f"{path} is damaged ({str(err).split(';')[0]}, in records {start} to "
                                 f"{min(start + step, info.count) - 1}); write it again (run.py precompute-priors)"
                                 ) from None
            for data in chunk:
                try:
                    yield decode(data, info.dim)
                except ValueError as err:
                    raise ValueError(f"{path}: {err}") from None
    finally:
        _close(reader)


def read_landmarks(path: str | Path, prior: str | None = None, dim: int | None = None) -> dict[str, np.ndarray]:
    """All features of a landmark file, by record id (20k images of 2d106det: about 17 MB); `prior`
    and `dim` as `iter_file` checks them."""
    out: dict[str, np.ndarray] = {}
    for record_id, feature in iter_file(path, prior, dim):
        if record_id in out:
            raise ValueError(f"{path}: record id {record_id} appears twice")
        out[record_id] = feature
    return out


class LandmarkTable:
    """Features of a landmark file as one `[N, dim]` array plus an id index: compact to pickle
    into data-loader workers, O(1) lookup. `info` is the file's footer."""

    def __init__(self, features: dict[str, np.ndarray], source: str = "landmarks", info: StoreInfo | None = None):
        self.source, self.info = source, info or StoreInfo(count=len(features))
        self.index = {key: i for i, key in enumerate(features)}
        self.array = (np.stack(list(features.values())).astype(np.float32) if features
                      else np.zeros((0, self.info.dim), np.float32))

    @classmethod
    def open(cls, path: str | Path, prior: str | None = None, dim: int | None = None) -> LandmarkTable:
        """The table of `path`, checked as `iter_file` checks it."""
        return cls(read_landmarks(path, prior, dim), source=str(path), info=read_info(path))

    def __contains__(self, record_id: str) -> bool:
        return record_id in self.index

    def __len__(self) -> int:
        return len(self.index)

    def get(self, record_id: str) -> np.ndarray:
        if record_id not in self.index:
            raise KeyError(f"record {record_id} has no landmark feature in {self.source}")
        return self.array[self.index[record_id]]
