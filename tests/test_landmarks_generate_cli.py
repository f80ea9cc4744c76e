"""The official landmark recipe on an ONNX graph with 2d106det's signature, and `run.py generate`."""

import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from emola_jax.data import landmarks

ROOT = Path(__file__).resolve().parent.parent


def _landmark_graph(path: Path, batch: int | str = 1) -> tuple[np.ndarray, np.ndarray]:
    """`[N, 3, 192, 192] -> [N, 212]`: per-channel spatial means, then an affine map."""
    rng = np.random.default_rng(0)
    weight, bias = rng.standard_normal((3, 212)).astype(np.float32), rng.standard_normal(212).astype(np.float32)
    nodes = [
        helper.make_node("ReduceMean", ["data", "axes"], ["pooled"], keepdims=0),
        helper.make_node("MatMul", ["pooled", "w"], ["projected"]),
        helper.make_node("Add", ["projected", "b"], ["fc1"]),
    ]
    graph = helper.make_graph(
        nodes, "landmark_106",
        [helper.make_tensor_value_info("data", TensorProto.FLOAT, [batch, 3, 192, 192])],
        [helper.make_tensor_value_info("fc1", TensorProto.FLOAT, [batch, 212])],
        [helper.make_tensor("axes", TensorProto.INT64, [2], [2, 3]),
         helper.make_tensor("w", TensorProto.FLOAT, [3, 212], weight.ravel()),
         helper.make_tensor("b", TensorProto.FLOAT, [212], bias)],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), path)
    return weight, bias


@pytest.mark.parametrize("batch", [1, "N"])
def test_official_recipe_by_hand(tmp_path, batch):
    weight, bias = _landmark_graph(tmp_path / "2d106det.onnx", batch)
    rng = np.random.default_rng(1)
    paths = []
    for i, (h, w) in enumerate([(120, 90), (192, 192), (64, 300)]):
        paths.append(tmp_path / f"{i}.jpg")
        cv2.imwrite(str(paths[-1]), rng.integers(0, 255, (h, w, 3), dtype=np.uint8))
    got = landmarks.official_features(landmarks.open_session(tmp_path / "2d106det.onnx"), paths)
    for row, path in zip(got, paths, strict=True):
        bgr = cv2.resize(cv2.imread(str(path)), (192, 192)).astype(np.float32) / 255.0  # BGR, whole image
        expected = bgr.mean(axis=(0, 1)) @ weight + bias  # channel order B, G, R as the graph sees it
        np.testing.assert_allclose(row, expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="could not be read"):
        landmarks.official_features(landmarks.open_session(tmp_path / "2d106det.onnx"), [tmp_path / "none.jpg"])


def test_generate_cli(eval_checkpoint, tmp_path):
    from emola_jax.generate import GenerationConfig
    from emola_jax.predictor import Predictor

    root, ckpt = eval_checkpoint
    _landmark_graph(tmp_path / "2d106det.onnx")
    image = root / "data" / "images" / "2.png"
    question = "What emotions are conveyed by this face?"
    run = [sys.executable, str(ROOT / "run.py"), "generate", "--ckpt", str(ckpt), "--image", str(image),
           "--prompt", question, "--max-new-tokens", "6"]
    with_npy = subprocess.run(run + ["--prior-npy", str(root / "data" / "landmarks" / "2.npy")],
                              capture_output=True, text=True)
    assert with_npy.returncode == 0, with_npy.stderr[-2000:]
    evaluator = Predictor(ckpt, generation=GenerationConfig(max_new_tokens=6, eos_token_id=2, pad_token_id=3))
    expected = evaluator.answer(image, question, np.load(root / "data" / "landmarks" / "2.npy"))
    assert with_npy.stdout.strip() == expected
    with_onnx = subprocess.run(run + ["--onnx", str(tmp_path / "2d106det.onnx")], capture_output=True, text=True)
    assert with_onnx.returncode == 0, with_onnx.stderr[-2000:]
    features = landmarks.official_features(landmarks.open_session(tmp_path / "2d106det.onnx"), [image])[0]
    assert with_onnx.stdout.strip() == evaluator.answer(image, question, features)
    missing = subprocess.run(run, capture_output=True, text=True)
    assert missing.returncode == 1 and "--prior-npy" in missing.stderr


def test_generate_refuses_bad_numbers_and_arrays(eval_checkpoint, tmp_path, capsys):
    import run

    root, ckpt = eval_checkpoint
    image = root / "data" / "images" / "2.png"
    nan = np.load(root / "data" / "landmarks" / "2.npy")
    nan[[3, 7]] = np.nan
    np.save(tmp_path / "nan.npy", nan)
    common = ["generate", str(ckpt), "--image", str(image), "--prompt", "What emotions are conveyed by this face?"]
    cases = {
        ("--temperature", "-1"): "temperature must be a number >= 0 (0 decodes greedily), not -1.0",
        ("--top-p", "0"): "top_p must be in (0, 1] (1 keeps every token), not 0.0",
        ("--top-p", "5"): "top_p must be in (0, 1] (1 keeps every token), not 5.0",
        ("--max-new-tokens", "0"): "max_new_tokens must be at least 1, not 0",
        ("--prior-npy", str(tmp_path / "nan.npy")): f"landmark file {tmp_path / 'nan.npy'} holds 2 values that are "
                                                   "NaN or infinite",
        ("--max-new-tokens", "5000"): "exceeds the model's context of 4096 positions",
    }
    for flags, message in cases.items():
        landmarks = [] if "--prior-npy" in flags else ["--prior-npy", str(root / "data" / "landmarks" / "2.npy")]
        assert run.main([*common, *landmarks, *flags]) == 1, flags
        out, err = capsys.readouterr()
        assert out == "" and err.startswith("error: ") and message in err and len(err.splitlines()) == 1, (flags, err)


def test_generate_onnx_refuses_a_truncated_jpeg(eval_checkpoint, tmp_path, capsys):
    """OpenCV decodes a JPEG cut short without complaint (grey rows); the official recipe must not
    turn it into a prior feature, as `precompute-landmarks` does not."""
    import run

    root, ckpt = eval_checkpoint
    _landmark_graph(tmp_path / "2d106det.onnx")
    pixels = cv2.imread(str(root / "data" / "images" / "2.png"))
    data = cv2.imencode(".jpg", pixels)[1].tobytes()
    truncated = tmp_path / "cut.jpg"
    truncated.write_bytes(data[: len(data) * 2 // 3])
    assert cv2.imread(str(truncated)) is not None  # what makes the check necessary
    with pytest.raises(ValueError, match="truncated JPEG"):
        landmarks.official_features(landmarks.open_session(tmp_path / "2d106det.onnx"), [truncated])
    args = ["generate", str(ckpt), "--image", str(truncated), "--onnx", str(tmp_path / "2d106det.onnx"),
            "--prompt", "What emotions are conveyed by this face?", "--max-new-tokens", "6"]
    assert run.main(args) == 1
    out, err = capsys.readouterr()
    assert out == "" and len(err.splitlines()) == 1
    assert err == f"error: image {truncated}: truncated JPEG (no end-of-image marker after the last scan)\n"
