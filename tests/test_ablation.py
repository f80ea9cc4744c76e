"""The paper's ablation rows as configs, the table writer, and (slow) `run.py ablation` on the demo's faces."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import configs
from configs import ablations as ablation
from configs.demo_faces import DemoInputs
from emola_jax.apps import demo
from emola_jax.apps.ablation import chart, write_table
from emola_jax.config import PriorToken

ROOT = Path(__file__).resolve().parent.parent


def _rates(experiment) -> dict[str, float | None]:
    kinds = {"lora": "language_model", "prior": "prior_projector", "projector": "multi_modal_projector"}
    return {k: next(rate for pattern, rate in experiment.train.trainable if pattern.startswith(prefix))
            for k, prefix in kinds.items()}


def test_every_row_is_a_config_file():
    full = configs.load("emola_7b")
    seen = {}
    for table, rows in ablation.TABLES.items():
        for row in rows:
            for task in row.tasks:
                experiment = configs.load(f"ablations/{table}:row={row.name},task={task}")
                seen[(table, row.name, task)] = experiment
                sets = experiment.data.annotations
                assert sets == (full.data.annotations if task == "multi" else
                                (full.data.annotations[ablation.TASKS.index(task)],))
    # Table 8: tokens
    prior_only = seen["tokens", "prior_only", "emotion"]
    assert not prior_only.model.visual_tokens and prior_only.model.prior_position == "after"
    assert _rates(prior_only)["projector"] is None
    assert seen["tokens", "visual_only", "au"].model.prior_position == "off"
    assert _rates(seen["tokens", "visual_only", "au"])["prior"] is None
    assert seen["tokens", "both", "au"].model == full.model
    # Table 9: what trains
    assert _rates(seen["tuning", "lora_only", "emotion"]) == {"lora": 1e-4, "prior": None, "projector": 2e-5}
    assert _rates(seen["tuning", "projector_only", "emotion"]) == {"lora": None, "prior": 1e-4, "projector": 2e-5}
    # Table 13: one epoch of one set (FABA-Instruct's counts when the files are not here), or both
    assert seen["tasks", "multi", "multi"].train.steps == full.train.steps == 552
    assert seen["tasks", "single", "emotion"].train.steps == 305  # ceil(552 * 19474 / 35309)
    assert seen["tasks", "single", "au"].train.steps == 248
    # Table 14 and several priors
    assert seen["position", "before", "au"].model.prior_position == "before"
    assert seen["priors", "2d106det_dlib68", "au"].model.priors == (PriorToken(), PriorToken("dlib68", 136))
    # without an argument: the published EmoLA on emotion
    assert configs.load("ablations/tokens") == seen["tokens", "both", "emotion"]


def test_a_wrong_row_task_or_argument_is_one_sentence():
    with pytest.raises(ValueError, match="has no row 'nope'; rows: prior_only, visual_only, both"):
        configs.load("ablations/tokens:row=nope")
    with pytest.raises(ValueError, match="trained on multi, not 'au'"):
        configs.load("ablations/tasks:row=multi,task=au")
    with pytest.raises(ValueError, match="not row=ROW or task=TASK"):
        configs.load("ablations/position:rows=before")


def test_single_task_steps_follow_the_files(tmp_path):
    emotion, au = tmp_path / "e.json", tmp_path / "a.json"
    emotion.write_text(json.dumps([{}] * 30))
    au.write_text(json.dumps([{}] * 10))
    assert ablation.single_task_steps(100, (str(emotion), str(au)), "emotion") == 75
    assert ablation.single_task_steps(100, (str(emotion), str(au)), "au") == 25


def test_table_puts_this_run_beside_the_paper(tmp_path):
    results = [dict(row="before", trained_on="emotion", task="emotion", s_re=50.0, s_ge=20.25, s_rege=70.25),
               dict(row="after", trained_on="au", task="au", s_re=40.0, s_ge=10.0, s_rege=50.0)]
    path = write_table(tmp_path, "position", results)
    lines = path.read_text().splitlines()
    assert "| prior token before visual tokens | emotion | emotion | 50.0 | 20.2 | 70.2 | 63.5 | 32.1 | 95.6 |" \
        in lines
    assert "| prior token after visual tokens | au | au | 40.0 | 10.0 | 50.0 | 60.2 | 34.7 | 94.9 |" in lines
    assert (tmp_path / "table.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    axes = chart("position", results).axes[0]  # the table's scale: S_rege = S_re + S_ge runs to 200
    assert axes.get_ylim() == (0, 200) and "0-200" in axes.get_ylabel()
    assert [bar.get_height() for bar in axes.patches[:2]] == [70.25, 50.0]
    priors = write_table(tmp_path / "p", "priors", [dict(results[0], row="2d106det")])
    assert "| 2d106det landmarks | emotion | emotion | 50.0 | 20.2 | 70.2 | — | — | — |" in priors.read_text()


def test_ablation_command_on_the_demo_faces(demo_run, tmp_path):
    """`run.py ablation` on the demo's faces, in a workdir whose inputs the demo prepared (as a rerun
    finds them: the base, faces and features `demo.prepare` wrote, which `run_table` reuses)."""
    workdir, demo = demo_run
    assert demo.returncode == 0, demo.stderr[-2000:]
    shutil.copytree(workdir, tmp_path / "data", ignore=shutil.ignore_patterns("run", "evaluation", "export"))
    result = subprocess.run([sys.executable, "run.py", "ablation", "position", "--workdir", str(tmp_path),
                             "--set", "train.steps=2", "--max-new-tokens", "8"],
                            capture_output=True, text=True, timeout=1500, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-2000:]
    rows = json.loads((tmp_path / "results.json").read_text())
    assert [(r["row"], r["task"]) for r in rows] == [("before", "emotion"), ("before", "au"), ("after", "emotion"),
                                                     ("after", "au")]
    assert all(0 <= r["s_rege"] <= 200 for r in rows)
    assert "prior token before visual tokens" in result.stdout and (tmp_path / "table.png").is_file()
    said = [line for line in result.stderr.splitlines() if line.startswith("run ")]  # a line per run and score
    assert len(said) == 8 and said[0].startswith("run 1/4: before, trained on emotion (")
    assert said[1] == (f"run 1/4: before, scored on emotion: S_re {rows[0]['s_re']:.1f}  S_ge {rows[0]['s_ge']:.1f}  "
                       f"S_rege {rows[0]['s_rege']:.1f}")
    assert "\r" not in result.stderr and "train: 100%" in result.stderr and "evaluating: 100%" in result.stderr
    run = json.loads((tmp_path / "runs" / "before-au" / "experiment.json").read_text())
    assert run["model"]["prior_position"] == "before" and run["train"]["steps"] == 1  # half of 2: one set of two
    assert [Path(a).name for a in run["data"]["annotations"]] == ["train_au_anno.json"]

    # a rerun reuses the prepared base and the finished runs: the same table, no checkpoint rewritten
    checkpoints = {p: p.stat().st_mtime_ns for p in (tmp_path / "runs").rglob("checkpoints/*/**/*") if p.is_file()}
    again = subprocess.run([sys.executable, "run.py", "ablation", "position", "--workdir", str(tmp_path),
                            "--set", "train.steps=2", "--max-new-tokens", "8"],
                           capture_output=True, text=True, timeout=1500, cwd=ROOT)
    assert again.returncode == 0, again.stderr[-2000:]
    assert json.loads((tmp_path / "results.json").read_text()) == rows
    assert checkpoints and {p: p.stat().st_mtime_ns for p in checkpoints} == checkpoints
    # ... and a rerun that would rebuild the base otherwise is refused, naming what changed
    other = subprocess.run([sys.executable, "run.py", "ablation", "position", "--workdir", str(tmp_path),
                            "--set", "train.steps=2", "--seed", "1"], capture_output=True, text=True, cwd=ROOT)
    assert other.returncode == 1
    assert other.stderr.strip().splitlines()[-1].startswith(
        f"error: {tmp_path / 'data'} was prepared with other settings (seed: 0 there, 1 here)")
    assert json.loads((tmp_path / "results.json").read_text()) == rows


def test_the_demo_inputs_are_reused_only_as_prepared(demo_run):
    workdir, result = demo_run
    assert result.returncode == 0, result.stderr[-2000:]
    tiny = configs.load("tiny").model
    inputs = demo.prepared(workdir, tiny)
    assert inputs == DemoInputs.in_folder(workdir) and inputs.base.joinpath("config.json").is_file()
    with pytest.raises(ValueError, match=r"was prepared with other settings \(seed: 0 there, 3 here\)"):
        demo.prepared(workdir, tiny, seed=3)
    assert demo.prepared(workdir / "nowhere", tiny) is None


def test_the_eval_files_with_the_tiny_model_are_one_sentence(tmp_path):
    (tmp_path / "e.json").write_text("[]")
    result = subprocess.run([sys.executable, "run.py", "ablation", "position", "--workdir", str(tmp_path / "w"),
                             "--eval-emotion", str(tmp_path / "e.json"), "--eval-au", str(tmp_path / "e.json"),
                             "--eval-landmarks", str(tmp_path / "l.array_record")],
                            capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 1
    assert result.stderr.strip() == ("error: config tiny is a whole tiny model scored on the demo's faces; the "
                                     "--eval-* files go with a config that trains from a real base (train.base), "
                                     "e.g. --config emola_7b")
    assert not (tmp_path / "w").exists()
