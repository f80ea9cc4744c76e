"""Bad checkpoints fail with one sentence naming the key and file, and leave nothing behind."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import emola_jax
from converters import convert
from converters.readers import CheckpointFileError
from tests import reference as ref

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture()
def hf_dir(tmp_path):
    config = ref.llava_config()
    model = ref.build_llava(config)
    state = ref.rename(model.state_dict(), [("model.", "model.")])
    return config, state, tmp_path


def _save(state, config, directory, **kw):
    return ref.save_state(state, directory, config=json.loads(config.to_json_string()), **kw)


def _assert_nothing_written(parent: Path, out: Path):
    assert not out.exists()
    assert not [p for p in parent.iterdir() if p.name.startswith(f".{out.name}.")]


def test_unknown_key_names_key_and_file(hf_dir):
    config, state, tmp = hf_dir
    state["model.language_model.layers.0.self_attn.rogue.weight"] = torch.zeros(2)
    src = _save(state, config, tmp / "src")
    with pytest.raises(KeyError, match=r"rogue\.weight.*model\.safetensors"):
        convert(src, tmp / "out", progress=False)
    _assert_nothing_written(tmp, tmp / "out")


def test_missing_key_names_key(hf_dir):
    config, state, tmp = hf_dir
    del state["model.language_model.layers.1.mlp.down_proj.weight"]
    src = _save(state, config, tmp / "src")
    with pytest.raises(KeyError, match=r"layers\.1\.mlp\.down_proj\.weight"):
        convert(src, tmp / "out", progress=False)
    _assert_nothing_written(tmp, tmp / "out")


def test_shape_mismatch_names_key_file_and_shapes(hf_dir):
    config, state, tmp = hf_dir
    state["model.language_model.layers.0.self_attn.k_proj.weight"] = torch.zeros(48, 48)  # GQA wants 24 x 48
    src = _save(state, config, tmp / "src")
    with pytest.raises(ValueError, match=r"k_proj\.weight.*model\.safetensors.*\(48, 48\).*\(24, 48\)"):
        convert(src, tmp / "out", progress=False)
    _assert_nothing_written(tmp, tmp / "out")


def test_truncated_safetensors_names_file(hf_dir):
    config, state, tmp = hf_dir
    src = _save(state, config, tmp / "src", shards=2)
    shard = sorted(src.glob("model-*.safetensors"))[1]
    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(CheckpointFileError, match=f"{shard.name} is truncated"):
        convert(src, tmp / "out", progress=False)
    _assert_nothing_written(tmp, tmp / "out")


def test_corrupt_header_and_corrupt_bin(hf_dir):
    config, state, tmp = hf_dir
    src = _save(state, config, tmp / "src")
    data = bytearray((src / "model.safetensors").read_bytes())
    data[8:20] = b"not json at!"
    (src / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(CheckpointFileError, match="corrupt safetensors header"):
        convert(src, tmp / "out", progress=False)
    src_bin = _save(state, config, tmp / "bin", fmt="bin")
    (src_bin / "pytorch_model.bin").write_bytes(b"\x00" * 64)
    with pytest.raises(CheckpointFileError, match="pytorch_model.bin could not be read"):
        convert(src_bin, tmp / "out", progress=False)
    _assert_nothing_written(tmp, tmp / "out")


def test_failure_mid_stream_leaves_no_checkpoint(hf_dir, monkeypatch):
    from converters import readers

    config, state, tmp = hf_dir
    src = _save(state, config, tmp / "src")
    calls = {"n": 0}
    original = readers.SafetensorsFile.read

    def flaky(self, key):
        calls["n"] += 1
        if calls["n"] == 40:
            raise OSError("disk went away")
        return original(self, key)

    monkeypatch.setattr(readers.SafetensorsFile, "read", flaky)
    with pytest.raises(OSError, match="disk went away"):
        convert(src, tmp / "out", progress=False)
    _assert_nothing_written(tmp, tmp / "out")


def test_existing_output_needs_overwrite(hf_dir):
    config, state, tmp = hf_dir
    src = _save(state, config, tmp / "src")
    out = tmp / "out"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="--overwrite"):
        convert(src, out, progress=False)
    assert (out / "precious.txt").read_text() == "keep me"
    convert(src, out, overwrite=True, progress=False)
    assert not (out / "precious.txt").exists()
    emola_jax.load_pretrained(out)


def test_load_pretrained_checks_config_against_weights(hf_dir):
    config, state, tmp = hf_dir
    out = convert(_save(state, config, tmp / "src"), tmp / "out", progress=False)
    with pytest.raises(FileNotFoundError, match="config.json is missing"):
        emola_jax.load_pretrained(tmp)
    with pytest.raises(FileNotFoundError, match="must first be converted"):
        emola_jax.load_pretrained(tmp / "src")
    data = json.loads((out / "config.json").read_text())
    data["text"]["intermediate_size"] = 64
    (out / "config.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"down_proj/kernel has shape \(96, 48\), the config needs \(64, 48\)"):
        emola_jax.load_pretrained(out)


def test_cli_errors_are_one_sentence(tmp_path):
    result = subprocess.run(
        [sys.executable, str(ROOT / "run.py"), "convert", str(tmp_path / "nope"), str(tmp_path / "out")],
        capture_output=True, text=True, cwd=ROOT,
    )
    assert result.returncode == 1
    assert result.stderr.strip() == f"error: the source {tmp_path / 'nope'} is not a directory"
    # a hub id absent from the Hugging Face cache: where it was looked for, and how to fetch it
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_CACHE"}
    result = subprocess.run([sys.executable, str(ROOT / "run.py"), "convert", "llava-hf/llava-1.5-7b-hf",
                             str(tmp_path / "out")], capture_output=True, text=True, cwd=ROOT,
                            env={**env, "HF_HOME": str(tmp_path / "hf_home")})
    assert result.returncode == 1
    assert result.stderr.strip() == (
        f"error: the source llava-hf/llava-1.5-7b-hf is neither a directory nor a model in the Hugging Face cache "
        f"({tmp_path / 'hf_home' / 'hub'}); download it with `hf download llava-hf/llava-1.5-7b-hf` (or set "
        "HF_HOME to the cache that holds it)")
    assert not (tmp_path / "out").exists()
