"""Damaged checkpoints and refused resumes, through `run.py` as a user meets them: exit code 1, one
line on stderr that names the checkpoint, no library dump or traceback, and nothing written."""

import shutil
import subprocess
import sys

import numpy as np
import pytest

from tests.processes import ROOT, SMALL_TRAIN, cpu_env

RUN = [sys.executable, str(ROOT / "run.py")]


def _run(*args: str, cwd) -> subprocess.CompletedProcess:
    return subprocess.run([*RUN, *args], cwd=cwd, env=cpu_env(1), capture_output=True, text=True, timeout=600)


def _one_line_error(result: subprocess.CompletedProcess, expected: str) -> str:
    lines = [line for line in result.stderr.splitlines() if line.strip() and "%|" not in line]  # no progress bars
    assert result.returncode == 1, result.stderr
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], result.stderr
    assert len(lines[0]) < 600, lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, small_run):
    """A finished synthetic run (`SMALL_TRAIN`: checkpoints at steps 2 and 4, WORKDIR/model), this
    module's own copy."""
    workdir = tmp_path_factory.mktemp("run") / "w"
    shutil.copytree(small_run, workdir)
    return workdir


DAMAGES = {
    "scrambled weight index": (lambda p: (p / "state" / "_METADATA").write_text("{not json"),
                               "is not a readable emola-jax checkpoint: its weight index is damaged"),
    "weights missing": (lambda p: shutil.rmtree(p / "state"), "is not a readable emola-jax checkpoint: "),
    "checkpoint metadata missing": (lambda p: (p / "_CHECKPOINT_METADATA").unlink(),
                                    "is not a readable emola-jax checkpoint: "),
}


def test_a_weight_file_cut_in_half_is_named(trained, tmp_path):
    """The line names the folder and not the library's internals. Orbax may print tracebacks of its
    closed event loop before it (tensorstore reads still in flight when one fails, from threads of
    their own: no Python hook sees them); the line comes last, whole."""
    model = tmp_path / "model"
    shutil.copytree(trained / "model", model)
    data = max((model / "params" / "state").rglob("d/*"), key=lambda f: f.stat().st_size)
    data.write_bytes(data.read_bytes()[: data.stat().st_size // 2])
    result = _run("export", str(model), str(tmp_path / "out"), "--format", "hf", cwd=tmp_path)
    assert result.returncode == 1
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith(f"error: could not read the weights in {model / 'params'} (damaged or cut short?): ")
    assert "pybind11" not in line and "bound method" not in line
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.tmp-*"))


@pytest.mark.parametrize("damage", list(DAMAGES))
def test_damaged_checkpoint_is_one_line_naming_it(trained, tmp_path, damage):
    model = tmp_path / "model"
    shutil.copytree(trained / "model", model)
    spoil, expected = DAMAGES[damage]
    spoil(model / "params")
    result = _run("export", str(model), str(tmp_path / "out"), "--format", "hf", cwd=tmp_path)
    line = _one_line_error(result, expected)
    assert str(model / "params") in line
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.tmp-*"))


def test_resume_of_other_weights_is_one_line_and_leaves_the_run(trained, tmp_path):
    workdir = tmp_path / "w"
    shutil.copytree(trained, workdir)
    before = sorted(p.name for p in (workdir / "checkpoints").iterdir())
    result = _run(*SMALL_TRAIN, "--workdir", str(workdir), "--set", "model.lora.rank=2", cwd=tmp_path)
    _one_line_error(result, "")
    assert "Traceback" not in result.stderr and "registry" not in result.stderr
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == before


def test_weights_of_another_shape_are_named_before_orbax_reads(trained):
    """The resume check itself (a rerun that changes the trainable weights): names them, in one line."""
    import jax
    import numpy as np

    from emola_jax.train.checkpoints import TrainCheckpoints

    with TrainCheckpoints(trained, keep=1, base=None, fingerprint=None) as checkpoints:
        saved = checkpoints._checkpointer.metadata(2).metadata
        abstract = {"params": jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype), saved["params"])}
        lora_a = abstract["params"]["language_model"]["layers"]["self_attn"]["q_proj"]
        lora_a["lora_a"] = jax.ShapeDtypeStruct((1, 128, 4), np.float32)
        with pytest.raises(ValueError, match=r"holds other trainable weights than this run has \(1 differ; "
                                             r"language_model/layers/self_attn/q_proj/lora_a: \(\(1, 128, 16\), "
                                             r"'float32'\) there, \(\(1, 128, 4\), 'float32'\) here\)"):
            checkpoints.restore(abstract)


def test_mesh_larger_than_the_devices_is_one_line(tmp_path):
    result = _run("train", "--config", "tiny", "--workdir", str(tmp_path / "w"), "--steps", "2",
                  "--mesh", "data=3", cwd=tmp_path)
    _one_line_error(result, "needs 3 devices; there are 1")
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "w" / "model").exists()


@pytest.mark.parametrize("damage, expected", [
    ("absent", "error: checkpoint {model} does not exist"),
    ("torn tokenizer", "error: the tokenizer in {model}/tokenizer cannot be read ("),
])
def test_a_checkpoint_that_is_not_there_or_has_a_torn_tokenizer_is_named(demo_run, tmp_path, damage, expected):
    model = tmp_path / "model"
    if damage != "absent":
        shutil.copytree(demo_run[0] / "run" / "model", model)
        tokenizer = model / "tokenizer" / "tokenizer.json"
        tokenizer.write_bytes(tokenizer.read_bytes()[:1000])
    (tmp_path / "face.png").write_bytes((ROOT / "docs" / "analyze_example.png").read_bytes())
    np.save(tmp_path / "face.npy", np.zeros(212, np.float32))
    for command in (["generate", str(model), "--image", str(tmp_path / "face.png"), "--prompt", "?",
                     "--prior-npy", str(tmp_path / "face.npy")],
                    ["evaluate", "--ckpt", str(model), "--data", str(tmp_path / "a.json"), "--task", "emotion",
                     "--out", str(tmp_path / "out")]):
        line = _one_line_error(_run(*command, cwd=tmp_path), "")
        assert line.startswith(expected.format(model=model)), line
    assert not (tmp_path / "out").exists()
