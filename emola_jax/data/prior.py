"""The prior feature of a record: from ArrayRecord files keyed by record id (one per prior, the
features concatenated in the model's order), from the record's own official `.npy` file, or none.

Training, the tfds builders, evaluation and `run.py generate` all fetch features here, so where
a feature comes from, and how a file is checked, is decided once.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from emola_jax.config import DEFAULT_PRIOR, LANDMARK_DIM, PriorToken
from emola_jax.data.landmark_store import LandmarkTable


def read_npy(path: str | Path, record_id: str | None = None, error: type[Exception] = ValueError,
             dim: int = LANDMARK_DIM) -> np.ndarray:
    """One `.npy` prior feature of `dim` values (official: 212), or `error` naming the file (and
    the record)."""
    whose = f"record {record_id}: " if record_id is not None else ""
    try:
        feature = np.load(path, allow_pickle=False).astype(np.float32).reshape(-1)
    except (OSError, ValueError, EOFError) as err:
        raise error(f"{whose}landmark file {path} could not be read: {err}") from None
    if feature.shape != (dim,):
        raise error(f"{whose}landmark file {path} holds {feature.size} values, not {dim}")
    if not np.isfinite(feature).all():
        raise error(f"{whose}landmark file {path} holds {int((~np.isfinite(feature)).sum())} values that are NaN or "
                    "infinite; a landmark feature is finite")
    return feature


class PriorFeatures:
    """Records' prior features: from `tables` (ArrayRecord files from `precompute-priors`, one per
    prior, in the model's order; a record's feature is theirs concatenated) when given, else from
    each record's own `.npy` file (2d106det features). Errors are `error` (the pipeline and the
    builders pass `BadRecord`, so that a record without a feature can be skipped)."""

    def __init__(self, tables: LandmarkTable | Sequence[LandmarkTable] = (), error: type[Exception] = ValueError):
        self.tables = (tables,) if isinstance(tables, LandmarkTable) else tuple(tables)
        self.error = error

    @property
    def table(self) -> LandmarkTable | None:
        """The first table, or None when features come from `.npy` files."""
        return self.tables[0] if self.tables else None

    @classmethod
    def open(cls, landmarks: str | Path | Sequence[str | Path] | None, error: type[Exception] = ValueError,
             priors: Sequence[PriorToken] | None = None) -> PriorFeatures:
        """Features from the files `landmarks` (one path or several; None or empty: `.npy` files).
        With `priors` (a model config's), the files must be one per prior, in that order, each
        holding that prior's features of its width; `.npy` files serve the one 2d106det prior
        only. ValueError (in one sentence naming the file) otherwise."""
        paths = [] if landmarks is None else [landmarks] if isinstance(landmarks, (str, os.PathLike)) else list(
            landmarks)
        if priors is None:
            return cls([LandmarkTable.open(path) for path in paths], error)
        names = ", ".join(p.name for p in priors)
        if not paths:
            if tuple(priors) != (PriorToken(DEFAULT_PRIOR, LANDMARK_DIM),):
                raise ValueError(f"the model's priors ({names}) need their feature files (run.py precompute-priors), "
                                 "one per prior in that order; records' .npy files hold 2d106det features only")
            return cls((), error)
        if len(paths) != len(priors):
            raise ValueError(f"the model's priors are {names}: give {len(priors)} feature file(s), one per prior in "
                             f"that order, not {len(paths)}")
        return cls([LandmarkTable.open(path, p.name, p.dim) for path, p in zip(paths, priors, strict=True)], error)

    @property
    def dim(self) -> int:
        """Width of the concatenated feature."""
        return sum(t.info.dim for t in self.tables) if self.tables else LANDMARK_DIM

    def get(self, record_id: str, landmark=None, root: str | Path | None = None, *,
            optional: bool = False) -> np.ndarray | None:
        """The `[dim]` feature of record `record_id`. With tables it is theirs concatenated (a
        record missing from one is an error naming it); else from `landmark`, the record's `.npy`
        path (relative to `root` when given; anything but a path means the record names none). A
        record with neither is an error, or None when `optional`."""
        if self.tables:
            for table in self.tables:
                if record_id not in table:
                    what = "landmark" if table.info.prior == DEFAULT_PRIOR else table.info.prior
                    raise self.error(f"record {record_id} has no {what} feature in {table.source}")
            return np.concatenate([table.get(record_id) for table in self.tables])
        if isinstance(landmark, (str, os.PathLike)):
            return read_npy(Path(root) / landmark if root is not None else Path(landmark), record_id, self.error)
        if optional:
            return None
        raise self.error(f"record {record_id} has no landmark path (and no landmark ArrayRecord file was given)")


def image_feature(image: str | Path, *, npy: str | Path | Sequence[str | Path] | None = None,
                  onnx: str | Path | None = None, priors: Sequence[PriorToken] | None = None) -> np.ndarray | None:
    """The `[sum of dims]` prior feature of one image outside any record, for `priors` (a model
    config's; default: one 2d106det prior): read from `.npy` files (one per prior, in order), or
    computed on the whole image, 2d106det with the landmark model `onnx` and the official recipe,
    the dlib priors with dlib; None when no file is given and a prior needs the model. ValueError
    naming the file, or the prior, otherwise."""
    from emola_jax.data import priors as registry

    priors = tuple(priors) if priors is not None else (PriorToken(DEFAULT_PRIOR, LANDMARK_DIM),)
    if npy is not None and onnx is not None:
        raise ValueError("give landmark files or a landmark model, not both")
    if npy is not None:
        files = [npy] if isinstance(npy, (str, os.PathLike)) else list(npy)
        if len(files) != len(priors):
            raise ValueError(f"the model's priors are {', '.join(p.name for p in priors)}: give {len(priors)} .npy "
                             f"file(s), one per prior in that order, not {len(files)}")
        return np.concatenate([read_npy(f, dim=p.dim) for f, p in zip(files, priors, strict=True)])
    if onnx is None and any(registry.get(p.name).needs_onnx for p in priors):
        return None
    return np.concatenate([e.file_features([image])[0] for e in open_extractors(priors, onnx)])


def open_extractors(priors: Sequence[PriorToken], onnx: str | Path | None = None) -> list:
    """One extractor (`data.priors.Extractor`) per prior of a model config, in its order; `onnx`
    is the landmark graph of the prior that runs one. ValueError when it is missing, not wanted,
    or when an extractor's width differs from the config's."""
    from emola_jax.data import priors as registry

    needs_onnx = [p.name for p in priors if registry.get(p.name).needs_onnx]
    if onnx is None and needs_onnx:
        raise ValueError(f"the model's {', '.join(needs_onnx)} prior runs a landmark model: give --onnx MODEL.onnx")
    if onnx is not None and not needs_onnx:
        raise ValueError(f"the model's priors ({', '.join(p.name for p in priors)}) run no ONNX model")
    extractors = []
    for prior in priors:
        extractor = registry.open_extractor(prior.name, onnx=onnx if prior.name in needs_onnx else None)
        if extractor.prior.dim != prior.dim:
            raise ValueError(f"the model's {prior.name} prior is {prior.dim} values wide, its extractor gives "
                             f"{extractor.prior.dim}")
        extractors.append(extractor)
    return extractors
