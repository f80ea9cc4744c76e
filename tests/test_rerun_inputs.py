"""Whatever a result depends on is recorded, and checked when a rerun continues it: through `run.py`
on the demo's trained model, its faces and their feature store."""

import json
import subprocess
import sys
from pathlib import Path

from emola_jax.data import landmark_store

ROOT = Path(__file__).resolve().parent.parent


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "run.py", *map(str, args)], capture_output=True, text=True, cwd=ROOT)


def test_evaluate_continues_only_with_the_same_feature_store(demo_run, tmp_path):
    workdir, demo = demo_run
    assert demo.returncode == 0, demo.stderr[-2000:]
    faces = workdir / "faces"
    store = faces / "landmarks.array_record"
    args = ["evaluate", "--ckpt", workdir / "run" / "model", "--data", faces / "eval_emotion_anno.json", "--task",
            "emotion", "--max-new-tokens", "4", "--batch-size", "8", "--out", tmp_path / "out"]
    first = _run(*args, "--landmarks", store)
    assert first.returncode == 0, first.stderr[-2000:]
    settings = json.loads((tmp_path / "out" / "run_settings.json").read_text())
    info = landmark_store.read_info(store)
    assert settings["landmarks"] == [{"file": str(store.resolve()), "bytes": store.stat().st_size,
                                      "prior": "2d106det", "recipe": info.recipe, "records": info.count}]
    assert settings["images_root"] is None
    predictions = (tmp_path / "out" / "predictions.jsonl").read_bytes()

    # the same faces' features from another recipe: another input, refused before any answer
    other = tmp_path / "insightface.array_record"
    features = landmark_store.read_landmarks(store)
    landmark_store.write_file(other, ((k, v + 0.01) for k, v in features.items()), recipe="insightface")
    again = _run(*args, "--landmarks", other)
    assert again.returncode == 1
    line = again.stderr.strip()
    assert line.startswith(f"error: {tmp_path / 'out'} holds predictions made with other settings (landmarks: ")
    assert '"recipe": "insightface"' in line and line.endswith("rerun with those, or point --out at a fresh folder")
    assert (tmp_path / "out" / "predictions.jsonl").read_bytes() == predictions

    # a torn settings file is named, and nothing is appended
    (tmp_path / "out" / "run_settings.json").write_text('{"checkpoint": ')
    torn = _run(*args, "--landmarks", store)
    assert torn.returncode == 1
    assert torn.stderr.strip().startswith(f"error: {tmp_path / 'out' / 'run_settings.json'} is torn (")
    assert (tmp_path / "out" / "predictions.jsonl").read_bytes() == predictions


def test_a_damaged_feature_store_is_named(demo_run, tmp_path):
    workdir, demo = demo_run
    faces = workdir / "faces"
    data = bytearray((faces / "landmarks.array_record").read_bytes())
    data[200] ^= 0xFF  # one flipped bit pattern inside the first chunk of records
    damaged = tmp_path / "damaged.array_record"
    damaged.write_bytes(bytes(data))
    result = _run("evaluate", "--ckpt", workdir / "run" / "model", "--data", faces / "eval_emotion_anno.json",
                  "--task", "emotion", "--landmarks", damaged, "--out", tmp_path / "out")
    assert result.returncode == 1
    line = result.stderr.strip()
    assert line.startswith(f"error: {damaged} is damaged (Corrupted Riegeli/records file: chunk data hash mismatch")
    assert line.endswith("write it again (run.py precompute-priors)")
    assert not (tmp_path / "out" / "predictions.jsonl").exists()


def test_a_whole_model_config_equal_to_its_base_trains(demo_run, tmp_path):
    """The base's config.json spells head_dim out; the tiny config leaves it to its default (None)."""
    workdir, demo = demo_run
    base = json.loads((workdir / "base" / "config.json").read_text())
    assert base["text"]["head_dim"] is not None
    config = tmp_path / "whole.py"
    config.write_text(
        "import dataclasses\nimport configs\nfrom configs.demo_faces import DemoInputs\n\n"
        "def get_config():\n"
        "    tiny = configs.load('tiny')\n"
        f"    inputs = DemoInputs.in_folder({str(workdir)!r})\n"
        "    train = dataclasses.replace(tiny.train, base=str(inputs.base), steps=1)\n"
        "    return dataclasses.replace(tiny, data=inputs.training_data(batch_size=2), train=train)\n")
    result = _run("train", "--config", config, "--workdir", tmp_path / "run")
    assert result.returncode == 0, result.stderr[-2000:]
    assert (tmp_path / "run" / "model" / "config.json").is_file()
    # ... and one that differs is still named
    other = _run("train", "--config", config, "--workdir", tmp_path / "other", "--set", "model.text.head_dim=16")
    assert other.returncode == 1
    assert "(text.head_dim: 32 there, 16 here)" in other.stderr.strip().splitlines()[-1]


def test_features_of_another_recipe_than_training_s_are_refused(demo_run, tmp_path):
    workdir, demo = demo_run
    model, faces = workdir / "run" / "model", workdir / "faces"
    assert json.loads((model / "source.json").read_text())["prior_recipes"] == {"2d106det": "official"}
    other = tmp_path / "insightface.array_record"
    landmark_store.write_file(other, landmark_store.read_landmarks(faces / "landmarks.array_record").items(),
                              recipe="insightface")
    result = _run("evaluate", "--ckpt", model, "--data", faces / "eval_emotion_anno.json", "--task", "emotion",
                  "--landmarks", other, "--out", tmp_path / "out")
    assert result.returncode == 1
    assert result.stderr.strip() == (f"error: {other} holds 2d106det features of the insightface recipe, but {model} "
                                     "was trained on the official recipe's; compute them with --recipe official "
                                     "(run.py precompute-priors)")
    assert not (tmp_path / "out" / "predictions.jsonl").exists()
