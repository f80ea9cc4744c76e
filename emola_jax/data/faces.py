"""Faces in ordinary photos, found and aligned as FABA-Instruct's images were made.

The paper aligned and cropped its AffectNet faces "using the Dlib library"; the model has only
seen such crops. A photo's faces are found by a detector (dlib's HOG detector by default, its CNN
detector, or insightface's when its model pack is installed), located by dlib's 5-point shape
predictor, and cut out by dlib's own face-chip alignment (`dlib.get_face_chip`: eyes level, the
face scaled to a fixed share of the crop).

Crop defaults: dlib's own default padding, 0.25, is what "aligned and cropped with dlib" gives
unless one chose otherwise, and it leaves the whole face from brows to chin in the crop as
AffectNet's crops do; the size is CLIP's 336 pixels, so that the chip is resampled once (by dlib)
and not again by CLIP's resize. The released images' own size cannot tell more: the model resizes
whatever it gets to 336 (CLIP) and 192 (landmarks).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import threading
from pathlib import Path

import numpy as np

from emola_jax.data import dlib_models
from emola_jax.settings import Detector, check_choice

CHIP_SIZE = 336
CHIP_PADDING = 0.25


@dataclasses.dataclass(frozen=True)
class Detection:
    """A face box in photo pixels, `(left, top, right, bottom)` as dlib gives it (inclusive
    corners, possibly beyond the photo's edge), and the detector's score (HOG: SVM margin; CNN and
    insightface: confidence)."""

    box: tuple[int, int, int, int]
    score: float

    @property
    def area(self) -> int:
        left, top, right, bottom = self.box
        return (right - left + 1) * (bottom - top + 1)


@dataclasses.dataclass(frozen=True)
class Face:
    """A detected face, its 5 dlib points `[5, 2]` (x, y pixels) and its aligned crop `[size, size, 3]`."""

    detection: Detection
    points: np.ndarray
    chip: np.ndarray


class FaceFinder:
    """Detection and alignment with fixed settings; `find(rgb)` gives the faces of one photo,
    largest first; every method may be called from several threads. Raises ImportError (naming
    the extra to install) when dlib or its models are missing, ValueError for settings out of
    range."""

    def __init__(self, detector: str = "hog", *, upsample: int = 1, chip_size: int = CHIP_SIZE,
                 chip_padding: float = CHIP_PADDING, max_faces: int | None = None,
                 insightface_pack: str = "buffalo_l", insightface_root: str | Path = "~/.insightface"):
        check_choice(detector, Detector, "detector")
        if upsample < 0:
            raise ValueError(f"upsample must be 0 or more, not {upsample}")
        if chip_size < 32:
            raise ValueError(f"chip size must be at least 32 pixels, not {chip_size}")
        if not 0 <= chip_padding <= 2:
            raise ValueError(f"chip padding must lie in [0, 2] (a share of the face's size), not {chip_padding}")
        if max_faces is not None and max_faces < 1:
            raise ValueError(f"max faces must be at least 1, not {max_faces}")
        self.detector, self.upsample = detector, upsample
        self.chip_size, self.chip_padding, self.max_faces = chip_size, chip_padding, max_faces
        self._dlib = dlib_models.dlib()
        self._shape = dlib_models.shape_predictor(5)
        self._local = threading.local()  # each thread's own dlib detector
        if detector == "insightface":  # onnxruntime sessions may be shared between threads
            self._insightface = insightface_detector(insightface_pack, insightface_root)
        else:
            self._dlib_detector()  # loaded now: a missing model is an error before any photo

    def detect(self, rgb: np.ndarray) -> list[Detection]:
        """Faces of `rgb` `[height, width, 3]` uint8, largest first, at most `max_faces`. May be
        called from several threads."""
        rgb = np.ascontiguousarray(rgb)
        if self.detector == "hog":
            rects, scores, _ = self._dlib_detector().run(rgb, self.upsample, 0.0)
            found = [Detection(_box(r), float(s)) for r, s in zip(rects, scores, strict=True)]
        elif self.detector == "cnn":
            found = [Detection(_box(d.rect), float(d.confidence)) for d in self._dlib_detector()(rgb, self.upsample)]
        else:
            faces = self._insightface.get(np.ascontiguousarray(rgb[..., ::-1]))  # insightface takes BGR
            found = [Detection(tuple(int(round(v)) for v in f.bbox), float(f.det_score)) for f in faces]
        found.sort(key=lambda d: -d.area)
        return found[: self.max_faces] if self.max_faces else found

    def _dlib_detector(self):
        if not hasattr(self._local, "detector"):
            make = dlib_models.hog_detector if self.detector == "hog" else dlib_models.cnn_detector
            self._local.detector = make()
        return self._local.detector

    def align(self, rgb: np.ndarray, detection: Detection) -> Face:
        """dlib's 5 points inside the box and dlib's face chip of them."""
        shape = self._shape(rgb, dlib_models.rectangle(detection.box))
        points = np.asarray([(p.x, p.y) for p in shape.parts()], np.float32)
        chip = self._dlib.get_face_chip(rgb, shape, size=self.chip_size, padding=self.chip_padding)
        return Face(detection, points, np.asarray(chip))

    def find(self, rgb: np.ndarray) -> list[Face]:
        return [self.align(rgb, d) for d in self.detect(rgb)]


def _box(rect) -> tuple[int, int, int, int]:
    return int(rect.left()), int(rect.top()), int(rect.right()), int(rect.bottom())


def insightface_detector(pack: str = "buffalo_l", root: str | Path = "~/.insightface"):
    """insightface's detector from an installed model pack (`ROOT/models/PACK`, holding a
    detection `.onnx`). insightface would download a missing pack; offline that fails deep inside,
    so a missing pack is a FileNotFoundError saying where it was looked for."""
    if importlib.util.find_spec("insightface") is None:
        raise ImportError(f"insightface is not installed: {dlib_models.INSTALL_HINT}")
    folder = Path(root).expanduser() / "models" / pack
    if not folder.is_dir() or not any(folder.glob("*.onnx")):
        raise FileNotFoundError(f"insightface model pack {pack!r} is not installed at {folder}: unpack {pack}.zip "
                                "there, or use the dlib detectors (--detector hog or cnn)")
    # deferred: start-up time (insightface)
    from insightface.app import FaceAnalysis

    app = FaceAnalysis(name=pack, root=str(Path(root).expanduser()), allowed_modules=["detection"],
                       providers=["CPUExecutionProvider"])
    app.prepare(ctx_id=-1, det_size=(640, 640))
    return app
