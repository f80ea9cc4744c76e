"""Faulty images and models in every command that reads images. A phone photo stored sideways with an
EXIF orientation tag is one upright picture for CLIP, the face detector and the landmark model (as
Pillow's `exif_transpose` turns it); an image over Pillow's decompression-bomb limit is a skipped record
naming it (`analyze`, `precompute-priors`) or one error line (`generate`); a landmark graph giving NaN and
a face box outside its image are failed records naming them, never stored features."""

import json
import struct
import subprocess
import zlib
from pathlib import Path

import cv2
import numpy as np
import onnxruntime
import pytest
from PIL import Image, ImageOps

from emola_jax.data import image, landmark_store, landmarks, priors
from emola_jax.data.labels import EMOTION_QUESTION
from tests.processes import RUN, cpu_env
from tests.test_precompute_landmarks import by_hand_official
from tests.test_priors import dlib68_by_hand

skimage_data = pytest.importorskip("skimage.data")
pytest.importorskip("dlib")

SIDEWAYS = 6  # EXIF: the stored picture is to be turned 90 degrees clockwise, as phones save portraits


def _run(*args) -> subprocess.CompletedProcess:
    return subprocess.run([*RUN, *map(str, args)], capture_output=True, text=True, env=cpu_env(1), timeout=300)


def _one_error_line(done: subprocess.CompletedProcess) -> str:
    assert done.returncode == 1 and done.stdout == "", done.stderr[-2000:]
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), done.stderr[-2000:]
    return lines[0]


def _too_large(path: Path) -> str:
    return (f"image {path}: 180,000,000 pixels, over Pillow's limit of {2 * Image.MAX_IMAGE_PIXELS:,} (twice "
            "PIL.Image.MAX_IMAGE_PIXELS) against decompression bombs; not decoded")


def _huge_png(path: Path, width: int = 15000, height: int = 12000) -> None:
    """A valid one-colour 8-bit grey PNG of 180 megapixels (200 KB on disk), written without holding it."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    packer, rows = zlib.compressobj(9), (b"\x00" + b"\x80" * width) * 1000
    data = b"".join([packer.compress(rows) for _ in range(height // 1000)] + [packer.flush()])
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", data) + chunk(b"IEND", b""))


def _sqrt_graph(path: Path, threshold: float) -> Path:
    """A graph with 2d106det's signature whose output is `sqrt(mean pixel - threshold) * w + b`: finite
    for a picture brighter than `threshold` (0..1), NaN for a darker one, as a broken graph would give."""
    import onnx
    from onnx import TensorProto, helper

    rng = np.random.default_rng(0)
    nodes = [helper.make_node("ReduceMean", ["data", "axes"], ["mean"], keepdims=0),
             helper.make_node("Unsqueeze", ["mean", "one"], ["column"]),
             helper.make_node("Sub", ["column", "threshold"], ["above"]),
             helper.make_node("Sqrt", ["above"], ["root"]),
             helper.make_node("MatMul", ["root", "w"], ["scaled"]),
             helper.make_node("Add", ["scaled", "b"], ["fc1"])]
    graph = helper.make_graph(
        nodes, "landmark_106", [helper.make_tensor_value_info("data", TensorProto.FLOAT, ["N", 3, 192, 192])],
        [helper.make_tensor_value_info("fc1", TensorProto.FLOAT, ["N", 212])],
        [helper.make_tensor("axes", TensorProto.INT64, [3], [1, 2, 3]),
         helper.make_tensor("one", TensorProto.INT64, [1], [1]),
         helper.make_tensor("threshold", TensorProto.FLOAT, [], [threshold]),
         helper.make_tensor("w", TensorProto.FLOAT, [1, 212], rng.standard_normal(212).astype(np.float32)),
         helper.make_tensor("b", TensorProto.FLOAT, [212], rng.standard_normal(212).astype(np.float32))])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(path))
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> Path:
    """The astronaut photograph as a phone saves it (sideways JPEG + orientation tag) and as the same
    pixels upright (PNG), a face crop, the photo darkened, an oversized PNG and two graphs."""
    folder = tmp_path_factory.mktemp("faults")
    rgb = skimage_data.astronaut()
    exif = Image.Exif()
    exif[0x0112] = SIDEWAYS
    Image.fromarray(rgb).transpose(Image.Transpose.ROTATE_90).save(folder / "phone.jpg", exif=exif, quality=95)
    with Image.open(folder / "phone.jpg") as phone:  # the reference's reading of the phone's file
        ImageOps.exif_transpose(phone).convert("RGB").save(folder / "upright.png")
    Image.fromarray(rgb).save(folder / "astronaut.png")
    Image.fromarray(rgb[50:190, 150:290]).save(folder / "crop.png")
    Image.fromarray((rgb * 0.2).astype(np.uint8)).save(folder / "dark.png")  # HOG still finds the face
    _huge_png(folder / "huge.png")
    _sqrt_graph(folder / "dark_is_nan.onnx", 0.3)
    _sqrt_graph(folder / "always_nan.onnx", 2.0)
    return folder


def test_decoders_turn_every_orientation_as_pillow_and_opencv(tmp_path):
    """CLIP's decoder equals `ImageOps.exif_transpose`, the landmark step's equals it too (and OpenCV's
    own turning of a JPEG); for every orientation, in every format that carries one."""
    pixels = np.random.default_rng(0).integers(0, 256, (7, 11, 3), dtype=np.uint8)
    for orientation in range(1, 9):
        exif = Image.Exif()
        exif[0x0112] = orientation
        for suffix, options in ((".jpg", {"quality": 100}), (".png", {}), (".webp", {"lossless": True}),
                                (".tif", {})):
            path = tmp_path / f"{orientation}{suffix}"
            Image.fromarray(pixels).save(path, exif=exif, **options)
            with Image.open(path) as opened:
                upright = np.asarray(ImageOps.exif_transpose(opened).convert("RGB"))
            assert upright.shape == ((11, 7, 3) if orientation > 4 else (7, 11, 3))
            np.testing.assert_array_equal(image.decode_rgb(path), upright, err_msg=path.name)
            np.testing.assert_array_equal(image.decode_rgb(path.open("rb")), upright, err_msg=path.name)
            bgr = landmarks.read_bgr(path)
            if suffix == ".jpg":
                np.testing.assert_array_equal(bgr, cv2.imread(str(path)), err_msg=path.name)
            else:
                np.testing.assert_array_equal(bgr[..., ::-1], upright, err_msg=path.name)


def test_precompute_priors_fails_each_bad_record_by_id(files, tmp_path):
    graph = files / "dark_is_nan.onnx"
    records = [{"id": "crop", "image": "crop.png"}, {"id": "dark", "image": "dark.png"},
               {"id": "huge", "image": "huge.png"}, {"id": "phone", "image": "phone.jpg"},
               {"id": "upright", "image": "upright.png"}]
    (tmp_path / "anno.json").write_text(json.dumps(records))
    out = tmp_path / "landmarks.array_record"
    done = _run("precompute-priors", "--prior", "2d106det", "--onnx", graph, "--annotations", tmp_path / "anno.json",
                "--images-root", files, "--out", out, "--no-progress")
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == (f"landmarks: written 3, skipped 0 (already done), failed 2 (listed in "
                                   f"{tmp_path / 'landmarks.errors.jsonl'}) -> {out}")
    got = landmark_store.read_landmarks(out)
    assert sorted(got) == ["crop", "phone", "upright"]
    session = onnxruntime.InferenceSession(str(graph), providers=["CPUExecutionProvider"])
    upright_pixels = {"crop": "crop.png", "phone": "upright.png", "upright": "upright.png"}  # the phone's: upright
    for rid, name in upright_pixels.items():
        np.testing.assert_allclose(got[rid], by_hand_official(session, files / name), rtol=1e-5, atol=1e-5)
    errors = [json.loads(line) for line in (tmp_path / "landmarks.errors.jsonl").read_text().splitlines()]
    assert errors == [
        {"id": "dark", "path": str(files / "dark.png"), "reason": f"record dark ({files / 'dark.png'}): the landmark "
         f"model {graph} gave 212 NaN or infinite values of 212"},
        {"id": "huge", "path": str(files / "huge.png"), "reason": _too_large(files / "huge.png")}]

    # a face box wholly outside its image: refused by the priors that take a box, per record
    (tmp_path / "boxes.json").write_text(json.dumps([
        {"id": "inside", "image": "astronaut.png", "bbox": [175, 76, 266, 167]},
        {"id": "outside", "image": "astronaut.png", "bbox": [600, 600, 700, 700]},
        {"id": "phone", "image": "phone.jpg"}, {"id": "upright", "image": "upright.png"}]))
    out = tmp_path / "dlib68.array_record"
    done = _run("precompute-priors", "--prior", "dlib68", "--annotations", tmp_path / "boxes.json",
                "--images-root", files, "--out", out, "--no-progress")
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.startswith("dlib68: written 3, skipped 0 (already done), failed 1")
    got = landmark_store.read_landmarks(out, "dlib68", 136)
    astronaut, upright = cv2.imread(str(files / "astronaut.png")), cv2.imread(str(files / "upright.png"))
    np.testing.assert_allclose(got["inside"], dlib68_by_hand(astronaut, (175, 76, 266, 167)), rtol=0, atol=1e-6)
    for rid in ("phone", "upright"):  # the phone's photo is the upright picture to dlib too
        np.testing.assert_allclose(got[rid], dlib68_by_hand(upright, None), rtol=0, atol=1e-6)
    [error] = [json.loads(line) for line in (tmp_path / "dlib68.errors.jsonl").read_text().splitlines()]
    assert error["reason"] == (f"record outside ({files / 'astronaut.png'}): face box (600.0, 600.0, 700.0, 700.0) "
                               "lies wholly outside the 512x512 image")
    insightface = priors.open_extractor("2d106det", onnx=graph, recipe="insightface")
    with pytest.raises(ValueError, match=r"^away: face box \(600, 600, 700, 700\) lies wholly outside the 512x512"):
        insightface.features([astronaut], [(600, 600, 700, 700)], names=["away"])

    # a graph that gives NaN for every image: one line, no output file, every record listed
    out = tmp_path / "broken.array_record"
    line = _one_error_line(_run("precompute-priors", "--prior", "2d106det", "--onnx", files / "always_nan.onnx",
                                "--annotations", tmp_path / "anno.json", "--images-root", files, "--out", out,
                                "--no-progress"))
    assert line.startswith(f"error: none of the 5 images gave a feature (record crop ({files / 'crop.png'}): the "
                           f"landmark model {files / 'always_nan.onnx'} gave 212 NaN or infinite values of 212)")
    assert sorted(p.name for p in tmp_path.glob("broken*")) == ["broken.errors.jsonl"]
    assert len((tmp_path / "broken.errors.jsonl").read_text().splitlines()) == 5


def test_analyze_skips_bad_photos_and_turns_phone_photos_upright(demo_run, files, tmp_path):
    """The phone's sideways JPEG and the upright PNG of its pixels give one face, box, crop, feature and
    answers; the oversized photo and the one whose face the graph turns into NaN are skipped, named."""
    import dlib

    workdir, demo = demo_run
    assert demo.returncode == 0, demo.stderr[-2000:]
    graph, out = files / "dark_is_nan.onnx", tmp_path / "out"
    photos = [files / n for n in ("phone.jpg", "upright.png", "huge.png", "dark.png")]
    done = _run("analyze", *photos, "--ckpt", workdir / "run" / "model", "--onnx", graph, "--out", out,
                "--min-score", "0.5", "--max-new-tokens", "8", "--batch-size", "2", "--no-progress")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "2 faces in 2 photos (0 without a face, 2 skipped)" in done.stdout
    skipped = [line for line in done.stderr.splitlines() if line.startswith("skipped ")]
    assert skipped == [f"skipped {photos[2]}: {_too_large(photos[2])}",
                       f"skipped {photos[3]}: face 1 of {photos[3]}: the landmark model {graph} gave 212 NaN or "
                       "infinite values of 212"]
    lines = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert [list(line) for line in lines[2:]] == [["photo", "error"]] * 2
    phone, upright = lines[:2]
    rgb = np.asarray(Image.open(files / "upright.png"))
    [rect] = [r for r, s in zip(*dlib.get_frontal_face_detector().run(rgb, 1, 0.0)[:2], strict=True) if s >= 0.5]
    assert phone["box"] == upright["box"] == [rect.left(), rect.top(), rect.right(), rect.bottom()]
    for key in ("score", "emotion_answer", "au_answer"):
        assert phone[key] == upright[key], key
    np.testing.assert_array_equal(np.asarray(Image.open(out / phone["crop"])),
                                  np.asarray(Image.open(out / upright["crop"])))
    np.testing.assert_array_equal(np.load(out / phone["priors"]["2d106det"]),
                                  np.load(out / upright["priors"]["2d106det"]))
    assert sorted(p.name for p in out.iterdir()) == ["faces", "index.html", "phone.png", "results.jsonl",
                                                     "upright.png"]
    assert not list((out / "faces").glob("dark*")) and not list((out / "faces").glob("huge*"))


def test_generate_says_bad_images_in_one_line_and_turns_phone_photos_upright(demo_run, files, tmp_path):
    workdir, demo = demo_run
    assert demo.returncode == 0, demo.stderr[-2000:]
    model, graph = workdir / "run" / "model", workdir / "landmark_model.onnx"
    ask = ["--prompt", EMOTION_QUESTION, "--max-new-tokens", "8"]
    line = _one_error_line(_run("generate", model, "--image", files / "huge.png", "--onnx", graph, *ask,
                                "--save-prior", tmp_path / "huge"))
    assert line == f"error: {_too_large(files / 'huge.png')}"
    line = _one_error_line(_run("generate", model, "--image", files / "upright.png", "--onnx",
                                files / "always_nan.onnx", *ask))
    assert line == (f"error: {files / 'upright.png'}: the landmark model {files / 'always_nan.onnx'} gave 212 NaN or "
                    "infinite values of 212")
    assert not (tmp_path / "huge").exists()

    phone = _run("generate", model, "--image", files / "phone.jpg", "--onnx", graph, *ask, "--save-prior", tmp_path)
    assert phone.returncode == 0, phone.stderr[-2000:]
    session = onnxruntime.InferenceSession(str(graph), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(np.load(tmp_path / "2d106det.npy"), by_hand_official(session, files / "upright.png"),
                               rtol=1e-5, atol=1e-5)
    upright = _run("generate", model, "--image", files / "upright.png", "--onnx", graph, *ask)
    assert upright.returncode == 0, upright.stderr[-2000:]
    assert phone.stdout == upright.stdout and phone.stdout.strip()
