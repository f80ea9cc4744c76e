"""Face priors: named extractors that turn a face image into the feature the prior token is made of.

A prior is its name, its output width and how to open its extractor. Registered here:

- `2d106det`: insightface's 106-point landmark graph (an ONNX file), 212 values, with the
  `official` (EmoLA's) or `insightface` recipe of `data/landmarks.py`.
- `dlib68`: dlib's 68-point shape predictor (iBUG 300-W points), 136 values: (x, y) interleaved,
  each point relative to the face box, `((x - x1) / (x2 - x1), (y - y1) / (y2 - y1))`, so that
  the feature does not depend on the image's size.
- `dlib-face-descriptor`: dlib's ResNet face recognition model, 128 values, on the face as
  `compute_face_descriptor` aligns it from dlib's 5-point shape predictor (dlib's own example
  pairs the two); default padding, no jitter, so the feature is deterministic.

Face boxes are `(x1, y1, x2, y2)` in pixels, right and bottom edges exclusive (insightface's
and the detectors' convention); dlib's inclusive rectangle is `(x1, y1, x2 - 1, y2 - 1)`. Without
a box the face is the whole image: dataset records are already aligned, cropped faces, the
official 2d106det recipe uses the whole image too, and a detector would silently lose the faces
it misses (drawn faces, tight crops) or pick another face; the whole image always exists, so a
record's feature never depends on whether a detector fired. A box is given for faces in ordinary
photographs (`run.py analyze` passes detected boxes).

Extraction runs in two stages so that `run.py precompute-priors` can overlap decoding with
inference: `prepare` (one image, thread-safe, may raise ValueError naming the image) and
`finish` (a list of prepared images -> `[N, dim]`, on one thread).

A record's feature is read back here too (`PriorFeatures`): from ArrayRecord files keyed by record
id (one per prior, the features concatenated in the model's order), or from the record's own
official `.npy` file. Training, the tfds builders, evaluation and `run.py generate` all fetch
features here, so where a feature comes from, and how a file is checked, is decided once.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from emola_jax.config import LANDMARK_DIM, PriorToken, is_official
from emola_jax.data import dlib_models, landmarks
from emola_jax.data.landmark_store import LandmarkTable
from emola_jax.settings import Recipe, choices

Box = tuple[float, float, float, float]


@dataclasses.dataclass(frozen=True)
class Prior:
    """A registered prior: `name`, output width `dim`, whether its extractor needs an ONNX file,
    the recipes it accepts (the first is the default) and how its extractor is opened."""

    name: str
    dim: int
    summary: str
    opener: Callable[..., Extractor] = dataclasses.field(repr=False, compare=False)
    needs_onnx: bool = False
    recipes: tuple[str, ...] = ("default",)


class Extractor:
    """Turns face images into `[N, dim]` float32 features of one prior."""

    prior: Prior
    recipe: str
    takes_box: bool = True  # False: the recipe always uses the whole image

    def prepare(self, bgr: np.ndarray, box: Box | None = None, name: str = "image") -> Any:
        """What `finish` needs of one BGR uint8 `[H, W, 3]` image (`name` is used in errors)."""
        raise NotImplementedError

    def finish(self, prepared: list) -> np.ndarray:
        """`[len(prepared), dim]` float32 features."""
        raise NotImplementedError

    @property
    def model_name(self) -> str:
        """What computes the feature, as errors name it."""
        return f"the {self.prior.name} extractor"

    def not_finite(self, feature: np.ndarray, name: str) -> str | None:
        """Why `feature` (one row of `finish`) may be neither stored nor fed to the model (NaN or
        infinite values: a broken or wrong model file, which no later step would notice), or None."""
        bad = int(np.size(feature) - np.isfinite(feature).sum())
        if not bad:
            return None
        return f"{name}: {self.model_name} gave {bad} NaN or infinite values of {np.size(feature)}"

    def features(self, images: Sequence[np.ndarray], boxes: Sequence[Box | None] | None = None,
                 names: Sequence[str] | None = None) -> np.ndarray:
        """`[N, dim]` features of N BGR uint8 `[H, W, 3]` images, one box (or None: the whole
        image) per image. ValueError naming the image (`names[i]`, else its index) when its face
        cannot be processed or its feature is not finite."""
        boxes = [None] * len(images) if boxes is None else list(boxes)
        names = [f"image {i}" for i in range(len(images))] if names is None else list(names)
        if not len(boxes) == len(names) == len(images):
            raise ValueError(f"{len(images)} images need as many boxes and names, not {len(boxes)} and {len(names)}")
        if not images:
            return np.zeros((0, self.prior.dim), np.float32)
        out = self.finish([self.prepare(b, box, n) for b, box, n in zip(images, boxes, names, strict=True)])
        for row, name in zip(out, names, strict=True):
            if (problem := self.not_finite(row, name)) is not None:
                raise ValueError(problem)
        return out

    def file_features(self, paths: Sequence[str | Path], boxes: Sequence[Box | None] | None = None) -> np.ndarray:
        """`[N, dim]` features of image files (read as `landmarks.read_bgr` reads them)."""
        return self.features([landmarks.read_bgr(p) for p in paths], boxes, [str(p) for p in paths])


def check_box(box: Box | None, shape: tuple[int, ...], name: str) -> Box:
    """`box` as floats, or the whole image for None; ValueError naming `name` for an empty box, a
    box wholly outside the image (a model would fit a face to padding) or an image too small to
    hold a face."""
    height, width = shape[:2]
    if height < 8 or width < 8:
        raise ValueError(f"{name}: an image of {width}x{height} pixels is too small for a face")
    if box is None:
        return (0.0, 0.0, float(width), float(height))
    if len(box) != 4 or not all(np.isfinite(v) for v in box):
        raise ValueError(f"{name}: a face box is (x1, y1, x2, y2), not {box!r}")
    x1, y1, x2, y2 = map(float, box)
    if x2 - x1 < 2 or y2 - y1 < 2:
        raise ValueError(f"{name}: face box {box!r} is empty (x2 must exceed x1 and y2 exceed y1)")
    if x2 <= 0 or y2 <= 0 or x1 >= width or y1 >= height:  # a box may reach past an edge, as detectors' do
        raise ValueError(f"{name}: face box {box!r} lies wholly outside the {width}x{height} image")
    return (x1, y1, x2, y2)


class LandmarkGraph(Extractor):
    """2d106det (or any graph with its signature) through `data/landmarks.py`."""

    def __init__(self, prior: Prior, onnx: str | Path | None = None, recipe: str = "official",
                 threads: int | None = None):
        if onnx is None:
            raise ValueError(f"the {prior.name} prior runs an ONNX graph: give its file (2d106det.onnx)")
        self.prior, self.recipe, self.takes_box = prior, recipe, recipe != "official"
        self.session = landmarks.open_session(onnx, threads, spinning=False)  # decoding threads need the cores
        self.normalisation = landmarks.graph_normalisation(onnx) if recipe == "insightface" else None

    @property
    def model_name(self) -> str:
        return f"the landmark model {self.session.source}"

    def prepare(self, bgr, box=None, name="image"):
        if self.recipe == "official":
            if box is not None:
                raise ValueError(f"{name}: the official 2d106det recipe resizes the whole image and takes no face "
                                 "box; crop the face first or use the insightface recipe")
            return landmarks.official_array(bgr), None
        if box is not None:
            check_box(box, bgr.shape, name)
        prepared = landmarks.insightface_array(bgr, *self.normalisation, bbox=box)
        return prepared.blob, prepared.inverse

    def finish(self, prepared):
        outputs = landmarks.run_session(self.session, np.stack([blob for blob, _ in prepared]))
        if self.recipe == "insightface":
            outputs = np.stack([landmarks.insightface_points(o, inverse)
                                for o, (_, inverse) in zip(outputs, prepared, strict=True)])
        return outputs


def _dlib_shape(bgr: np.ndarray, box: Box | None, name: str, points: int):
    """dlib's `points`-point shape of the face in `box`: `(rgb, shape, box)`."""
    box = check_box(box, bgr.shape, name)
    rgb = np.ascontiguousarray(bgr[..., ::-1])
    rect = dlib_models.rectangle((box[0], box[1], box[2] - 1, box[3] - 1))
    try:
        shape = dlib_models.shape_predictor(points)(rgb, rect)
    except RuntimeError as err:  # dlib's own error type
        raise ValueError(f"{name}: dlib's shape predictor failed on face box {box}: {err}") from None
    return rgb, shape, box


class Dlib68(Extractor):
    """dlib's 68-point shape predictor, points relative to the face box (see the module's doc)."""

    model_name = "dlib's 68-point shape predictor"

    def __init__(self, prior: Prior, onnx=None, recipe: str = "default", threads=None):
        self.prior, self.recipe = prior, recipe

    def prepare(self, bgr, box=None, name="image"):
        _, shape, (x1, y1, x2, y2) = _dlib_shape(bgr, box, name, 68)
        points = np.array([(p.x, p.y) for p in shape.parts()], np.float64)
        points = (points - (x1, y1)) / (x2 - x1, y2 - y1)
        return points.astype(np.float32).reshape(-1)

    def finish(self, prepared):
        return np.stack(prepared).astype(np.float32)


class DlibFaceDescriptor(Extractor):
    """dlib's ResNet face descriptor on the face aligned from 5 shape points."""

    model_name = "dlib's face recognition model"

    def __init__(self, prior: Prior, onnx=None, recipe: str = "default", threads=None):
        self.prior, self.recipe = prior, recipe
        self.network = dlib_models.face_recognition_model()

    def prepare(self, bgr, box=None, name="image"):
        rgb, shape, _ = _dlib_shape(bgr, box, name, 5)  # the shape predictor is safe across threads
        return rgb, shape, name

    def finish(self, prepared):
        out = []
        with dlib_models.FACE_RECOGNITION_LOCK:  # the network keeps its activations in itself
            for rgb, shape, name in prepared:
                try:
                    descriptor = np.asarray(self.network.compute_face_descriptor(rgb, shape), np.float32)
                except RuntimeError as err:
                    raise ValueError(f"{name}: dlib's face recognition model failed: {err}") from None
                if descriptor.shape != (self.prior.dim,):  # non-finite values: refused per image by the callers
                    raise ValueError(f"{name}: dlib's face recognition model gave no {self.prior.dim}-value descriptor")
                out.append(descriptor)
        return np.stack(out)


PRIORS: dict[str, Prior] = {prior.name: prior for prior in (
    Prior("2d106det", LANDMARK_DIM, "insightface's 106 landmarks (ONNX graph), raw output or image pixels",
          LandmarkGraph, needs_onnx=True, recipes=choices(Recipe)),
    Prior("dlib68", 136, "dlib's 68 landmarks, (x, y) interleaved, relative to the face box", Dlib68),
    Prior("dlib-face-descriptor", 128, "dlib's ResNet face recognition descriptor (5-point alignment)",
          DlibFaceDescriptor),
)}


def get(name: str) -> Prior:
    """The registered prior `name`; ValueError listing the known ones otherwise."""
    if name not in PRIORS:
        raise ValueError(f"unknown face prior {name!r}; known: {', '.join(PRIORS)}")
    return PRIORS[name]


def open_extractor(name: str, *, onnx: str | Path | None = None, recipe: str | None = None,
                   threads: int | None = None) -> Extractor:
    """An extractor of prior `name`. `onnx`: the graph file of a prior that runs one (required
    there, refused elsewhere); `recipe`: one of the prior's recipes (default: its first);
    `threads`: onnxruntime's intra-op threads. ValueError for anything else."""
    prior = get(name)
    recipe = recipe or prior.recipes[0]
    if recipe not in prior.recipes:
        raise ValueError(f"the {name} prior's recipes are {', '.join(prior.recipes)}, not {recipe!r}")
    if onnx is not None and not prior.needs_onnx:
        raise ValueError(f"the {name} prior runs dlib's own model and takes no ONNX file")
    return prior.opener(prior, onnx=onnx, recipe=recipe, threads=threads)


# --- the feature of a record, or of an image outside any record ---------------------------------

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
            if tuple(priors) != (PriorToken(),):
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
                    what = "landmark" if is_official(table.info.prior) else table.info.prior
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
    priors = tuple(priors) if priors is not None else (PriorToken(),)
    if npy is not None and onnx is not None:
        raise ValueError("give landmark files or a landmark model, not both")
    if npy is not None:
        files = [npy] if isinstance(npy, (str, os.PathLike)) else list(npy)
        if len(files) != len(priors):
            raise ValueError(f"the model's priors are {', '.join(p.name for p in priors)}: give {len(priors)} .npy "
                             f"file(s), one per prior in that order, not {len(files)}")
        return np.concatenate([read_npy(f, dim=p.dim) for f, p in zip(files, priors, strict=True)])
    if onnx is None and any(get(p.name).needs_onnx for p in priors):
        return None
    return np.concatenate([e.file_features([image])[0] for e in open_extractors(priors, onnx)])


def open_extractors(priors: Sequence[PriorToken], onnx: str | Path | None = None) -> list:
    """One `Extractor` per prior of a model config, in its order; `onnx`
    is the landmark graph of the prior that runs one. ValueError when it is missing, not wanted,
    or when an extractor's width differs from the config's."""
    needs_onnx = [p.name for p in priors if get(p.name).needs_onnx]
    if onnx is None and needs_onnx:
        raise ValueError(f"the model's {', '.join(needs_onnx)} prior runs a landmark model: give --onnx MODEL.onnx")
    if onnx is not None and not needs_onnx:
        raise ValueError(f"the model's priors ({', '.join(p.name for p in priors)}) run no ONNX model")
    extractors = []
    for prior in priors:
        extractor = open_extractor(prior.name, onnx=onnx if prior.name in needs_onnx else None)
        if extractor.prior.dim != prior.dim:
            raise ValueError(f"the model's {prior.name} prior is {prior.dim} values wide, its extractor gives "
                             f"{extractor.prior.dim}")
        extractors.append(extractor)
    return extractors
