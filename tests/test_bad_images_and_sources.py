"""Bad input and interrupted work: every image mode reaches CLIP and the landmark model as one
8-bit picture or is refused by both; checkpoint files are picked as transformers picks them; no
command overwrites its own input; a rerun removes the staging leftovers of a killed run."""

import fcntl
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from converters.readers import weight_files
from emola_jax import atomic
from emola_jax.data import image, landmarks
from tests import reference as ref

ROOT = Path(__file__).resolve().parent.parent
H, W = 7, 9


def _run(*args, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "run.py"), *map(str, args)], capture_output=True, text=True,
                          cwd=cwd or ROOT, timeout=300)


def _one_error_line(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 1, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


# ---------------------------------------------------------------- image modes


def _gray3(gray: np.ndarray) -> np.ndarray:
    return np.repeat(gray[..., None], 3, axis=-1).astype(np.uint8)


def _image_cases(directory: Path) -> dict[str, tuple[Path, np.ndarray | None]]:
    """Files of every mode, each with the 8-bit RGB picture both models must see (None: refused),
    computed here from the arrays the file was written from."""
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (H, W, 3), dtype=np.uint8)
    gray = rng.integers(0, 256, (H, W), dtype=np.uint8)
    alpha = rng.integers(0, 256, (H, W), dtype=np.uint8)
    gray16 = rng.integers(0, 65536, (H, W), dtype=np.uint16)
    rgb16 = rng.integers(0, 65536, (H, W, 3), dtype=np.uint16)
    palette = rng.integers(0, 256, (256, 3), dtype=np.uint8)
    index = (gray % 16).astype(np.uint8)
    cases = {}

    def save(name, picture, expected, **kw):
        picture.save(directory / name, **kw)
        cases[name] = (directory / name, expected)

    save("gray.png", Image.fromarray(gray, "L"), _gray3(gray))
    save("gray_alpha.png", Image.fromarray(np.dstack([gray, alpha]), "LA"), _gray3(gray))  # alpha dropped
    indexed = Image.fromarray(index, "P")
    indexed.putpalette(palette.reshape(-1).tolist())
    save("palette.png", indexed, palette[index])
    save("palette_transparent.png", indexed, palette[index], transparency=3)  # tRNS: colours kept
    save("rgba.png", Image.fromarray(np.dstack([rgb, alpha]), "RGBA"), rgb)  # alpha dropped, not composited
    bits = gray > 128
    save("one_bit.png", Image.fromarray(bits), _gray3(bits * 255))
    save("one_bit.tif", Image.fromarray(bits), _gray3(bits * 255))
    save("gray16.png", Image.fromarray(gray16), _gray3(gray16 >> 8))  # 16 bits: the high byte, as OpenCV
    save("gray16.tif", Image.fromarray(gray16), _gray3(gray16 >> 8))
    cv2.imwrite(str(directory / "rgb16.png"), rgb16[..., ::-1])
    cases["rgb16.png"] = (directory / "rgb16.png", (rgb16 >> 8).astype(np.uint8))
    cmyk = Image.fromarray(rgb).convert("CMYK")
    cmyk.save(directory / "cmyk.jpg", quality=95)
    with Image.open(directory / "cmyk.jpg") as decoded:  # the stored CMYK; OpenCV's icvCvt_CMYK2BGR_8u
        c = np.asarray(decoded).astype(np.int32)
    white = 255 - c[..., 3:]
    cases["cmyk.jpg"] = (directory / "cmyk.jpg", (white - ((c[..., :3] * white) >> 8)).astype(np.uint8))
    save("int32.tif", Image.fromarray(gray16.astype(np.int32) * 3 - 1000, "I"), None)
    save("float.tif", Image.fromarray(rng.random((H, W)).astype(np.float32), "F"), None)
    save("cmyk.tif", cmyk, None)
    cv2.imwrite(str(directory / "rgb16.tif"), rgb16)
    cases["rgb16.tif"] = (directory / "rgb16.tif", None)
    return cases


def test_every_mode_reaches_clip_and_the_landmark_model_as_one_picture(tmp_path):
    for name, (path, expected) in _image_cases(tmp_path).items():
        if expected is None:
            with pytest.raises(ValueError) as clip_error:
                image.load_image(path)
            with pytest.raises(ValueError) as landmark_error:
                landmarks.read_bgr(path)
            assert str(clip_error.value) == str(landmark_error.value), name  # one sentence, both paths
            assert str(clip_error.value).startswith(f"image {path}: its "), name
            continue
        clip = np.asarray(image.load_image(path))
        from_bytes = np.asarray(image.load_image(io.BytesIO(path.read_bytes())))  # the pipeline's tfds path
        bgr = landmarks.read_bgr(path)
        assert clip.dtype == bgr.dtype == np.uint8 and clip.shape == (H, W, 3), name
        np.testing.assert_array_equal(clip, expected, err_msg=name)
        np.testing.assert_array_equal(from_bytes, expected, err_msg=name)
        np.testing.assert_array_equal(bgr[..., ::-1], expected, err_msg=name)
        np.testing.assert_array_equal(bgr, cv2.imread(str(path)), err_msg=name)  # still the official imread


def test_transparent_gif_shows_the_background_colour_as_opencv_does(tmp_path):
    rng = np.random.default_rng(1)
    index = rng.integers(0, 8, (H, W), dtype=np.uint8)
    palette = rng.integers(0, 256, (256, 3), dtype=np.uint8)
    picture = Image.fromarray(index, "P")
    picture.putpalette(palette.reshape(-1).tolist())
    picture.save(tmp_path / "a.gif", transparency=2, optimize=False)
    with Image.open(tmp_path / "a.gif") as stored:
        stored_index, stored_palette = np.asarray(stored), np.asarray(stored.getpalette()).reshape(-1, 3)
        transparent, background = stored.info["transparency"], stored.info.get("background", 0)
    expected = stored_palette[stored_index].astype(np.uint8)
    expected[stored_index == transparent] = stored_palette[background]
    np.testing.assert_array_equal(np.asarray(image.load_image(tmp_path / "a.gif")), expected)
    if cv2.haveImageReader(str(tmp_path / "a.gif")):
        np.testing.assert_array_equal(landmarks.read_bgr(tmp_path / "a.gif")[..., ::-1], expected)


# ---------------------------------------------------------------- weight files


def _layout(directory: Path, names: list[str], explicit: str | None = None) -> Path:
    directory.mkdir()
    for name in names:
        if name.endswith(".index.json"):
            stem, ext = ("model", "safetensors") if name.startswith("model") else ("pytorch_model", "bin")
            shards = [f"{stem}-0000{i}-of-00002.{ext}" for i in (1, 2)]
            (directory / name).write_text(json.dumps({"metadata": {}, "weight_map": {"a": shards[0], "b": shards[1]}}))
            for shard in shards:
                (directory / shard).write_bytes(b"x")
        else:
            (directory / name).write_bytes(b"x")
    (directory / "config.json").write_text(json.dumps({} if explicit is None else {"transformers_weights": explicit}))
    return directory


@pytest.mark.parametrize("names, explicit", [
    (["model.safetensors"], None),
    (["model.safetensors.index.json"], None),
    (["model.safetensors", "model.safetensors.index.json"], None),
    (["model.safetensors.index.json", "pytorch_model.bin"], None),
    (["pytorch_model.bin", "pytorch_model.bin.index.json"], None),
    (["pytorch_model.bin.index.json"], None),
    (["model.safetensors", "pytorch_model.bin"], None),
    (["model.safetensors", "model.safetensors.index.json"], "model.safetensors.index.json"),
])
def test_weight_files_are_the_ones_transformers_loads(tmp_path, names, explicit):
    from transformers.modeling_utils import _get_resolved_checkpoint_files

    directory = _layout(tmp_path / "ckpt", names, explicit)
    theirs, _ = _get_resolved_checkpoint_files(str(directory), variant=None, gguf_file=None, use_safetensors=None,
                                               user_agent={}, is_remote_code=False,
                                               transformers_explicit_filename=explicit)
    assert [Path(p).resolve() for p in weight_files(directory)] == sorted(Path(p).resolve() for p in theirs)


def test_convert_reads_the_single_file_when_shards_sit_beside_it(tmp_path):
    import emola_jax

    config = ref.llava_config()
    single = ref.rename(ref.build_llava(config, seed=0).state_dict(), [("model.", "model.")])
    shards = ref.rename(ref.build_llava(config, seed=1).state_dict(), [("model.", "model.")])
    src = ref.save_state(shards, tmp_path / "src", shards=2, config=json.loads(config.to_json_string()))
    ref.save_state(single, src)  # model.safetensors beside model.safetensors.index.json
    result = _run("convert", src, tmp_path / "out")
    assert result.returncode == 0, result.stderr
    model, _ = emola_jax.load_pretrained(tmp_path / "out")
    key = next(k for k in single if k.endswith("embed_tokens.weight"))
    rows = np.asarray(model.language_model.embed_tokens(np.arange(4)))
    np.testing.assert_allclose(rows, single[key][:4].numpy(), rtol=1e-6)
    assert not np.allclose(rows, shards[key][:4].numpy())


# ---------------------------------------------------------------- outputs apart from inputs


def test_check_apart_rule(tmp_path):
    (tmp_path / "src").mkdir()
    for out in (tmp_path / "src", tmp_path / "src" / "inner", tmp_path):
        with pytest.raises(ValueError, match="src"):
            atomic.check_apart("OUT", out, {"the source": tmp_path / "src"})
    atomic.check_apart("OUT", tmp_path / "other", {"the source": tmp_path / "src", "--clip": None})
    (tmp_path / "src" / "link").symlink_to(tmp_path / "other", target_is_directory=True)
    (tmp_path / "other").mkdir()
    with pytest.raises(ValueError, match="must lie outside"):  # the same folder by another name
        atomic.check_apart("OUT", tmp_path / "src" / "link", {"the source": tmp_path / "other"})
    # a folder a command adds named files to may hold inputs under other names
    atomic.check_apart("--out", tmp_path / "src", {"--predictions": tmp_path / "src" / "p.jsonl"},
                       writes=("metrics.json",))
    with pytest.raises(ValueError, match="would overwrite"):
        atomic.check_apart("--out", tmp_path / "src", {"--data": tmp_path / "src" / "metrics.json"},
                           writes=("metrics.json",))


@pytest.fixture(scope="module")
def hf_src(tmp_path_factory):
    directory = tmp_path_factory.mktemp("hf")
    config = ref.llava_config()
    state = ref.rename(ref.build_llava(config).state_dict(), [("model.", "model.")])
    return ref.save_state(state, directory / "src", config=json.loads(config.to_json_string()))


def _tree(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def test_no_command_overwrites_its_input(hf_src, tmp_path):
    before = _tree(hf_src)
    for out in (hf_src, hf_src / "inside", hf_src.parent):
        line = _one_error_line(_run("convert", hf_src, out, "--overwrite"))
        assert "must lie outside the source" in line or "holds the source" in line, line
        assert _tree(hf_src) == before  # the source is whole
    assert not (hf_src / "inside").exists()

    anno = tmp_path / "anno.json"
    anno.write_text("[]")
    line = _one_error_line(_run("precompute-landmarks", "--annotations", anno, "--import-npy", tmp_path,
                                "--out", anno))
    assert line == f"error: --out {anno} must lie outside --annotations {anno} (and not contain it)"
    assert anno.read_text() == "[]"

    results = tmp_path / "results"
    results.mkdir()
    predictions = results / "predictions.jsonl"
    predictions.write_text("not scored\n")
    line = _one_error_line(_run("evaluate", "--ckpt", hf_src, "--data", predictions, "--task", "emotion",
                                "--out", results))
    assert line == (f"error: --out {results} holds --data {predictions}, which the command would overwrite; "
                    "give another --out")
    line = _one_error_line(_run("evaluate", "--predictions", predictions, "--task", "emotion", "--out", predictions))
    assert "must lie outside --predictions" in line
    assert predictions.read_text() == "not scored\n" and sorted(p.name for p in results.iterdir()) == [predictions.name]

    line = _one_error_line(_run("train", "--config", "tiny", "--set", f"train.base={json.dumps(str(hf_src))}",
                                "--workdir", hf_src / "run"))
    assert line == f"error: --workdir {hf_src / 'run'} must lie outside train.base {hf_src} (and not contain it)"
    assert _tree(hf_src) == before and not (hf_src / "run").exists()


# ---------------------------------------------------------------- staging leftovers of killed runs


def _staging(parent: Path, name: str) -> list[Path]:
    return sorted(parent.glob(f".{name}.tmp-*"))


def test_rerun_removes_what_a_killed_convert_left(hf_src, tmp_path):
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, str(ROOT / "run.py"), "convert", str(hf_src), str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT)
    deadline = time.monotonic() + 240
    while not any((s / atomic.STAGING_LOCK).exists() for s in _staging(tmp_path, "out")):
        assert proc.poll() is None and time.monotonic() < deadline, "convert ended before it was killed"
        time.sleep(0.002)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    dead = _staging(tmp_path, "out")
    assert len(dead) == 1 and not out.exists()

    live = atomic.staging_path(out, "live")  # a run still writing: its lock is held
    live.mkdir()
    lock = atomic.lock_staging(live)
    young = atomic.staging_path(out, "young")  # created, not yet locked
    young.mkdir()
    try:
        result = _run("convert", hf_src, out)
        assert result.returncode == 0, result.stderr
        assert sorted(p.name for p in tmp_path.iterdir()) == sorted([".out.tmp-live", ".out.tmp-young", "out"])
        assert not (out / atomic.STAGING_LOCK).exists() and (out / "config.json").is_file()
    finally:
        os.close(lock)
    old = time.time() - 2 * atomic._UNLOCKED_GRACE_S
    os.utime(young, (old, old))
    assert sorted(atomic.remove_dead_staging(out)) == [live, young]


def test_staging_lock_is_held_while_writing_and_gone_after(tmp_path):
    from emola_jax.checkpoint import StagedDirectory

    out = tmp_path / "out"
    with StagedDirectory(out) as staged:
        (staged.staging / "a.txt").write_text("a")
        fd = os.open(staged.staging / atomic.STAGING_LOCK, os.O_RDWR)
        try:
            with pytest.raises(BlockingIOError):
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        finally:
            os.close(fd)
        assert atomic.remove_dead_staging(out) == []
        staged.publish()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert sorted(p.name for p in out.iterdir()) == ["a.txt"]
