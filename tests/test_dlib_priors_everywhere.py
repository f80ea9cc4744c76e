"""Every registered prior in `run.py analyze` and `run.py generate`: a model with the 2d106det, dlib68 and
dlib-face-descriptor priors, run on a real photograph; the feature each command used (the files it saves)
is the one dlib computes when called directly, and the landmark graph's by hand."""

import json
import subprocess
from pathlib import Path

import cv2
import numpy as np
import onnxruntime
import pytest
from PIL import Image

from emola_jax.data import dlib_models
from emola_jax.data.faces import CHIP_PADDING, CHIP_SIZE
from emola_jax.data.labels import AU_QUESTION, EMOTION_QUESTION
from tests.processes import RUN, cpu_env
from tests.test_precompute_landmarks import by_hand_official
from tests.test_priors import descriptor_by_hand, dlib68_by_hand

dlib = pytest.importorskip("dlib")
skimage_data = pytest.importorskip("skimage.data")

PRIORS = [{"name": "2d106det", "dim": 212}, {"name": "dlib68", "dim": 136},
          {"name": "dlib-face-descriptor", "dim": 128}]


def _run(*args, timeout=300) -> subprocess.CompletedProcess:
    return subprocess.run([*RUN, *map(str, args)], capture_output=True, text=True, env=cpu_env(1), timeout=timeout)


@pytest.fixture(scope="module")
def three_priors(demo_run, tmp_path_factory):
    """(checkpoint, landmark graph): the demo's run settings and base with all three priors, trained 2
    steps on 4 of its faces whose features `precompute-priors` wrote (the answers do not matter here,
    the features do; a whole demo would spend minutes on dlib's descriptors of every drawn face)."""
    workdir, demo = demo_run
    assert demo.returncode == 0, demo.stderr[-2000:]
    folder = tmp_path_factory.mktemp("three_priors")
    faces, graph = workdir / "faces", workdir / "landmark_model.onnx"
    records = json.loads((faces / "train_emotion_anno.json").read_text())[:4]
    (folder / "anno.json").write_text(json.dumps(records))
    files = []
    for prior in PRIORS:
        files.append(folder / f"{prior['name']}.array_record")
        model = ["--onnx", graph] if prior["name"] == "2d106det" else []
        done = _run("precompute-priors", "--prior", prior["name"], *model, "--annotations", folder / "anno.json",
                    "--images-root", faces, "--out", files[-1], "--no-progress")
        assert done.returncode == 0, done.stderr[-2000:]
    settings = {"model.priors": PRIORS, "data.annotations": [str(folder / "anno.json")],
                "data.landmarks": [str(f) for f in files], "data.batch_size": 4}
    done = _run("train", "--config", workdir / "run" / "experiment.json", "--workdir", folder / "run", "--steps", "2",
                *(a for key, value in settings.items() for a in ("--set", f"{key}={json.dumps(value)}")))
    assert done.returncode == 0, done.stderr[-3000:]
    return folder / "run" / "model", graph


def _by_dlib(bgr: np.ndarray, graph: Path, path: Path) -> dict[str, np.ndarray]:
    """Each prior of the whole image `bgr` (saved at `path`), computed here: dlib called directly, and the
    official landmark recipe written out."""
    session = onnxruntime.InferenceSession(str(graph), providers=["CPUExecutionProvider"])
    return {"2d106det": by_hand_official(session, path), "dlib68": dlib68_by_hand(bgr, None),
            "dlib-face-descriptor": descriptor_by_hand(bgr, None)}


def _assert_features(saved: dict[str, Path], expected: dict[str, np.ndarray]) -> None:
    assert list(saved) == [p["name"] for p in PRIORS]
    for name, path in saved.items():
        got = np.load(path)
        assert got.shape == (next(p["dim"] for p in PRIORS if p["name"] == name),)
        tolerance = 1e-5 if name == "2d106det" else 1e-6
        np.testing.assert_allclose(got, expected[name], rtol=0, atol=tolerance, err_msg=name)


def test_analyze_and_generate_compute_every_prior_as_dlib_does(three_priors, tmp_path):
    """analyze on the astronaut photograph: the aligned crop is dlib's face chip and each prior's saved
    feature is dlib's (and the graph's) on that crop. generate on the crop computes the same features
    (--save-prior) and gives analyze's AU answer: the saved features are what the model was fed."""
    checkpoint, graph = three_priors
    photo = tmp_path / "astronaut.png"
    Image.fromarray(skimage_data.astronaut()).save(photo)
    out = tmp_path / "out"
    done = _run("analyze", photo, "--ckpt", checkpoint, "--onnx", graph, "--out", out, "--min-score", "0.5",
                "--max-new-tokens", "8", "--batch-size", "1", "--no-progress")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "1 faces in 1 photos (0 without a face, 0 skipped)" in done.stdout
    [face] = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]

    rgb = skimage_data.astronaut()
    [rect] = [r for r, s in zip(*dlib.get_frontal_face_detector().run(rgb, 1, 0.0)[:2], strict=True) if s >= 0.5]
    shape = dlib.shape_predictor(str(dlib_models.model_path("shape5")))(rgb, rect)
    chip = np.asarray(dlib.get_face_chip(rgb, shape, size=CHIP_SIZE, padding=CHIP_PADDING))
    crop = out / face["crop"]
    np.testing.assert_array_equal(np.asarray(Image.open(crop)), chip)
    expected = _by_dlib(np.ascontiguousarray(chip[..., ::-1]), graph, crop)
    _assert_features({name: out / path for name, path in face["priors"].items()}, expected)

    # analyze asks both questions from one prefill of the face (the second from a copy of its cache):
    # generate, asking the second alone, gives the same answer
    again = _run("generate", checkpoint, "--image", crop, "--onnx", graph, "--prompt", AU_QUESTION,
                 "--max-new-tokens", "8", "--save-prior", tmp_path / "prior")
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.strip() == face["au_answer"]
    _assert_features({p["name"]: tmp_path / "prior" / f"{p['name']}.npy" for p in PRIORS}, expected)


def test_generate_needs_the_graph_of_2d106det_alone(three_priors, tmp_path):
    """The dlib priors need no option; 2d106det's graph missing is one line before the model loads."""
    checkpoint, _ = three_priors
    image = tmp_path / "face.png"
    cv2.imwrite(str(image), np.ascontiguousarray(skimage_data.astronaut()[50:190, 150:290, ::-1]))
    missing = _run("generate", checkpoint, "--image", image, "--prompt", EMOTION_QUESTION,
                   "--save-prior", tmp_path / "none")
    assert missing.returncode == 1 and missing.stdout == ""
    assert missing.stderr.strip().splitlines() == [
        "error: the model's priors (2d106det, dlib68, dlib-face-descriptor) include 2d106det, which runs a landmark "
        "model: give --onnx MODEL.onnx, or --prior-npy FILE.npy per prior"]
    assert not (tmp_path / "none").exists()
