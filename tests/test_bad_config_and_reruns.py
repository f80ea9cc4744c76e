"""Bad settings and reruns, through `run.py` as a user runs it: a train rerun never goes on
silently under other settings; `--set` values are converted and checked by their field's type;
every numeric option is range-checked before any work; `--help` shows every default and what
goes together. Each refusal is one line on stderr, exit code 1 (a bad setting) or 2 (a bad
command line), and leaves the workdir as it was."""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import configs
import run
from emola_jax.config import LoRAConfig, override
from emola_jax.data.pipeline import PipelineConfig
from emola_jax.train.rerun import EXPERIMENT_FILE, check_rerun, recorded
from tests.processes import SMALL_TRAIN, cpu_env

ROOT = Path(__file__).resolve().parents[1]
TRAIN = SMALL_TRAIN


def run_py(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "run.py"), *args], cwd=cwd, env=cpu_env(1),
                          capture_output=True, text=True, timeout=600)


def one_error_line(result: subprocess.CompletedProcess, code: int) -> str:
    """The one line a refused command prints on stderr (and nothing else), after `code`."""
    assert result.returncode == code, result.stderr[-3000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr[-3000:]
    return lines[0]


def snapshot(workdir: Path) -> dict[str, tuple[int, int]]:
    """Every file of a workdir with its size and modification time: what a refused rerun must not touch."""
    return {str(p.relative_to(workdir)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(workdir.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def finished(tmp_path_factory, small_run) -> Path:
    """A finished run of `TRAIN`: 4 steps, checkpoints at 2 and 4, WORKDIR/model written (this
    module's own copy of the shared run, at a path of its own)."""
    workdir = tmp_path_factory.mktemp("runs") / "finished"
    shutil.copytree(small_run, workdir)
    assert (workdir / "model").is_dir() and (workdir / EXPERIMENT_FILE).is_file()
    return workdir


# --- A. a rerun never goes on under other settings ---------------------------------------------


def test_the_workdir_keeps_the_run_s_whole_config(finished):
    saved = json.loads((finished / EXPERIMENT_FILE).read_text())
    assert saved["train"]["steps"] == 4 and saved["train"]["warmup_ratio"] == 0.05 and saved["train"]["seed"] == 0
    assert saved["model"]["lora"]["rank"] == 16 and saved["model"]["text"]["hidden_size"] == 128
    assert saved["data"]["type"].endswith("SyntheticData") and saved["data"]["seq_length"] == 48


@pytest.mark.parametrize("changes, differences", [
    (["--set", "train.seed=1", "--set", "train.warmup_ratio=0.5", "--set", "train.schedule=constant"],
     "train.schedule: cosine there, constant here; train.warmup_ratio: 0.05 there, 0.5 here; "
     "train.seed: 0 there, 1 here"),
    (["--set", "data.batch_size=4", "--set", "model.lora.alpha=8"],
     "model.lora.alpha: 32.0 there, 8.0 here; data.batch_size: 8 there, 4 here"),
])
def test_a_rerun_under_settings_that_alter_the_run_is_refused_naming_each_difference(finished, changes,
                                                                                     differences):
    before = snapshot(finished)
    line = one_error_line(run_py(*TRAIN, *changes, "--workdir", str(finished)), 1)
    assert line == (f"error: {finished} holds a run with other settings ({differences}): rerun it with the "
                    f"settings in {finished / EXPERIMENT_FILE}, or use a new workdir")
    assert snapshot(finished) == before


def test_the_checkpoint_keeps_the_settings_when_experiment_json_is_torn_or_gone(finished, tmp_path):
    workdir = tmp_path / "w"
    shutil.copytree(finished, workdir)
    original = (workdir / EXPERIMENT_FILE).read_text()
    for damage in ("torn", "gone"):
        if damage == "torn":
            (workdir / EXPERIMENT_FILE).write_text(original[: len(original) // 2])
        else:
            (workdir / EXPERIMENT_FILE).unlink()
        before = snapshot(workdir)
        line = one_error_line(run_py(*TRAIN, "--set", "train.seed=1", "--workdir", str(workdir)), 1)
        assert line == (f"error: {workdir} holds a run with other settings (train.seed: 0 there, 1 here): rerun it "
                        f"with the settings in {workdir / EXPERIMENT_FILE}, or use a new workdir")
        assert snapshot(workdir) == before
    # the same settings go on, and the file is written again from the checkpoint's copy
    result = run_py(*TRAIN, "--workdir", str(workdir))
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((workdir / EXPERIMENT_FILE).read_text()) == json.loads(original)


def test_train_config_experiment_json_reruns_the_run(finished, tmp_path):
    workdir = tmp_path / "w"
    shutil.copytree(finished, workdir)
    before = snapshot(workdir / "checkpoints")
    result = run_py("train", "--config", str(workdir / EXPERIMENT_FILE), "--workdir", str(workdir))
    assert result.returncode == 0, result.stderr[-3000:]
    assert snapshot(workdir / "checkpoints") == before  # finished: nothing trained again
    (tmp_path / "torn.json").write_text('{"model": ')
    line = one_error_line(run_py("train", "--config", str(tmp_path / "torn.json"), "--workdir", str(tmp_path / "x")), 1)
    assert line.startswith(f"error: {tmp_path / 'torn.json'} is not a run's settings (")
    assert not (tmp_path / "x").exists()


def test_a_torn_last_line_of_metrics_jsonl_is_dropped_on_resume(finished, tmp_path):
    workdir = tmp_path / "w"
    shutil.copytree(finished, workdir)
    shutil.rmtree(workdir / "checkpoints" / "4")  # killed after step 4's metrics, before its checkpoint ...
    with open(workdir / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "lo')  # ... and mid-line in a step after it
    result = run_py(*TRAIN, "--workdir", str(workdir))
    assert result.returncode == 0, result.stderr[-3000:]
    steps = [json.loads(line)["step"] for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]
    (workdir / "metrics.jsonl").write_text('{"step": 1}\nnot json\n')
    shutil.rmtree(workdir / "checkpoints" / "4")
    line = one_error_line(run_py(*TRAIN, "--workdir", str(workdir)), 1)
    assert line == f"error: {workdir / 'metrics.jsonl'}, line 2: not valid JSON (Expecting value)"


def test_more_steps_need_extend(finished):
    before = snapshot(finished)
    line = one_error_line(run_py(*TRAIN, "--steps", "6", "--workdir", str(finished)), 1)
    assert line.endswith("(train.steps: 4 there, 6 here): rerun it with the settings in "
                         f"{finished / EXPERIMENT_FILE}, or use a new workdir; train --extend allows raising "
                         "train.steps")
    assert snapshot(finished) == before


def test_steps_below_the_latest_checkpoint_are_refused_and_the_model_is_not_rewritten(finished):
    before = snapshot(finished)
    for extra in ([], ["--extend"]):
        line = one_error_line(run_py(*TRAIN, "--steps", "3", *extra, "--workdir", str(finished)), 1)
        assert line == (f"error: train.steps 3 is below step 4 of the latest checkpoint in {finished / 'checkpoints'}; "
                        "a run cannot be made shorter than it is (use a new workdir)")
    assert snapshot(finished) == before
    assert json.loads((finished / "model" / "source.json").read_text())["steps"] == 4


def test_extend_goes_on_and_harmless_settings_may_change(finished, tmp_path):
    workdir = tmp_path / "extended"
    shutil.copytree(finished, workdir)
    harmless = ["--set", "train.log_every=2", "--set", "train.keep_checkpoints=1", "--set", "train.remat=full",
                "--mesh", "data=1"]
    result = run_py(*TRAIN, "--steps", "6", "--extend", *harmless, "--workdir", str(workdir))
    assert result.returncode == 0, result.stderr[-3000:]
    steps = [json.loads(line)["step"] for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 6]  # logged every step before, every second step now, and the last
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == ["6"]
    assert json.loads((workdir / "model" / "source.json").read_text())["steps"] == 6
    saved = json.loads((workdir / EXPERIMENT_FILE).read_text())["train"]
    assert saved["steps"] == 6 and saved["log_every"] == 2  # the settings the run goes on with
    # the extended run is the run now: the old number of steps is refused
    line = one_error_line(run_py(*TRAIN, "--workdir", str(workdir)), 1)
    assert line.startswith("error: train.steps 4 is below step 6 of the latest checkpoint")


def test_paths_to_the_same_files_compare_equal_and_a_fresh_workdir_takes_any_settings(tmp_path, monkeypatch):
    experiment = configs.load("tiny")
    model = experiment.model
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    relative = dataclasses.replace(experiment, data=PipelineConfig(annotations="data/train.json",
                                                                   images_root="data"))
    absolute = dataclasses.replace(experiment, data=PipelineConfig(annotations=str(tmp_path / "data/train.json"),
                                                                   images_root=str(tmp_path / "data") + "/"))
    workdir = tmp_path / "work"
    workdir.mkdir()
    check_rerun(workdir, recorded(relative, model), None)  # a first start writes the settings
    check_rerun(workdir, recorded(absolute, model), 2)  # the same files, written otherwise
    other = dataclasses.replace(absolute, data=dataclasses.replace(absolute.data, images_root=str(tmp_path)))
    with pytest.raises(ValueError, match=re.escape(f"(data.images_root: {tmp_path}/data there, {tmp_path} here)")):
        check_rerun(workdir, recorded(other, model), 2)
    check_rerun(workdir, recorded(other, model), None)  # no checkpoint yet: no trajectory to keep
    check_rerun(workdir, recorded(other, model), 2)


# --- B. --set values converted and checked by their field's type --------------------------------


@pytest.mark.parametrize("assignment, line", [
    ("train.steps=abc", "error: config key 'train.steps' takes an integer, not abc"),
    ("train.steps=2.5", "error: config key 'train.steps' takes an integer, not 2.5"),
    ("model.lora.rank=abc", "error: config key 'model.lora.rank' takes an integer, not abc"),
    ("data.batch_size=0", "error: config key 'data.batch_size': batch_size must be at least 1, not 0"),
])
def test_a_bad_set_value_is_one_line_naming_its_key_before_any_work(tmp_path, assignment, line):
    result = run_py("train", "--config", "tiny", "--workdir", str(tmp_path / "run"), "--set", assignment)
    assert one_error_line(result, 1) == line
    assert not (tmp_path / "run").exists()


def test_set_converts_by_the_field_s_type():
    tiny = configs.load("tiny")
    changed = override(tiny, [
        "train.warmup_ratio=0", "train.max_grad_norm=null", "model.lora.use_rslora=true", "train.schedule=constant",
        'model.lora.targets=["q_proj", "v_proj"]', 'train.trainable=[["prior_projector/.*", 1e-3], ["x", null]]',
        "train.base=123", "model.text.head_dim=32", "model.text.head_dim=None",
    ])
    assert changed.train.warmup_ratio == 0.0 and isinstance(changed.train.warmup_ratio, float)
    assert changed.train.max_grad_norm is None and changed.model.lora.use_rslora is True
    assert changed.model.lora.targets == ("q_proj", "v_proj") and changed.train.schedule == "constant"
    assert changed.train.trainable == (("prior_projector/.*", 1e-3), ("x", None))
    assert changed.train.base == "123" and changed.model.text.head_dim is None  # a str field keeps the text
    with_files = dataclasses.replace(tiny, data=PipelineConfig(annotations="a.json"))
    assert override(with_files, ["data.annotations=b.json"]).data.annotations == ("b.json",)  # one path, or a list
    assert override(with_files, ['data.annotations=["a.json", "b.json"]']).data.annotations == ("a.json", "b.json")


@pytest.mark.parametrize("assignment, message", [
    ("train.schedule=linear", "config key 'train.schedule' must be one of cosine, constant, not linear"),
    ("model.lora.use_rslora=yes", "config key 'model.lora.use_rslora' takes true or false, not yes"),
    ("model.lora.targets=q_proj", "config key 'model.lora.targets' takes a list"),
    ("train.trainable=[[\"a\", \"fast\"]]", "config key 'train.trainable[0][1]' takes a number, not \"fast\""),
    ("train.warmup_ratio=1.5", "config key 'train.warmup_ratio': warmup_ratio must be between 0 and 1, not 1.5"),
    ("train.steps=0", "config key 'train.steps': steps must be at least 1, not 0"),
    ("train.mesh.data=0", "config key 'train.mesh.data': mesh axis data must be a size of at least 1"),
    ("model.lora.dropout=1", "config key 'model.lora.dropout': dropout must be at least 0 and below 1, not 1.0"),
    ("model.text.num_key_value_heads=0", "config key 'model.text.num_key_value_heads': num_key_value_heads must be "
                                         "at least 1, not 0"),
    ("data.answer_fraction=-0.5", "config key 'data.answer_fraction': answer_fraction must be between 0 and 1"),
    ("train.max_grad_norm=0", "config key 'train.max_grad_norm': max_grad_norm must be above 0, not 0.0"),
])
def test_a_wrong_type_or_range_names_the_key(assignment, message):
    with pytest.raises(ValueError) as caught:
        override(configs.load("tiny"), [assignment])
    assert str(caught.value).startswith(message) and "\n" not in str(caught.value)


def test_a_config_file_gets_the_same_range_checks(tmp_path):
    file = tmp_path / "bad.py"
    file.write_text("from emola_jax.config import LoRAConfig\n"
                    "def get_config():\n    return LoRAConfig(rank=0)\n")
    with pytest.raises(ValueError, match=rf"^config {file}: rank must be at least 1, not 0$"):
        configs.load(str(file))
    with pytest.raises(ValueError, match="alpha must be above 0"):
        LoRAConfig(alpha=-1.0)


# --- C. every numeric option range-checked before any work ---------------------------------------


@pytest.mark.parametrize("args, line", [
    (["train", "--config", "tiny", "--workdir", "W", "--steps", "0"], "argument --steps: must be a whole number of "
                                                                       "at least 1, not 0"),
    (["train", "--config", "tiny", "--workdir", "W", "--until", "-1"], "argument --until: must be a whole number "
                                                                        "of at least 1, not -1"),
    (["train", "--config", "tiny", "--workdir", "W", "--peer-timeout", "0"], "argument --peer-timeout: must be a "
                                                                              "number above 0, not 0"),
    (["precompute-landmarks", "--annotations", "a.json", "--out", "W", "--threads", "-1"],
     "argument --threads: must be a whole number of at least 1, not -1"),
    (["evaluate", "--task", "emotion", "--out", "W", "--batch-size", "0"],
     "argument --batch-size: must be a whole number of at least 1, not 0"),
])
def test_a_numeric_option_out_of_range_is_one_line_naming_it(tmp_path, args, line):
    result = run_py(*args, cwd=tmp_path)
    command = args[0]
    assert one_error_line(result, 2) == f"run.py {command}: error: {line} (see run.py {command} --help)"
    assert list(tmp_path.iterdir()) == []  # nothing made


def test_every_numeric_option_has_a_checked_type():
    """Each option that takes a number reads it through a range-checking type, but the decoding
    options, whose rules live in `GenerationConfig` (built before any model loads; its messages are
    tested through `run.py generate` in test_landmarks_generate_cli.py)."""
    checked = {run.positive_int, run.non_negative_int, run.positive_float, run.non_negative_float}
    decoding = {"--max-new-tokens", "--temperature", "--top-p"}
    for name, command in _commands().items():
        for action in command._actions:
            if decoding & set(action.option_strings):
                assert action.type in (int, float), (name, action.option_strings)
                continue
            if action.type in (int, float):
                pytest.fail(f"{name} {action.option_strings}: unchecked {action.type.__name__}")
            if isinstance(action.default, (int, float)) and not isinstance(action.default, bool):
                assert action.type in checked, (name, action.option_strings)


# --- D. --help shows every default and what goes together ----------------------------------------


def _commands() -> dict[str, argparse.ArgumentParser]:
    subparsers = next(a for a in run.build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return dict(subparsers.choices)


TOGETHER = {
    "convert": ["--base and --clip"],
    "export": ["--adapter-format with --format peft"],
    "evaluate": ["CKPT (or --ckpt CKPT) together with --data SPLIT.json",
                 "--coordinator, --num-processes and --process-id together"],
    "precompute-landmarks": ["--onnx together with --images-root"],
    "train": ["--coordinator, --num-processes and --process-id together", "--extend"],
    "generate": ["--prior-npy or --onnx, not both"],
    "demo": [],
    "ablation": ["--eval-emotion, --eval-au and --eval-landmarks go together"],
    "precompute-priors": ["--onnx for 2d106det"],
    "analyze": ["--onnx for a model with the 2d106det prior"],
    "serve": ["--onnx for a model with the 2d106det prior"],
    "plan": ["--prompt-length and --new-tokens go with --evaluate"],
}


def test_help_shows_every_default_and_what_goes_together():
    commands = _commands()
    assert set(commands) == set(TOGETHER)
    for name, command in commands.items():
        result = run_py(name, "--help")
        assert result.returncode == 0, result.stderr
        text = " ".join(result.stdout.split())  # unwrapped
        for sentence in TOGETHER[name]:
            assert sentence in text, (name, sentence)
        for action in command._actions:
            if (not action.option_strings or action.required or action.default is argparse.SUPPRESS
                    or action.default is False):
                continue
            help_text = " ".join(command.formatter_class("x")._expand_help(action).split())
            shown = (f"(default: {action.default})" in help_text if action.default not in (None, [])
                     else "default" in help_text)
            assert shown, (name, action.option_strings, help_text)
            assert help_text in text, (name, action.option_strings)
