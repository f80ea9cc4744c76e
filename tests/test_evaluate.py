"""Model evaluation end to end on a tiny EmoLA: batching, resuming and sharding change nothing."""

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from transformers import CLIPImageProcessor

import run
from emola_jax.data import conversation, image
from emola_jax.eval import evaluate as ev
from emola_jax.eval import report
from tests.processes import ROOT, Run

TIMEOUT = 300  # seconds a command may take before the test fails instead of hanging
def _run(root, ckpt, out, **kw):
    from emola_jax.generate import GenerationConfig

    gen = GenerationConfig(max_new_tokens=6, eos_token_id=2, pad_token_id=3)
    return ev.evaluate_model(ckpt, root / "data" / "eval_emotion_anno.json", "emotion", out, generation=gen,
                             progress=False, **kw)


def _predictions(out):
    return [json.loads(line) for line in (out / ev.PREDICTIONS).read_text().splitlines()]


def test_batching_does_not_change_predictions(eval_checkpoint, tmp_path):
    root, ckpt = eval_checkpoint
    metrics = _run(root, ckpt, tmp_path / "b3", batch_size=3)
    _run(root, ckpt, tmp_path / "b1", batch_size=1)
    batched, single = _predictions(tmp_path / "b3"), _predictions(tmp_path / "b1")
    assert [p["id"] for p in batched] == [f"img{i}" for i in range(5)]
    assert [p["prediction"] for p in batched] == [p["prediction"] for p in single]
    assert batched[0]["prompt"] == conversation.generation_prompt("What emotions are conveyed by this face?")
    assert metrics["num_samples"] == 5
    assert json.loads((tmp_path / "b3" / "metrics.json").read_text())["s_re"] == metrics["s_re"]


def test_resume_after_a_kill_and_a_torn_line(eval_checkpoint, tmp_path, monkeypatch):
    root, ckpt = eval_checkpoint
    _run(root, ckpt, tmp_path / "clean", batch_size=2)
    calls = {"n": 0}
    original = ev.answer_records

    def dies_on_second_batch(predictor, features, batch):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return original(predictor, features, batch)

    monkeypatch.setattr(ev, "answer_records", dies_on_second_batch)
    with pytest.raises(KeyboardInterrupt):
        _run(root, ckpt, tmp_path / "killed", batch_size=2)
    monkeypatch.setattr(ev, "answer_records", original)
    assert len(_predictions(tmp_path / "killed")) == 2
    with open(tmp_path / "killed" / ev.PREDICTIONS, "a") as f:
        f.write('{"id": "img2", "predic')  # a kill in the middle of a write
    _run(root, ckpt, tmp_path / "killed", batch_size=2)
    assert _predictions(tmp_path / "killed") == _predictions(tmp_path / "clean")


def test_sharded_over_four_devices_matches(eval_checkpoint, tmp_path):
    root, ckpt = eval_checkpoint
    _run(root, ckpt, tmp_path / "one", batch_size=4)
    script = (
        "import sys, jax; sys.path.insert(0, sys.argv[4]); assert jax.device_count() == 4\n"
        "from emola_jax.eval.evaluate import evaluate_model\n"
        "from emola_jax.generate import GenerationConfig\n"
        "evaluate_model(sys.argv[1], sys.argv[2], 'emotion', sys.argv[3], batch_size=4, progress=False,\n"
        "               generation=GenerationConfig(max_new_tokens=6, eos_token_id=2, pad_token_id=3))\n"
    )
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_PLATFORMS": "cpu"}
    result = subprocess.run([sys.executable, "-c", script, str(ckpt), str(root / "data" / "eval_emotion_anno.json"),
                             str(tmp_path / "four"), str(ROOT)], env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    assert _predictions(tmp_path / "four") == _predictions(tmp_path / "one")


def test_clip_preprocessing_matches_transformers():
    processor = CLIPImageProcessor(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336})
    rng = np.random.default_rng(0)
    for shape in [(300, 451), (500, 336), (336, 336), (401, 299)]:
        picture = Image.fromarray(rng.integers(0, 255, (*shape, 3), dtype=np.uint8))
        expected = processor(images=picture, return_tensors="np")["pixel_values"][0].transpose(1, 2, 0)
        np.testing.assert_allclose(image.clip_preprocess(picture, 336), expected, atol=1e-5)


def test_prompt_tokens_follow_llava(eval_checkpoint):
    root, _ = eval_checkpoint
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(root / "tok")
    prompt = conversation.generation_prompt("What emotions are conveyed by this face?")
    assert prompt == (conversation.SYSTEM + " USER: <image>\nWhat emotions are conveyed by this face? ASSISTANT:")
    ids = conversation.tokenize_with_image(tok, prompt, 99, 3)
    before, after = prompt.split("<image>")
    expected = tok(before).input_ids + [99, 99, 99] + tok(after).input_ids[1:]  # one BOS, at the start
    assert ids.tolist() == expected and ids[0] == tok.bos_token_id


def test_bad_records_are_named(tmp_path):
    from emola_jax.data import records

    (tmp_path / "a.json").write_text(json.dumps([{"id": "x1", "image": "i.png"}]))
    with pytest.raises(ValueError, match="record x1 is malformed"):
        records.read_eval_records(tmp_path / "a.json")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    with pytest.raises(ValueError, match="broken.png could not be read"):
        image.load_image(tmp_path / "broken.png")


def test_resume_refuses_other_settings_and_corrupt_lines(eval_checkpoint, tmp_path):
    from emola_jax.generate import GenerationConfig

    root, ckpt = eval_checkpoint
    metrics = _run(root, ckpt, tmp_path / "a", batch_size=5)
    lines = _predictions(tmp_path / "a")
    assert metrics["answers_cut_at_max_new_tokens"] == sum(not line["stopped_at_eos"] for line in lines)
    other = GenerationConfig(max_new_tokens=5, eos_token_id=2, pad_token_id=3)
    with pytest.raises(ValueError, match="other settings"):
        ev.evaluate_model(ckpt, root / "data" / "eval_emotion_anno.json", "emotion", tmp_path / "a",
                          generation=other, progress=False)
    text = (tmp_path / "a" / ev.PREDICTIONS).read_text().splitlines()
    (tmp_path / "a" / ev.PREDICTIONS).write_text("\n".join([text[0], "{not json", *text[1:]]) + "\n")
    with pytest.raises(ValueError, match="line 2: not valid JSON"):
        _run(root, ckpt, tmp_path / "a", batch_size=5)


def test_official_prompt_replaces_the_record_question(eval_checkpoint, tmp_path):
    root, ckpt = eval_checkpoint
    data = json.loads((root / "data" / "eval_emotion_anno.json").read_text())
    for record in data:
        record["conversations"][0]["value"] = "<image>\nDescribe this face."
    (tmp_path / "anno.json").write_text(json.dumps(data))
    from emola_jax.data import records

    official = records.read_eval_records(tmp_path / "anno.json", root / "data", prompt=ev.prompt_for("rafdb"))
    own = records.read_eval_records(tmp_path / "anno.json", root / "data")
    assert {r.question for r in official} == {"What emotions are conveyed by this face?"}
    assert {r.question for r in own} == {"<image>\nDescribe this face."}
    assert ev.prompt_for("disfa") == "What AUs are conveyed by this face?"


# --- several processes through `run.py` (2 processes x 2 CPU devices) ------------------------


def _evaluate_args(root, ckpt, out, batch_size: int) -> list[str]:
    return ["evaluate", "--ckpt", str(ckpt), "--data", str(root / "data" / "eval_emotion_anno.json"),
            "--task", "emotion", "--out", str(out), "--max-new-tokens", "6", "--batch-size", str(batch_size)]


def _two(args: list[str], logs: Path) -> Run:
    """Both processes of a 2-process run, 2 CPU devices each."""
    return Run(args, count=2, devices=2, cwd=ROOT, logs=logs)


@pytest.fixture(scope="module")
def one_process(eval_checkpoint, tmp_path_factory):
    """Predictions of a one-process `run.py evaluate`: the reference of the multi-process runs."""
    root, ckpt = eval_checkpoint
    out = tmp_path_factory.mktemp("one_process")
    assert run.main([*_evaluate_args(root, ckpt, out, 2)]) == 0
    return _predictions(out)


def test_two_processes_write_the_predictions_of_one(eval_checkpoint, one_process, tmp_path):
    root, ckpt = eval_checkpoint
    two = _two(_evaluate_args(root, ckpt, tmp_path / "two", 2), tmp_path / "logs").check(TIMEOUT)
    assert _predictions(tmp_path / "two") == one_process
    assert [p["id"] for p in one_process] == [f"img{i}" for i in range(5)]
    assert "S_re" in two.output(0) and "S_re" not in two.output(1)  # process 0 reports for both


def test_two_processes_resume_after_a_kill(eval_checkpoint, one_process, tmp_path):
    """kill -9 of process 0 (the writer, and the coordinator) after the first batch: the other
    process ends at once (its runtime loses the coordinator), and a rerun finishes the file."""
    root, ckpt = eval_checkpoint
    out, args = tmp_path / "killed", _evaluate_args(root, ckpt, tmp_path / "killed", 2)  # 2 batches of 4
    killed = _two(args, tmp_path / "logs")
    procs = killed.procs
    deadline = time.monotonic() + TIMEOUT
    while not ((out / ev.PREDICTIONS).exists() and (out / ev.PREDICTIONS).stat().st_size):
        assert time.monotonic() < deadline and procs[0].poll() is None, "no prediction was written"
        time.sleep(0.02)
    procs[0].kill()
    try:
        procs[1].wait(timeout=60)
    except subprocess.TimeoutExpired:
        pytest.fail("process 1 still ran 60s after process 0 was killed")
    finally:
        killed.kill()
    assert procs[1].returncode != 0  # aborted by jax's distributed runtime: the coordinator is gone
    done = report.read_prediction_lines(out / ev.PREDICTIONS, appended=True)
    assert 0 < len(done) < 5, "the run ended before the kill"
    _two(args, tmp_path / "rerun").check(TIMEOUT)
    assert _predictions(out) == one_process


def test_generate_on_two_processes_prints_the_answer_of_one(eval_checkpoint, capsys, tmp_path):
    root, ckpt = eval_checkpoint
    args = ["generate", str(ckpt), "--image", str(root / "data" / "images" / "0.png"), "--prior-npy",
            str(root / "data" / "landmarks" / "0.npy"), "--prompt", "What emotions are conveyed by this face?",
            "--max-new-tokens", "6"]
    assert run.main(args) == 0
    one = capsys.readouterr().out
    two = _two(args, tmp_path / "logs").check(TIMEOUT)
    # Gloo's connection message is written by C++ onto the same stdout, possibly in two pieces and in the
    # middle of a line of ours: its pieces are taken out before the lines are compared
    gloo = re.compile(r"\[Gloo\] Rank \d+ is connected to \d+|\s*peer ranks\. Expected number of connected peer "
                      r"ranks is : \d+\n?")
    ours = [[line for line in gloo.sub("", two.stdout(i)).splitlines() if line.strip()] for i in range(2)]
    assert ours == [one.splitlines(), []]  # process 0 prints the answer, process 1 nothing of its own
    assert one.strip()
