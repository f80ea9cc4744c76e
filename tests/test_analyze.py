"""Faces in ordinary photos: detection and alignment equal dlib's own, and `run.py analyze` on real
photographs (scikit-image's astronaut, insightface's group photo t1.jpg) with the demo's trained model."""

import importlib.util
import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from emola_jax.data import dlib_models
from emola_jax.data.faces import CHIP_PADDING, CHIP_SIZE, FaceFinder, insightface_detector
from emola_jax.data.image import decode_rgb
from tests.processes import ROOT, RUN, cpu_env

dlib = pytest.importorskip("dlib")
skimage_data = pytest.importorskip("skimage.data")


def _group_photo() -> Path:
    spec = importlib.util.find_spec("insightface")
    if spec is None:
        pytest.skip("insightface (its group photo t1.jpg) is not installed")
    return Path(next(iter(spec.submodule_search_locations))) / "data" / "images" / "t1.jpg"


def _dlib_faces(rgb: np.ndarray, rects, size: int = CHIP_SIZE, padding: float = CHIP_PADDING):
    """Boxes (largest first), 5 points and face chips computed by dlib itself."""
    predictor = dlib.shape_predictor(str(dlib_models.model_path("shape5")))
    rects = sorted(rects, key=lambda r: -(r.width() * r.height()))
    shapes = [predictor(rgb, r) for r in rects]
    return ([(r.left(), r.top(), r.right(), r.bottom()) for r in rects],
            [np.array([(p.x, p.y) for p in s.parts()], np.float32) for s in shapes],
            [dlib.get_face_chip(rgb, s, size=size, padding=padding) for s in shapes])


@pytest.mark.parametrize("photo", ["astronaut", "t1"])
def test_hog_faces_equal_dlib(photo):
    rgb = skimage_data.astronaut() if photo == "astronaut" else decode_rgb(_group_photo())
    boxes, points, chips = _dlib_faces(rgb, dlib.get_frontal_face_detector()(rgb, 1))
    faces = FaceFinder("hog").find(rgb)
    assert len(boxes) == (2 if photo == "astronaut" else 6)  # the astronaut's face and her mission patch
    assert [f.detection.box for f in faces] == boxes
    for face, want_points, want_chip in zip(faces, points, chips, strict=True):
        np.testing.assert_array_equal(face.points, want_points)
        assert face.chip.shape == (CHIP_SIZE, CHIP_SIZE, 3)
        np.testing.assert_array_equal(face.chip, want_chip)


def test_the_readmes_min_score_keeps_every_real_face_and_drops_the_patch():
    """The README's suggested `--min-score` against the HOG scores of real photos."""
    suggested = {float(v) for v in re.findall(r"--min-score ([0-9.]+)", (ROOT / "README.md").read_text())}
    assert len(suggested) == 1
    threshold = suggested.pop()
    finder = FaceFinder("hog")
    group = finder.detect(decode_rgb(_group_photo()))
    astronaut = sorted(d.score for d in finder.detect(skimage_data.astronaut()))
    assert len(group) == 6 and all(d.score >= threshold for d in group)  # the weakest real face: 0.37
    assert astronaut[0] < threshold <= astronaut[1]  # her mission patch (0.12) goes, her face (1.16) stays


@pytest.mark.parametrize("size,face", [((112, 112), (8, 10, 100, 104)), ((512, 512), (180, 60, 290, 170)),
                                       ((4000, 3000), (100, 10, 900, 900))])
def test_labels_fit_the_photo(size, face):
    from emola_jax.apps.annotate import LABEL_MIN_PX, layout_label

    text = "1: neutral (fallback: no emotion named); AU1 AU2 AU4 AU6 AU12 AU25"
    label = layout_label(text, size, face)
    left, top, right, bottom = label.box
    assert 0 <= left <= right < size[0] and 0 <= top <= bottom < size[1]
    assert label.font.size == (LABEL_MIN_PX if size[0] == 112 else max(12, round(max(size) / 60)))
    assert label.text.replace("\n", " ") == text and ("\n" in label.text) == (size[0] == 112)
    image = Image.new("RGB", size)
    draw = ImageDraw.Draw(image)
    x0, y0, x1, y1 = draw.multiline_textbbox(label.origin, label.text, font=label.font)
    assert left <= x0 and x1 <= right + 1 and top <= y0 and y1 <= bottom + 1  # every glyph on its background


def test_cnn_detector_crop_options_and_limits_equal_dlib():
    rgb = skimage_data.astronaut()
    detector = dlib.cnn_face_detection_model_v1(str(dlib_models.model_path("cnn_detector")))
    boxes, _, chips = _dlib_faces(rgb, [d.rect for d in detector(rgb, 0)], size=150, padding=0.5)
    faces = FaceFinder("cnn", upsample=0, chip_size=150, chip_padding=0.5).find(rgb)
    assert len(faces) == 1 and [f.detection.box for f in faces] == boxes
    np.testing.assert_array_equal(faces[0].chip, chips[0])

    group = decode_rgb(_group_photo())
    every = FaceFinder("hog").detect(group)
    assert FaceFinder("hog", max_faces=2).detect(group) == every[:2]
    assert every[0].area >= every[1].area >= every[-1].area
    with pytest.raises(ValueError, match="detector must be one of hog, cnn, insightface"):
        FaceFinder("mtcnn")
    with pytest.raises(ValueError, match="chip padding"):
        FaceFinder(chip_padding=-0.1)


def test_insightface_detector_needs_its_pack(tmp_path):
    with pytest.raises(FileNotFoundError, match="model pack 'buffalo_l' is not installed at"):
        insightface_detector("buffalo_l", tmp_path)
    pack = Path("~/.insightface/models/buffalo_l").expanduser()
    if not any(pack.glob("*.onnx")):
        pytest.skip("insightface's buffalo_l pack is not installed here")
    faces = FaceFinder("insightface").find(skimage_data.astronaut())
    assert faces and faces[0].chip.shape == (CHIP_SIZE, CHIP_SIZE, 3)


def test_analyze_command_on_photos(demo_run, tmp_path):
    """The whole command as a user runs it: photos as files (PNG and JPEG bytes), one with several
    faces, one with none, one unreadable; every box and crop is dlib's, every reading is the official
    scoring's reading of the answer written beside it."""
    from emola_jax.data.labels import EMOTIONS
    from emola_jax.eval import scoring

    workdir, demo = demo_run
    assert demo.returncode == 0, demo.stderr[-2000:]
    photos = tmp_path / "photos"
    photos.mkdir()
    Image.fromarray(skimage_data.astronaut()).save(photos / "astronaut.png")
    shutil.copy(_group_photo(), photos / "group.jpg")
    Image.fromarray(skimage_data.coffee()).save(photos / "coffee.png")
    (photos / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a picture")
    out = tmp_path / "out"
    result = subprocess.run(
        [*RUN, "analyze", *(str(photos / n) for n in ("astronaut.png", "group.jpg", "coffee.png", "broken.jpg")),
         "--ckpt", str(workdir / "run" / "model"), "--onnx", str(workdir / "landmark_model.onnx"),
         "--out", str(out), "--max-new-tokens", "24", "--batch-size", "4", "--no-progress"],
        capture_output=True, text=True, env=cpu_env(1), timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"{photos / 'coffee.png'}: no face found" in result.stdout
    skipped = [line for line in result.stderr.splitlines() if "broken.jpg" in line]
    assert len(skipped) == 1 and skipped[0].startswith(f"skipped {photos / 'broken.jpg'}: ")
    assert "8 faces in 3 photos (1 without a face, 1 skipped)" in result.stdout

    lines = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    by_photo = {}
    for line in lines:
        by_photo.setdefault(Path(line["photo"]).name, []).append(line)
    assert by_photo["coffee.png"] == [{"photo": str(photos / "coffee.png"), "faces": 0,
                                       "seconds": by_photo["coffee.png"][0]["seconds"]}]
    assert list(by_photo["broken.jpg"][0]) == ["photo", "error"]
    assert not (out / "coffee.png").exists() and not (out / "broken.png").exists()
    for name, stem in (("astronaut.png", "astronaut"), ("group.jpg", "group")):
        rgb = decode_rgb(photos / name)
        boxes, _, chips = _dlib_faces(rgb, dlib.get_frontal_face_detector()(rgb, 1))
        faces = by_photo[name]
        assert [f["box"] for f in faces] == [list(b) for b in boxes]
        for number, (face, chip) in enumerate(zip(faces, chips, strict=True), 1):
            assert face["face"] == number and face["crop"] == f"faces/{stem}-{number}.png"
            np.testing.assert_array_equal(np.asarray(Image.open(out / face["crop"])), chip)
            assert face["emotion_answer"] and face["au_answer"]
            assert face["emotion"] == EMOTIONS[scoring.emotion_of(face["emotion_answer"])]
            assert face["aus"] == [f"AU{a}" for a in sorted(scoring.aus_of(face["au_answer"]), key=int)]
            assert set(face["seconds"]) == {"decode", "detect", "align", "prior"}
        labelled = np.asarray(Image.open(out / f"{stem}.png"))
        assert labelled.shape == rgb.shape and (labelled != rgb).any()  # boxes and labels drawn on it
    page = (out / "index.html").read_text()
    for line in lines:
        assert str(Path(line["photo"])) in page
    assert page.count("<tr>") == 2 + 8  # a header row per photo with faces, a row per face
    for line in lines:  # the emotion as results.jsonl has it, its fallback marked alike on the page
        if "emotion" in line:
            shown = line["emotion"] if line["emotion_named"] else f"{line['emotion']} (fallback: no emotion named)"
            assert f"<td>{shown}</td>" in page

    # the folder holds one run: a rerun into it is refused, and --overwrite replaces it whole
    command = [*RUN, "analyze", "--ckpt", str(workdir / "run" / "model"), "--onnx",
               str(workdir / "landmark_model.onnx"), "--out", str(out), "--max-new-tokens", "8", "--no-progress"]
    before = sorted(p.relative_to(out) for p in out.rglob("*"))
    again = subprocess.run([*command, str(photos / "astronaut.png")], capture_output=True, text=True,
                           env=cpu_env(1), timeout=600)
    assert again.returncode == 1
    assert again.stderr.strip() == f"error: {out} exists and is not empty; pass --overwrite to replace it"
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == before
    same_stem = []  # three photos whose output names would collide: a, a, a-2
    for folder, name in (("p1", "a.jpg"), ("p2", "a.png"), ("p3", "a-2.png")):
        (tmp_path / folder).mkdir()
        shutil.copy(photos / "astronaut.png", tmp_path / folder / name)
        same_stem.append(str(tmp_path / folder / name))
    replaced = subprocess.run([*command, "--overwrite", *same_stem], capture_output=True, text=True,
                              env=cpu_env(1), timeout=600)
    assert replaced.returncode == 0, replaced.stderr[-3000:]
    assert sorted(p.name for p in out.glob("*.png")) == ["a-2-2.png", "a-2.png", "a.png"]  # no group.png left
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    images = ["a.png", "a-2.png", "a-2-2.png"]
    assert sorted({(r["photo"], r["image"]) for r in rows}) == list(zip(same_stem, images, strict=True))
    assert not list(tmp_path.glob(".out.tmp-*"))


def test_a_batch_is_never_padded_past_the_faces_there_are(demo_run, tmp_path):
    """`--batch-size 20000` on one face runs a batch of one row (padded to 20,000 copies it needed 14 GB)."""
    from emola_jax.apps.analyze import analyze
    from emola_jax.checkpoint import load_tokenizer
    from emola_jax.generate import GenerationConfig

    workdir, demo = demo_run
    assert demo.returncode == 0, demo.stderr[-2000:]
    model = workdir / "run" / "model"
    Image.fromarray(skimage_data.astronaut()).save(tmp_path / "astronaut.png")
    tokenizer = load_tokenizer(model)
    summary = analyze([tmp_path / "astronaut.png"], model, tmp_path / "out", onnx=workdir / "landmark_model.onnx",
                      min_score=0.5, batch_size=20000, progress=False,
                      generation=GenerationConfig(max_new_tokens=8, eos_token_id=tokenizer.eos_token_id,
                                                  pad_token_id=tokenizer.pad_token_id))
    assert summary["faces"] == 1 and summary["batch_rows"] == 1
