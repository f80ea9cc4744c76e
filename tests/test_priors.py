"""Face priors (`data/priors.py`): each extractor equals its library called directly on real photographs
(scikit-image's astronaut, insightface's group photo t1.jpg), stores carry their prior in the footer and
readers refuse another, several priors' features concatenate in the model's order, and
`run.py precompute-priors` writes what dlib computes."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import onnxruntime
import pytest

from emola_jax.apps.demo_models import toy_landmark_graph
from emola_jax.config import PriorToken
from emola_jax.data import dlib_models, landmark_store, landmarks, pipeline, precompute, priors
from emola_jax.data.pipeline import PipelineConfig
from emola_jax.data.priors import PriorFeatures, image_feature
from tests.test_pipeline import MODEL, bpe_tokenizer, collect, fake_records
from tests.test_precompute_landmarks import by_hand_insightface, by_hand_official

ROOT = Path(__file__).resolve().parent.parent
ASTRONAUT_FACE = (175, 76, 266, 167)  # dlib's HOG detector's box, right and bottom edges exclusive
T1_FACE = (450, 295, 558, 403)


def astronaut() -> np.ndarray:
    """scikit-image's astronaut photograph, BGR."""
    import skimage.data

    return np.ascontiguousarray(skimage.data.astronaut()[..., ::-1])


def group_photo() -> np.ndarray:
    """insightface's group photograph t1.jpg (six faces), BGR."""
    folder = next(iter(importlib.util.find_spec("insightface").submodule_search_locations))
    return cv2.imread(str(Path(folder) / "data" / "images" / "t1.jpg"))


@pytest.fixture(scope="module")
def photos() -> dict[str, tuple[np.ndarray, tuple | None]]:
    """Aligned-crop-like faces (box None: the whole image) and faces in whole photographs (a box)."""
    space, group = astronaut(), group_photo()
    return {"astronaut_crop": (space[50:190, 150:290], None), "t1_crop": (group[265:432, 420:587], None),
            "astronaut": (space, ASTRONAUT_FACE), "t1": (group, T1_FACE)}


def dlib_rectangle(image: np.ndarray, box) -> tuple:
    """dlib's inclusive rectangle of `box` (x2, y2 exclusive), or of the whole image."""
    h, w = image.shape[:2]
    x1, y1, x2, y2 = box if box is not None else (0, 0, w, h)
    return x1, y1, x2 - 1, y2 - 1


def dlib68_by_hand(bgr: np.ndarray, box) -> np.ndarray:
    """dlib's 68-point shape predictor called directly, points relative to the box."""
    import dlib

    rgb = np.ascontiguousarray(bgr[..., ::-1])
    left, top, right, bottom = dlib_rectangle(bgr, box)
    shape = dlib_models.shape_predictor(68)(rgb, dlib.rectangle(left, top, right, bottom))
    points = np.array([[shape.part(i).x, shape.part(i).y] for i in range(68)], np.float64)
    return ((points - [left, top]) / [right + 1 - left, bottom + 1 - top]).reshape(-1)


def descriptor_by_hand(bgr: np.ndarray, box) -> np.ndarray:
    """dlib's face recognition model called directly, aligned by the 5-point predictor on the box."""
    import dlib

    rgb = np.ascontiguousarray(bgr[..., ::-1])
    shape = dlib_models.shape_predictor(5)(rgb, dlib.rectangle(*dlib_rectangle(bgr, box)))
    return np.array(dlib_models.face_recognition_model().compute_face_descriptor(rgb, shape))


def test_registry():
    assert {name: p.dim for name, p in priors.PRIORS.items()} == {"2d106det": 212, "dlib68": 136,
                                                                  "dlib-face-descriptor": 128}
    with pytest.raises(ValueError, match="unknown face prior 'dlib5'; known: 2d106det, dlib68"):
        priors.get("dlib5")
    with pytest.raises(ValueError, match="the 2d106det prior runs an ONNX graph"):
        priors.open_extractor("2d106det")
    with pytest.raises(ValueError, match="dlib68 prior runs dlib's own model and takes no ONNX file"):
        priors.open_extractor("dlib68", onnx="g.onnx")
    with pytest.raises(ValueError, match="recipes are default, not 'official'"):
        priors.open_extractor("dlib68", recipe="official")


def test_dlib68_equals_shape_predictor(photos):
    extractor = priors.open_extractor("dlib68")
    images, boxes = zip(*photos.values(), strict=True)
    got = extractor.features(images, boxes, names=list(photos))
    assert got.shape == (4, 136) and got.dtype == np.float32
    for row, (image, box) in zip(got, photos.values(), strict=True):
        np.testing.assert_allclose(row, dlib68_by_hand(image, box), rtol=0, atol=1e-6)
    # stated independently of dlib: the eyes (points 36-47) lie above the mouth (48-67), inside the face
    points = got.reshape(4, 68, 2)
    assert (points[:, 36:48, 1].mean(1) < points[:, 48:68, 1].mean(1) - 0.2).all()
    assert (points[:, 27:36].mean(1) > 0.3).all() and (points[:, 27:36].mean(1) < 0.7).all()  # the nose: central


def test_face_descriptor_equals_dlib(photos):
    extractor = priors.open_extractor("dlib-face-descriptor")
    images, boxes = zip(*photos.values(), strict=True)
    got = extractor.features(images, boxes)
    assert got.shape == (4, 128) and got.dtype == np.float32
    for row, (image, box) in zip(got, photos.values(), strict=True):
        np.testing.assert_allclose(row, descriptor_by_hand(image, box), rtol=0, atol=1e-6)
    # a crop (whole-image box) and the detected box of the same face are one person (dlib's threshold 0.6),
    # the astronaut and the man in t1 are two
    distance = lambda a, b: np.linalg.norm(got[a] - got[b])  # noqa: E731
    assert distance(0, 2) < 0.3 and distance(1, 3) < 0.3
    assert distance(0, 1) > 0.6 and distance(2, 3) > 0.6


def test_2d106det_wraps_the_landmark_recipes(tmp_path, photos):
    graph = toy_landmark_graph(tmp_path / "g.onnx", "N")
    session = onnxruntime.InferenceSession(str(graph), providers=["CPUExecutionProvider"])
    paths = []
    for name, (image, _) in photos.items():
        paths.append(tmp_path / f"{name}.png")
        cv2.imwrite(str(paths[-1]), image)
    official = priors.open_extractor("2d106det", onnx=graph)
    got = official.file_features(paths)
    for row, path in zip(got, paths, strict=True):
        np.testing.assert_allclose(row, by_hand_official(session, path), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="astronaut.png: the official 2d106det recipe .* takes no face box"):
        official.file_features(paths[2:3], [ASTRONAUT_FACE])
    insight = priors.open_extractor("2d106det", onnx=graph, recipe="insightface")
    boxes = [box for _, box in photos.values()]
    mean, std = landmarks.graph_normalisation(graph)
    for row, path, box in zip(insight.file_features(paths, boxes), paths, boxes, strict=True):
        np.testing.assert_allclose(row, by_hand_insightface(session, path, mean, std, box), rtol=1e-4, atol=1e-3)

    # one file holds one recipe's features: a rerun with the other is refused, naming the file
    (tmp_path / "anno.json").write_text(json.dumps([{"id": p.stem, "image": p.name} for p in paths]))
    out = tmp_path / "features.array_record"
    precompute.precompute_priors(tmp_path / "anno.json", tmp_path, out, onnx=graph, progress=False)
    assert landmark_store.read_info(out) == landmark_store.StoreInfo("2d106det", 212, "official", 4)
    with pytest.raises(ValueError, match=f"{out} holds 2d106det features of the official recipe, not insightface"):
        precompute.precompute_priors(tmp_path / "anno.json", tmp_path, out, onnx=graph, recipe="insightface",
                                     progress=False)


def test_a_face_dlib_cannot_process_is_an_error_naming_it(photos):
    extractor = priors.open_extractor("dlib68")
    image, _ = photos["astronaut"]
    with pytest.raises(ValueError, match="tiny: an image of 5x4 pixels is too small for a face"):
        extractor.features([image, image[:4, :5]], names=["whole", "tiny"])
    with pytest.raises(ValueError, match=r"whole: face box \(10, 10, 10, 40\) is empty"):
        extractor.features([image], [(10, 10, 10, 40)], names=["whole"])


def test_store_footer_names_the_prior(tmp_path):
    path = tmp_path / "dlib.array_record"
    features = {f"r{i}": np.full(136, i, np.float32) for i in range(3)}
    landmark_store.write_file(path, features.items(), prior="dlib68", dim=136)
    assert landmark_store.read_info(path) == landmark_store.StoreInfo("dlib68", 136, None, 3)
    np.testing.assert_array_equal(landmark_store.read_landmarks(path, "dlib68", 136)["r2"], features["r2"])
    with pytest.raises(ValueError, match=f"{path} holds 'dlib68' features of 136 values, not '2d106det' features"):
        landmark_store.read_landmarks(path, "2d106det", 212)
    with pytest.raises(ValueError, match=f"{path} holds 'dlib68' features of 136 values, not 128 values"):
        landmark_store.LandmarkTable.open(path, dim=128)

    # a file written before priors were pluggable: the footer is the magic and the count alone
    from array_record.python.array_record_module import ArrayRecordWriter

    old = tmp_path / "old.array_record"
    writer = ArrayRecordWriter(str(old), landmark_store.WRITER_OPTIONS)
    writer.write(landmark_store.encode("a", np.arange(212)))
    writer.write(landmark_store.FOOTER_MAGIC + (1).to_bytes(8, "little"))
    writer.close()
    assert landmark_store.read_info(old) == landmark_store.StoreInfo("2d106det", 212, None, 1)
    np.testing.assert_array_equal(landmark_store.read_landmarks(old, "2d106det", 212)["a"], np.arange(212))


def test_several_priors_concatenate_in_the_model_order(tmp_path):
    anno, features = fake_records(tmp_path, count=6)  # 2d106det features in landmarks.array_record
    rng = np.random.default_rng(1)
    dlib = {rid: rng.random(136).astype(np.float32) for rid in features}
    landmark_store.write_file(tmp_path / "dlib68.array_record", dlib.items(), prior="dlib68", dim=136)
    files = (str(tmp_path / "landmarks.array_record"), str(tmp_path / "dlib68.array_record"))
    model = MODEL.replace(priors=(PriorToken(), PriorToken("dlib68", 136)))

    prior = PriorFeatures.open(files, priors=model.priors)
    np.testing.assert_array_equal(prior.get("r3"), np.concatenate([features["r3"], dlib["r3"]]))
    with pytest.raises(ValueError, match=f"{files[1]} holds 'dlib68' features of 136 values, not '2d106det'"):
        PriorFeatures.open(files[::-1], priors=model.priors)
    with pytest.raises(ValueError, match="priors are 2d106det, dlib68: give 2 feature file"):
        PriorFeatures.open(files[:1], priors=model.priors)
    with pytest.raises(ValueError, match=r"priors \(2d106det, dlib68\) need their feature files"):
        PriorFeatures.open(None, priors=model.priors)

    config = PipelineConfig(annotations=str(anno), landmarks=files, batch_size=6, max_length=128,
                            length_buckets=(), worker_count=0, shuffle=False)
    assert config.landmark_files == files
    batch = collect(pipeline.make_eval_loader(config, bpe_tokenizer(tmp_path / "tok"), model))[0]
    assert batch.landmarks.shape == (6, 348) == (6, model.prior_dim)
    for rid, row in zip(batch.ids, batch.landmarks, strict=True):
        np.testing.assert_array_equal(row, np.concatenate([features[rid], dlib[rid]]))


def test_one_image_feature_for_generate(tmp_path, photos):
    path = tmp_path / "face.png"
    cv2.imwrite(str(path), photos["astronaut_crop"][0])
    graph = toy_landmark_graph(tmp_path / "g.onnx", "N")
    session = onnxruntime.InferenceSession(str(graph), providers=["CPUExecutionProvider"])
    model_priors = (PriorToken(), PriorToken("dlib68", 136))
    shape = dlib68_by_hand(cv2.imread(str(path)), None)
    got = image_feature(path, onnx=graph, priors=model_priors)
    np.testing.assert_allclose(got, np.concatenate([by_hand_official(session, path), shape]), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(image_feature(path, priors=model_priors[1:]), shape, rtol=0, atol=1e-6)  # no graph
    assert image_feature(path, priors=model_priors) is None  # 2d106det needs its graph: the caller says so
    np.save(tmp_path / "a.npy", got[:212])
    np.save(tmp_path / "b.npy", got[212:])
    np.testing.assert_array_equal(image_feature(path, npy=[tmp_path / "a.npy", tmp_path / "b.npy"],
                                                priors=model_priors), got)
    with pytest.raises(ValueError, match="give 2 .npy file"):
        image_feature(path, npy=[tmp_path / "a.npy"], priors=model_priors)
    with pytest.raises(ValueError, match=f"landmark file {tmp_path / 'b.npy'} holds 136 values, not 212"):
        image_feature(path, npy=[tmp_path / "b.npy", tmp_path / "a.npy"], priors=model_priors)


def test_precompute_priors_cli_writes_what_dlib_computes(tmp_path, photos):
    """`run.py precompute-priors --prior dlib68` on image files: a crop (PNG, whole image), a crop (JPEG),
    the whole photograph with its face box, and an image too small for a face (listed, skipped)."""
    (tmp_path / "images").mkdir()
    space, _ = photos["astronaut"]
    cv2.imwrite(str(tmp_path / "images" / "astronaut.png"), photos["astronaut_crop"][0])
    cv2.imwrite(str(tmp_path / "images" / "t1.jpg"), photos["t1_crop"][0])
    cv2.imwrite(str(tmp_path / "images" / "photo.png"), space)
    cv2.imwrite(str(tmp_path / "images" / "tiny.png"), space[:6, :6])
    records = [{"id": "a", "image": "images/astronaut.png"}, {"id": "t", "image": "images/t1.jpg"},
               {"id": "p", "image": "images/photo.png", "bbox": list(ASTRONAUT_FACE)},
               {"id": "tiny", "image": "images/tiny.png"}]
    (tmp_path / "anno.json").write_text(json.dumps(records))
    out = tmp_path / "dlib68.array_record"
    command = [sys.executable, str(ROOT / "run.py"), "precompute-priors", "--prior", "dlib68", "--annotations",
               str(tmp_path / "anno.json"), "--images-root", str(tmp_path), "--out", str(out), "--no-progress"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("dlib68: written 3, skipped 0 (already done), failed 1")
    assert landmark_store.read_info(out) == landmark_store.StoreInfo("dlib68", 136, "default", 3)
    got = landmark_store.read_landmarks(out, "dlib68", 136)
    for record in records[:3]:
        image = cv2.imread(str(tmp_path / record["image"]))  # the JPEG's decoded pixels, as dlib is given them
        np.testing.assert_allclose(got[record["id"]], dlib68_by_hand(image, record.get("bbox")), rtol=0, atol=1e-6)
    error = json.loads((tmp_path / "dlib68.errors.jsonl").read_text())
    assert error["id"] == "tiny" and "record tiny" in error["reason"] and "too small for a face" in error["reason"]

    # a rerun into the same file with another prior is refused, naming the file
    command[command.index("dlib68")] = "dlib-face-descriptor"
    result = subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert result.returncode == 1
    assert result.stderr.strip() == (f"error: {out} holds 'dlib68' features of 136 values, not 'dlib-face-descriptor' "
                                     "features of 128 values")
