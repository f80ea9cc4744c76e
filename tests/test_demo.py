"""The README's main job runs end to end on a fresh folder: import, data, training, evaluation, export."""

import json


def test_demo_trains_a_model_that_reads_faces_and_exports_it(demo_run):
    tmp_path, result = demo_run  # the run is shared with the tests that need a trained model
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Warning:" not in result.stderr, result.stderr[-3000:]  # no library's warning reaches the user
    # every stage says what it does, and the long ones how far they are, in lines a log file keeps
    # (the output is a pipe here, as in a job's log: no carriage returns)
    lines = result.stderr.splitlines()
    stages = [line[:5] for line in lines if line.startswith("[")]
    assert stages == ["[1/5]", "[2/5]", "[3/5]", "[4/5]", "[4/5]", "[5/5]"], lines
    assert "\r" not in result.stderr
    for bar in ("converting: 100%", "landmarks: 100%", "train: 100%", "evaluating: 100%", "exporting: 100%"):
        assert any(line.startswith(bar) for line in lines), bar
    assert lines.index(next(line for line in lines if line.startswith("train: 100%"))) > lines.index(
        next(line for line in lines if line.startswith("[3/5]")))
    summary = dict(line.split(None, 1) for line in result.stdout.strip().splitlines())
    assert float(summary["max_abs_logit_diff_vs_transformers"]) < 1e-4

    losses = [json.loads(line)["loss"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 300 and losses[-1] < losses[0] / 10  # the training loss has clearly fallen

    emotion = json.loads((tmp_path / "evaluation" / "emotion" / "metrics.json").read_text())
    assert emotion["num_samples"] == 28
    assert emotion["accuracy"] > 3 * 100 / 7  # held-out faces: well above the 1-in-7 of chance
    au = json.loads((tmp_path / "evaluation" / "au" / "metrics.json").read_text())
    assert au["s_re"] > 50
    assert (tmp_path / "evaluation" / "emotion" / "confusion_matrix.png").exists()

    for key in ("export_transformers", "export_peft"):
        assert float(summary[key].rsplit("max |logit diff| ", 1)[1].rstrip(")")) < 1e-4
    assert (tmp_path / "export" / "hf" / "prior_projector.safetensors").exists()
    assert (tmp_path / "export" / "peft" / "adapter_config.json").exists()
