"""The README's main job runs end to end on a fresh folder."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_demo_runs_and_checks_parity(tmp_path):
    result = subprocess.run([sys.executable, str(ROOT / "run.py"), "demo", "--workdir", str(tmp_path)],
                            capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    summary = dict(line.split(None, 1) for line in result.stdout.strip().splitlines())
    assert float(summary["max_abs_logit_diff_vs_transformers"]) < 1e-4
    predictions = [json.loads(x) for x in (tmp_path / "evaluation" / "predictions.jsonl").read_text().splitlines()]
    assert [p["id"] for p in predictions] == [f"face_{i}" for i in range(8)]
    metrics = json.loads((tmp_path / "evaluation" / "metrics.json").read_text())
    assert metrics["num_samples"] == 8 and (tmp_path / "evaluation" / "confusion_matrix.png").exists()
