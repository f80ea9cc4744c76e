"""`precompute-landmarks`: features equal the graph run by hand (batch 1) for both recipes, bad images
are listed and skipped, a killed run resumes without redoing or losing work, `.npy` trees import."""

import importlib.metadata
import json
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import onnxruntime
import pytest

from emola_jax.apps.demo_models import toy_landmark_graph
from emola_jax.data import landmark_store, landmarks, precompute

ROOT = Path(__file__).resolve().parent.parent


def make_images(directory: Path, count: int, seed: int = 1) -> list[dict]:
    """Smooth random images of several sizes and formats, with FABA-style records."""
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    records = []
    for i in range(count):
        h, w = [(120, 90), (192, 192), (64, 300), (250, 200)][i % 4]
        small = rng.integers(0, 255, (h // 8 + 1, w // 8 + 1, 3), dtype=np.uint8)
        pixels = cv2.resize(small, (w, h), interpolation=cv2.INTER_CUBIC)
        name = f"img_{i}.{'png' if i % 3 == 0 else 'jpg'}"
        cv2.imwrite(str(directory / name), pixels)
        turns = [{"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "A."}]
        records.append({"id": f"r{i}", "image": f"images/{name}", "landmark": f"landmarks/r{i}.npy",
                        "conversations": turns})
    return records


def by_hand_official(session, path: Path) -> np.ndarray:
    """The official EmoLA loop for one image: cv2.imread, resize, /255, CHW, batch 1."""
    image = cv2.resize(cv2.imread(str(path)), (192, 192)).astype(np.float32) / 255.0
    name = session.get_inputs()[0].name
    return session.run(None, {name: image.transpose(2, 0, 1)[None]})[0][0]


def by_hand_insightface(session, path: Path, mean: float, std: float, bbox=None) -> np.ndarray:
    """insightface's Landmark.get written out: skimage's similarity chain as 3x3 matrices, warpAffine,
    blobFromImage(swapRB), output -> crop pixels -> image pixels (point by point)."""
    image = cv2.imread(str(path))
    h, w = image.shape[:2]
    x1, y1, x2, y2 = np.array(bbox or (0, 0, w, h), np.float32)  # detectors give float32 boxes
    s = 192 / (max(x2 - x1, y2 - y1) * 1.5)  # float32, as in Landmark.get
    cx, cy = (x2 + x1) / 2 * s, (y2 + y1) / 2 * s
    scale = np.diag([s, s, 1.0]).astype(np.float64)
    shift = np.array([[1, 0, -cx], [0, 1, -cy], [0, 0, 1.0]])
    rotate = np.eye(3)
    centre = np.array([[1, 0, 96.0], [0, 1, 96.0], [0, 0, 1]])
    m = (centre @ (rotate @ (shift @ scale)))[:2]
    crop = cv2.warpAffine(image, m, (192, 192), borderValue=0.0)
    blob = cv2.dnn.blobFromImage(crop, 1.0 / std, (192, 192), (mean, mean, mean), swapRB=True)
    pred = session.run(None, {session.get_inputs()[0].name: blob})[0][0].reshape(-1, 2)
    pred = (pred + 1) * 96
    inverse = cv2.invertAffineTransform(m)
    return np.array([inverse @ np.array([x, y, 1.0], np.float32) for x, y in pred], np.float32).reshape(-1)


@pytest.fixture()
def dataset(tmp_path):
    records = make_images(tmp_path / "images", 10)
    (tmp_path / "anno.json").write_text(json.dumps(records))
    return tmp_path, records


def test_one_opencv():
    """opencv-python (insightface's) and opencv-python-headless (ours) fill one `cv2` folder: where
    both are installed they must be one version, or the folder mixes two builds."""
    versions = {}
    for name in ("opencv-python", "opencv-python-headless"):
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    assert versions and len(set(versions.values())) == 1, versions
    assert cv2.__version__ == next(iter(versions.values())).rsplit(".", 1)[0]  # 5.1.0.95 is cv2 5.1.0


@pytest.mark.parametrize("batch", [1, "N"])
def test_official_recipe_matches_batch_one_loop(dataset, batch):
    root, records = dataset
    graph = toy_landmark_graph(root / f"g_{batch}.onnx", batch)
    out = root / "features.array_record"
    summary = precompute.precompute_landmarks(root / "anno.json", root, graph, out, batch_size=4, progress=False)
    assert (summary.written, summary.skipped, summary.failed) == (10, 0, 0)
    got = landmark_store.read_landmarks(out)
    session = onnxruntime.InferenceSession(str(graph), providers=["CPUExecutionProvider"])
    assert sorted(got) == sorted(r["id"] for r in records)
    for record in records:
        expected = by_hand_official(session, root / record["image"])
        np.testing.assert_allclose(got[record["id"]], expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("normalises_inside", [False, True])
def test_insightface_recipe_by_hand(dataset, normalises_inside):
    root, records = dataset
    records[1]["bbox"] = [10, 20, 70, 100]  # a face box; the others use the whole image
    (root / "anno.json").write_text(json.dumps(records))
    graph = toy_landmark_graph(root / "g.onnx", "N", normalises_inside)
    mean, std = (0.0, 1.0) if normalises_inside else (127.5, 128.0)
    assert landmarks.graph_normalisation(graph) == (mean, std)
    out = root / "features.array_record"
    precompute.precompute_landmarks(root / "anno.json", root, graph, out, recipe="insightface", batch_size=3,
                                    progress=False)
    got = landmark_store.read_landmarks(out)
    session = onnxruntime.InferenceSession(str(graph), providers=["CPUExecutionProvider"])
    for record in records:
        expected = by_hand_insightface(session, root / record["image"], mean, std, record.get("bbox"))
        np.testing.assert_allclose(got[record["id"]], expected, rtol=1e-5, atol=1e-3)


def test_insightface_recipe_matches_the_library(dataset):
    pytest.importorskip("insightface")
    from insightface.app.common import Face
    from insightface.model_zoo.landmark import Landmark

    root, records = dataset
    for normalises_inside in (False, True):
        graph = toy_landmark_graph(root / f"g{normalises_inside}.onnx", 1, normalises_inside)
        out = root / f"f{normalises_inside}.array_record"
        precompute.precompute_landmarks(root / "anno.json", root, graph, out, recipe="insightface", progress=False)
        got = landmark_store.read_landmarks(out)
        model = Landmark(model_file=str(graph))
        for record in records:
            image = cv2.imread(str(root / record["image"]))
            h, w = image.shape[:2]
            expected = model.get(image, Face(bbox=np.array([0, 0, w, h], np.float32)))
            np.testing.assert_allclose(got[record["id"]], expected.reshape(-1), rtol=1e-5, atol=1e-3)


def test_bad_images_are_listed_and_skipped(dataset):
    root, records = dataset
    jpg = root / records[1]["image"]
    data = jpg.read_bytes()
    (root / "images" / "truncated.jpg").write_bytes(data[: len(data) // 2])
    png = (root / records[0]["image"]).read_bytes()
    (root / "images" / "truncated.png").write_bytes(png[: len(png) // 2])
    (root / "images" / "empty.jpg").write_bytes(b"")
    (root / "images" / "garbage.jpg").write_bytes(b"not an image at all" * 20)
    bad = {"t_jpg": "truncated.jpg", "t_png": "truncated.png", "empty": "empty.jpg", "garbage": "garbage.jpg",
           "missing": "nowhere.jpg"}
    records += [{"id": key, "image": f"images/{name}"} for key, name in bad.items()]
    (root / "anno.json").write_text(json.dumps(records))
    out = root / "features.array_record"
    graph = toy_landmark_graph(root / "g.onnx", "N")
    summary = precompute.precompute_landmarks(root / "anno.json", root, graph, out, batch_size=4, progress=False)
    assert (summary.written, summary.skipped, summary.failed) == (10, 0, 5)
    assert set(landmark_store.read_landmarks(out)) == {f"r{i}" for i in range(10)}
    errors = [json.loads(line) for line in summary.errors.read_text().splitlines()]
    assert summary.errors == root / "features.errors.jsonl"
    reasons = {e["id"]: e["reason"] for e in errors}
    assert set(reasons) == set(bad)
    assert "truncated JPEG" in reasons["t_jpg"] and "truncated PNG" in reasons["t_png"]
    assert "empty file" in reasons["empty"] and "not a decodable image" in reasons["garbage"]
    assert "could not be read" in reasons["missing"]
    assert all(e["path"] == str(root / "images" / bad[e["id"]]) for e in errors)


def test_killed_run_resumes_without_loss(dataset, monkeypatch):
    root, records = dataset
    graph = toy_landmark_graph(root / "g.onnx", "N")
    out = root / "features.array_record"
    calls = []
    real = landmarks.run_session

    def failing(session, batch):  # the third session call dies, as a kill would
        calls.append(len(batch))
        if len(calls) == 3:
            raise RuntimeError("killed")
        return real(session, batch)

    monkeypatch.setattr(landmarks, "run_session", failing)
    with pytest.raises(RuntimeError, match="killed"):
        precompute.precompute_landmarks(root / "anno.json", root, graph, out, batch_size=2, part_size=3,
                                        progress=False)
    assert not out.exists()  # nothing under the final name until the run is complete
    parts = sorted((root / "features.array_record.parts").glob("part-*"))
    saved = {key for part in parts for key, _ in landmark_store.iter_file(part)}
    assert saved == {"r0", "r1", "r2", "r3"}  # both finished batches reached part files
    monkeypatch.setattr(landmarks, "run_session", real)
    summary = precompute.precompute_landmarks(root / "anno.json", root, graph, out, batch_size=2, progress=False)
    assert (summary.written, summary.skipped, summary.failed) == (6, 4, 0)
    assert not (root / "features.array_record.parts").exists()
    resumed = landmark_store.read_landmarks(out)
    fresh = root / "fresh.array_record"
    precompute.precompute_landmarks(root / "anno.json", root, graph, fresh, progress=False)
    expected = landmark_store.read_landmarks(fresh)
    assert resumed.keys() == expected.keys()
    for key in expected:
        np.testing.assert_allclose(resumed[key], expected[key], rtol=1e-6, atol=1e-7)
    # a third run has nothing left; new records are added to the existing file
    again = precompute.precompute_landmarks(root / "anno.json", root, graph, out, progress=False)
    assert (again.written, again.skipped) == (0, 10)
    extra = make_images(root / "more", 2, seed=5)
    for r in extra:
        r["id"], r["image"] = "x" + r["id"], r["image"].replace("images/", "more/")
    (root / "extra.json").write_text(json.dumps(extra))
    more = precompute.precompute_landmarks([root / "anno.json", root / "extra.json"], root, graph, out,
                                           progress=False)
    assert (more.written, more.skipped) == (2, 10)
    assert set(landmark_store.read_landmarks(out)) == set(expected) | {"xr0", "xr1"}


def test_partial_file_is_refused(tmp_path):
    path = tmp_path / "f.array_record"
    landmark_store.write_file(path, [(f"id{i}", np.full(212, i, np.float32)) for i in range(50)])
    assert sorted(landmark_store.read_landmarks(path)) == sorted(f"id{i}" for i in range(50))
    np.testing.assert_array_equal(landmark_store.LandmarkTable.open(path).get("id7"), np.full(212, 7, np.float32))
    data = path.read_bytes()
    for cut in (len(data) // 2, len(data) - 40):
        path.write_bytes(data[:cut])
        with pytest.raises(ValueError, match="not a complete landmark file"):
            landmark_store.read_landmarks(path)
    with pytest.raises(ValueError, match="212 values"):
        landmark_store.encode("x", np.zeros(10))


def test_import_npy_and_cli(dataset):
    root, records = dataset
    (root / "landmarks").mkdir()
    rng = np.random.default_rng(3)
    expected = {}
    for record in records[:8]:
        expected[record["id"]] = rng.standard_normal(212).astype(np.float32)
        np.save(root / record["landmark"], expected[record["id"]][None])  # official files are [1, 212]
    np.save(root / records[8]["landmark"], np.zeros(100, np.float32))  # wrong size; records[9]: missing
    out = root / "imported.array_record"
    result = subprocess.run(
        [sys.executable, str(ROOT / "run.py"), "precompute-landmarks", "--annotations", str(root / "anno.json"),
         "--import-npy", str(root), "--out", str(out), "--no-progress"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().startswith("landmarks: written 8, skipped 0 (already done), failed 2")
    got = landmark_store.read_landmarks(out)
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        np.testing.assert_array_equal(got[key], value)
    reasons = {e["id"]: e["reason"] for e in map(json.loads, (root / "imported.errors.jsonl").read_text().splitlines())}
    assert "100 values" in reasons["r8"] and "could not be read" in reasons["r9"]
