"""The prior feature of a record: from an ArrayRecord file keyed by record id, from the record's own
official `.npy` file, or none.

Training, the tfds builders, evaluation and `run.py generate` all fetch features here, so where
a feature comes from, and how a file is checked, is decided once.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from emola_jax.config import LANDMARK_DIM
from emola_jax.data.landmark_store import LandmarkTable


def read_npy(path: str | Path, record_id: str | None = None, error: type[Exception] = ValueError) -> np.ndarray:
    """One official `.npy` prior feature (212 values), or `error` naming the file (and the record)."""
    whose = f"record {record_id}: " if record_id is not None else ""
    try:
        feature = np.load(path, allow_pickle=False).astype(np.float32).reshape(-1)
    except (OSError, ValueError, EOFError) as err:
        raise error(f"{whose}landmark file {path} could not be read: {err}") from None
    if feature.shape != (LANDMARK_DIM,):
        raise error(f"{whose}landmark file {path} holds {feature.size} values, not {LANDMARK_DIM}")
    return feature


class PriorFeatures:
    """Records' prior features: from `table` (an ArrayRecord file from `precompute-landmarks`) when
    one is given, else from each record's own `.npy` file. Errors are `error` (the pipeline and the
    builders pass `BadRecord`, so that a record without a feature can be skipped)."""

    def __init__(self, table: LandmarkTable | None = None, error: type[Exception] = ValueError):
        self.table, self.error = table, error

    @classmethod
    def open(cls, landmarks: str | Path | None, error: type[Exception] = ValueError) -> PriorFeatures:
        return cls(LandmarkTable.open(landmarks) if landmarks is not None else None, error)

    def get(self, record_id: str, landmark=None, root: str | Path | None = None, *,
            optional: bool = False) -> np.ndarray | None:
        """The feature of record `record_id`. With a table it comes from there (a record missing
        from it is an error); else from `landmark`, the record's `.npy` path (relative to `root`
        when given; anything but a path means the record names none). A record with neither is an
        error, or None when `optional`."""
        if self.table is not None:
            if record_id not in self.table:
                raise self.error(f"record {record_id} has no landmark feature in {self.table.source}")
            return self.table.get(record_id)
        if isinstance(landmark, (str, os.PathLike)):
            return read_npy(Path(root) / landmark if root is not None else Path(landmark), record_id, self.error)
        if optional:
            return None
        raise self.error(f"record {record_id} has no landmark path (and no landmark ArrayRecord file was given)")


def image_feature(image: str | Path, *, npy: str | Path | None = None, onnx: str | Path | None = None
                  ) -> np.ndarray | None:
    """The prior feature of one image outside any record: read from its `.npy` file, computed by a
    landmark model (`onnx`) with the official recipe, or None when neither is given."""
    if npy is not None and onnx is not None:
        raise ValueError("give a landmark file or a landmark model, not both")
    if npy is not None:
        return read_npy(npy)
    if onnx is not None:
        from emola_jax.data import landmarks

        return landmarks.official_features(landmarks.open_session(onnx), [image])[0]
    return None
