"""QLoRA's quantised base: qwix's codes against a numpy reference, the NF4 code book against
bitsandbytes', logits against the float base within measured bounds, and `run.py convert --quantize`
then `run.py train` on the quantised base as a user runs them."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import qwix
from flax import nnx

import configs
import run
from converters import convert
from emola_jax import weights
from emola_jax.checkpoint import SOURCE_FILE, check_base, load_pretrained, write_quantization
from emola_jax.models import EmolaForConditionalGeneration
from emola_jax.models.tree import abstract_model, is_decoder_kernel, quantize_model
from emola_jax.quantization import Quantization, as_array
from emola_jax.train.config import TrainConfig
from tests import reference as ref
from tests.processes import ROOT, Run

# bitsandbytes' NF4 code book (`bitsandbytes.functional.get_4bit_type("nf4")`, the table its CUDA
# kernels dequantise with), written out here as the reference.
BNB_NF4 = np.array([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0,
], np.float32)

# Measured on the tiny random EmoLA (`configs/tiny.py`, float32, seed 0), 8 held-out rows of 48
# tokens (`python -m pytest tests/test_quantization.py`; numbers in README "QLoRA"): int8 max |dlogit|
# 0.079 with 97.9 % argmax agreement; nf4 (block 64) 1.41 with 68.2 %. The bounds leave ~1.5x room.
# The random model's logits are nearly flat (std 1.0), so its argmax flips easily; a trained model's
# agree far more often.
BOUNDS = {"int8": (0.12, 0.95), "nf4": (2.1, 0.6)}  # (max |dlogit|, least argmax agreement)


def _tiny_base() -> tuple:
    config = configs.load("tiny").model.replace(lora=None)
    return config, weights.flat(EmolaForConditionalGeneration(config, rngs=nnx.Rngs(0)))


def _model(config, params, quantization=None):
    model = weights.from_flat(abstract_model(config), dict(params))
    return quantize_model(model, quantization) if quantization is not None else model


def _held_out(config, rows: int = 8, seed: int = 7):
    rs = np.random.RandomState(seed)
    ids = rs.randint(0, config.text.vocab_size - 1, (rows, 48))
    ids[:, 1:1 + config.image_seq_length] = config.image_token_id
    size = config.vision.image_size
    landmarks = None if config.prior_position == "off" else rs.randn(rows, config.prior_dim).astype(np.float32)
    return ids, rs.randn(rows, size, size, 3).astype(np.float32), landmarks


def _numpy_quantize(kernel: np.ndarray, method: str, block: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The definition, in numpy: absmax scale per output channel and block of inputs; int8 rounds
    `w / (absmax / 127.5)` and saturates, nf4 takes the nearest code of `w / absmax`. Also returns
    each weight's distance to the nearest rounding boundary (where float rounding may pick either side)."""
    *lead, fan_in, fan_out = kernel.shape
    block = block or fan_in
    blocks = kernel.reshape(*lead, fan_in // block, block, fan_out)
    absmax = np.abs(blocks).max(axis=-2, keepdims=True)
    scale = absmax / (127.5 if method == "int8" else 1.0)
    scaled = blocks / scale
    if method == "int8":
        codes = np.clip(np.round(scaled), -128, 127).astype(np.int8)
        tie = np.abs(np.abs(scaled - np.floor(scaled)) - 0.5)
    else:
        codes = np.abs(scaled[..., None] - BNB_NF4).argmin(-1).astype(np.uint8)
        tie = np.abs(scaled[..., None] - (BNB_NF4[1:] + BNB_NF4[:-1]) / 2).min(-1)
    return codes.reshape(kernel.shape), scale[..., 0, :], tie.reshape(kernel.shape)


def _numpy_dequantize(codes: np.ndarray, scale: np.ndarray, method: str) -> np.ndarray:
    values = codes.astype(np.float32) if method == "int8" else BNB_NF4[codes.astype(np.int64)]
    return values * np.repeat(scale, codes.shape[-2] // scale.shape[-2], axis=-2)


def test_the_nf4_code_book_is_bitsandbytes_own():
    codes = np.arange(16, dtype=ml_dtypes.uint4).reshape(16, 1)
    book = as_array(qwix.QArray(jnp.asarray(codes), jnp.ones((1, 1), jnp.float32), None, "nf4"))
    np.testing.assert_array_equal(np.asarray(book)[:, 0], BNB_NF4)
    # each value of the book (times a scale) quantises back to its own code
    q = Quantization("nf4", 0).quantize(jnp.asarray(BNB_NF4.reshape(16, 1) * 3.0))
    np.testing.assert_array_equal(np.asarray(q.qvalue).astype(int)[:, 0], np.arange(16))
    np.testing.assert_allclose(np.asarray(q.scale), [[3.0]])


@pytest.mark.parametrize("method,block", [("int8", 0), ("nf4", 64)])
def test_the_quantised_forward_pass_is_the_numpy_dequantised_one(method, block):
    config, params = _tiny_base()
    quantization = Quantization(method, block)
    quantized = _model(config, params, quantization)
    dequantized = dict(params)
    for path, kernel in weights.flat(quantized).items():
        if not is_decoder_kernel(path):
            continue
        codes, scale, tie = _numpy_quantize(np.asarray(params[path]), method, block)
        got = np.asarray(kernel.qvalue).astype(np.int64)
        differs = got != codes.astype(np.int64)  # only a float rounding at a boundary, by one code
        assert np.all(tie[differs] < 1e-4) and np.all(np.abs(got - codes)[differs] == 1), path
        assert differs.sum() <= scale.size, path  # e.g. a block's absmax weight at +-127.5 for int8
        np.testing.assert_allclose(np.asarray(kernel.scale), scale, rtol=3e-7)  # one float32 ulp
        dequantized[path] = jnp.asarray(_numpy_dequantize(got, scale, method))  # qwix's codes, numpy's values
    ids, pixels, landmarks = _held_out(config, rows=2)
    expected = _model(config, dequantized)(ids, pixels, landmarks=landmarks)
    np.testing.assert_allclose(quantized(ids, pixels, landmarks=landmarks), expected, atol=2e-5, rtol=0)


def test_int8_and_nf4_logits_stay_within_the_measured_bounds_of_the_float_base():
    config, params = _tiny_base()
    ids, pixels, landmarks = _held_out(config)
    exact = _model(config, params)(ids, pixels, landmarks=landmarks)
    errors = {}
    for method, (max_abs, agreement) in BOUNDS.items():
        logits = _model(config, params, Quantization(method, 64))(ids, pixels, landmarks=landmarks)
        errors[method] = float(jnp.abs(logits - exact).max())
        agree = float(jnp.mean(jnp.argmax(logits, -1) == jnp.argmax(exact, -1)))
        assert errors[method] <= max_abs and agree >= agreement, (method, errors[method], agree)
    assert errors["int8"] < errors["nf4"] / 5  # 8 bits per weight against 4


def test_bad_quantisation_settings_are_one_sentence_before_anything_runs(tmp_path):
    with pytest.raises(ValueError, match=r"train.base_quantization 'nf3' is unknown; choose one of none, int8, nf4"):
        TrainConfig(base_quantization="nf3")
    with pytest.raises(ValueError, match="quantization_block_size must be a whole number at least 0"):
        TrainConfig(quantization_block_size=-8)
    config, _ = _tiny_base()
    with pytest.raises(ValueError, match=r"train.quantization_block_size 48 does not divide the input dimension 256 "
                                         r"of language_model/layers/mlp/down_proj/kernel"):
        quantize_model(abstract_model(config), Quantization("nf4", 48))
    write_quantization(tmp_path, Quantization("int8", 32))
    with pytest.raises(ValueError, match=r"quantised as int8 with block size 32; set train.base_quantization=int8"):
        check_base(Quantization("nf4", 32), tmp_path)


def _losses(workdir: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (workdir / "metrics.jsonl").read_text().splitlines()]


# nf4 (block 16) on `tests/reference.py`'s tiny LLaVA, whose large weights make logits of order
# 1-5: measured max |dlogit| 3.82 and 81 % argmax agreement on 2 held-out rows; ~1.5x room.
CLI_BOUNDS = (5.7, 0.6)
RUN_CONFIG = """
from emola_jax.config import LoRAConfig
from emola_jax.data.synthetic import SyntheticData
from emola_jax.train.config import Experiment, FromBase, TrainConfig


def get_config():
    train = TrainConfig(steps=2, checkpoint_every=2, remat="none", trainable=((r"language_model/.*/lora_[ab]", 1e-2),))
    return Experiment(model=FromBase(lora=LoRAConfig(rank=4, alpha=8.0), prior_position="off"), train=train,
                      data=SyntheticData(batch_size=4, seq_length=32))
"""


HF_COMMIT = "5dc5a3c7e8a1b0f2d4c6e8a0b2d4f6a8c0e2a4b6"  # the snapshot folder a hub commit names
HF_SNAPSHOT = Path("hf_home/hub/models--tiny-org--llava-tiny-hf/snapshots") / HF_COMMIT


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    """A tiny transformers LLaVA converted twice: unquantised in-process, NF4 (block 16) by
    `run.py convert --quantize` in its own process, as a user runs it: by its hub id, from a
    Hugging Face cache laid out as huggingface_hub lays it out, in the process's HF_HOME."""
    tmp = tmp_path_factory.mktemp("qlora")
    repo = tmp / "hf_home" / "hub" / "models--tiny-org--llava-tiny-hf"
    hf = tmp / HF_SNAPSHOT
    ref.build_llava(ref.llava_config()).save_pretrained(hf)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(HF_COMMIT)
    convert(hf, tmp / "plain")
    Run(["convert", "tiny-org/llava-tiny-hf", str(tmp / "nf4"), "--quantize", "nf4", "--block-size", "16"], count=1,
        devices=1, cwd=ROOT, logs=tmp / "logs", env={"HF_HOME": str(tmp / "hf_home"), "HF_HUB_CACHE": None}).check()
    assert json.loads((tmp / "nf4" / SOURCE_FILE).read_text())["src"] == str(hf.resolve())
    (tmp / "qlora_run.py").write_text(RUN_CONFIG)
    return tmp


def _train_args(bases: Path, workdir: Path, base: str, *settings: str) -> list[str]:
    args = ["train", "--config", str(bases / "qlora_run.py"), "--workdir", str(workdir), "--set",
            f"train.base={bases / base}"]
    for setting in settings:
        args += ["--set", setting]
    return args


def test_convert_quantize_then_train_and_load_as_a_user_does(bases, tmp_path, capsys):
    assert json.loads((bases / "nf4" / "quantization.json").read_text()) == {"method": "nf4", "block_size": 16}
    assert not list(bases.glob(".nf4.*"))  # the unquantised copy is gone

    # the stored codes are those a quantisation on load makes; the logits stay near the float base's
    stored, config = load_pretrained(bases / "nf4")
    plain, _ = load_pretrained(bases / "plain")
    ids, pixels, landmarks = _held_out(config, rows=2)
    exact = plain(ids, pixels, landmarks=landmarks)
    on_load = quantize_model(plain, Quantization("nf4", 16))(ids, pixels, landmarks=landmarks)
    np.testing.assert_array_equal(stored(ids, pixels, landmarks=landmarks), on_load)
    agree = float(jnp.mean(jnp.argmax(on_load, -1) == jnp.argmax(exact, -1)))
    assert float(jnp.abs(on_load - exact).max()) <= CLI_BOUNDS[0] and agree >= CLI_BOUNDS[1]

    # a short QLoRA run over the stored codes; its final model holds exactly their dequantised values
    nf4 = ("train.base_quantization=nf4", "train.quantization_block_size=16")
    assert run.main(_train_args(bases, tmp_path / "run", "nf4", *nf4)) == 0
    assert all(np.isfinite(_losses(tmp_path / "run")))
    saved = json.loads((tmp_path / "run" / "model" / "source.json").read_text())
    assert saved["base_quantization"] == {"method": "nf4", "block_size": 16}
    trained, _ = load_pretrained(tmp_path / "run" / "model")
    for name in ("q_proj", "o_proj"):
        np.testing.assert_array_equal(getattr(trained.language_model.layers.self_attn, name).kernel[...],
                                      as_array(getattr(stored.language_model.layers.self_attn, name).kernel[...]))

    # a block size that does not divide a kernel is refused before anything compiles
    capsys.readouterr()
    assert run.main(_train_args(bases, tmp_path / "bad", "plain", "train.base_quantization=nf4",
                                "train.quantization_block_size=32")) == 1
    assert "train.quantization_block_size 32 does not divide the input dimension 48 of language_model/layers/" in \
        capsys.readouterr().err


def test_convert_quantize_guards_its_source_and_cleans_a_killed_runs_copy(bases, tmp_path, capsys):
    """`convert --quantize --overwrite` into the source (or its parent) is refused as plain `convert`
    refuses it, the source untouched; the unquantised copy a killed run left is removed by the rerun."""
    hf = bases / HF_SNAPSHOT
    before = sorted((p.name, p.stat().st_size) for p in hf.iterdir())
    for out in (hf, bases):
        capsys.readouterr()
        assert run.main(["convert", str(hf), str(out), "--quantize", "nf4", "--block-size", "16", "--overwrite"]) == 1
        assert capsys.readouterr().err.strip().startswith(f"error: OUT {out} ")
        assert sorted((p.name, p.stat().st_size) for p in hf.iterdir()) == before
    # settings that cannot work are refused before any weight is read: nothing written
    capsys.readouterr()
    assert run.main(["convert", str(hf), str(tmp_path / "b32"), "--quantize", "nf4", "--block-size", "32"]) == 1
    assert capsys.readouterr().err.strip() == ("error: --block-size 32 does not divide the input dimension 48 of "
                                               "language_model/layers/mlp/gate_proj/kernel")
    assert run.main(["convert", str(hf), str(tmp_path / "plain"), "--block-size", "16"]) == 1
    assert capsys.readouterr().err.strip() == "error: --block-size goes with --quantize int8 or nf4"
    assert not list(tmp_path.iterdir())
    # a process that dies the moment the quantisation starts (as under `kill -9`) leaves the whole
    # unquantised copy; the rerun removes it, then writes OUT
    args = ["convert", str(hf), str(tmp_path / "nf4"), "--quantize", "nf4", "--block-size", "16"]
    dies = ("import os, sys, run; from emola_jax.apps import convert; "
            "convert.quantize_checkpoint = lambda *a, **k: os._exit(9); sys.exit(run.main(sys.argv[1:]))")
    killed = subprocess.run([sys.executable, "-c", dies, *args], cwd=ROOT, capture_output=True, text=True)
    assert killed.returncode == 9
    [left] = tmp_path.glob(".nf4.tmp-unquantized-*")
    assert (left / "checkpoint" / "config.json").is_file() and not (tmp_path / "nf4").exists()
    assert run.main(args) == 0
    assert not list(tmp_path.glob(".nf4.*"))
    assert json.loads((tmp_path / "nf4" / "quantization.json").read_text())["method"] == "nf4"


@pytest.mark.slow  # two QLoRA trainings (25 s); the default run trains a stored nf4 base through run.py
def test_a_stored_nf4_base_and_one_quantised_on_load_train_the_same_run(bases, tmp_path):
    nf4 = ("train.base_quantization=nf4", "train.quantization_block_size=16")
    assert run.main(_train_args(bases, tmp_path / "stored", "nf4", *nf4)) == 0
    assert run.main(_train_args(bases, tmp_path / "on-load", "plain", *nf4)) == 0
    assert _losses(tmp_path / "stored") == _losses(tmp_path / "on-load")  # to the last bit
