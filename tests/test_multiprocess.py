"""Training on several processes through `run.py`, on real inputs: the demo's converted base, its
drawn faces and their precomputed prior features, fed by the grain pipeline.

Two processes x two CPU devices must give the run of one process x four devices: the same
examples in the same global order, the same losses, the same final model; a stopped or killed
run resumes from its checkpoints, each process from its own data-iterator state.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import numpy as np
import pytest

import configs
from configs.demo_faces import DemoInputs
from emola_jax.apps.demo import prepare
from emola_jax.checkpoint import load_pretrained
from tests.processes import TIMEOUT, Run

STEPS = 20  # batches of 8 over 52 training faces: three epochs and the start of a fourth
TRAIN = ["--config", "demo_faces", "--steps", str(STEPS), "--set", "data.batch_size=8",
         "--set", "train.checkpoint_every=3"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """A working directory holding `demo_out/` (what `configs/demo_faces.py` reads)."""
    root = tmp_path_factory.mktemp("multiprocess")
    prepare(root / "demo_out", configs.load("tiny").model, train_per_emotion=4, eval_per_emotion=1)
    return root


def train(folder: Path, args: list[str], *, count: int, devices: int) -> Run:
    """`run.py train ARGS` to its end as `count` processes x `devices` CPU devices, in `folder`."""
    workdir = args[args.index("--workdir") + 1]
    return Run(["train", *args], count=count, devices=devices, cwd=folder, logs=folder / f"{workdir}.logs").check()


def losses(workdir: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def global_order(workdir: Path, processes: int) -> list[list[str]]:
    """The record ids of each step's global batch: process 0's rows, then process 1's, ..."""
    per_process = [[json.loads(line) for line in
                    (workdir / "examples" / f"process_{i}-of-{processes}.jsonl").read_text().splitlines()]
                   for i in range(processes)]
    steps = [[r["step"] for r in records] for records in per_process]
    assert all(s == list(range(1, len(s) + 1)) for s in steps), steps
    return [sum((records[k]["ids"] for records in per_process), []) for k in range(len(per_process[0]))]


@pytest.fixture(scope="module")
def straight_runs(folder):
    """The same training as one process x four devices and as two processes x two devices."""
    train(folder, [*TRAIN, "--workdir", "one"], count=1, devices=4)
    train(folder, [*TRAIN, "--workdir", "two"], count=2, devices=2)
    return folder / "one", folder / "two"


def test_two_processes_train_as_one_from_a_converted_base_on_the_pipeline(folder, straight_runs):
    one, two = straight_runs
    # the same examples in the same global order, every training face once per epoch
    order = global_order(two, 2)
    assert order == global_order(one, 1) and len(order) == STEPS and all(len(b) == 8 for b in order)
    inputs = DemoInputs.in_folder(folder / "demo_out")
    records = [r["id"] for name in ("train_emotion", "train_au")
               for r in json.loads(inputs.annotations[name].read_text())]
    stream = sum(order, [])
    assert len(records) == 52
    for epoch in range(3):  # each epoch holds each face once, in its own order
        assert sorted(stream[52 * epoch:52 * (epoch + 1)]) == sorted(records)
    assert stream[:52] != stream[52:104]
    # the same losses, step for step
    np.testing.assert_allclose(losses(two), losses(one), rtol=1e-5)
    assert len(losses(two)) == STEPS


def test_the_multi_process_run_writes_the_final_model(folder, straight_runs):
    one, two = straight_runs
    model_two, config = load_pretrained(two / "model")
    model_one, _ = load_pretrained(one / "model")
    rng = np.random.default_rng(0)
    ids = np.concatenate([[1, 5, 9], np.full(config.image_seq_length, config.image_token_id), [7, 11, 13]])[None]
    size = config.vision.image_size
    pixels = rng.standard_normal((1, size, size, 3)).astype(np.float32)
    landmarks = rng.random((1, 212)).astype(np.float32)
    logits = [np.asarray(m(ids.astype(np.int32), pixels, landmarks=landmarks)) for m in (model_two, model_one)]
    np.testing.assert_allclose(logits[0], logits[1], rtol=1e-4, atol=1e-5)
    assert json.loads((two / "model" / "source.json").read_text())["steps"] == STEPS
    assert (two / "model" / "tokenizer").is_dir()


def test_a_stopped_two_process_run_resumes_to_the_same_losses(folder, straight_runs):
    _, two = straight_runs
    train(folder, [*TRAIN, "--workdir", "resumed", "--until", "3"], count=2, devices=2)
    data = sorted(p.name for p in (folder / "resumed" / "checkpoints" / "3" / "data").glob("process_*"))
    assert data == ["process_0-of-2.json", "process_1-of-2.json"]  # each process's own iterator state
    assert len(losses(folder / "resumed")) == 3 and not (folder / "resumed" / "model").exists()
    train(folder, [*TRAIN, "--workdir", "resumed"], count=2, devices=2)
    assert losses(folder / "resumed") == losses(two)  # to the last bit
    assert global_order(folder / "resumed", 2) == global_order(two, 2)



def test_a_process_that_fails_tells_the_others_why(folder):
    other = folder / "host1"  # process 1's host: the same files, but its feature store cut short
    shutil.copytree(folder / "demo_out", other / "demo_out")
    store = other / "demo_out" / "faces" / "landmarks.array_record"
    store.write_bytes(store.read_bytes()[:-100])
    run = Run(["train", *TRAIN, "--workdir", "failed", "--peer-timeout", "30"], count=2, devices=2, cwd=folder,
              logs=folder / "failed.logs", cwd_of={1: other})
    assert run.wait(timeout=120) == [1, 1]
    reason = "demo_out/faces/landmarks.array_record is not a complete landmark file (truncated, damaged, or still " \
             "being written)"  # the path as the config gives it
    errors = [[line for line in run.output(i).splitlines() if line.startswith("error:")] for i in range(2)]
    assert errors[1] == [f"error: {reason}"]
    assert len(errors[0]) == 1 and errors[0][0].startswith(f"error: process 1 of 2 stopped ({reason}); process 0 stops")
    assert not any("Check failure" in run.output(i) for i in range(2))


TFDS_CONFIG = '''
import dataclasses

from configs.demo_faces import get_config as demo_faces


def get_config():
    experiment = demo_faces()
    data = dataclasses.replace(experiment.data, annotations=(), tfds_dir={tfds_dir!r}, split="train")
    return dataclasses.replace(experiment, data=data)
'''


@pytest.mark.slow  # two more two-process trainings (60 s); the default run trains two processes from annotation
# files, and one process from a built tfds dataset (test_pipeline.py)
def test_two_processes_train_as_one_on_a_built_tfds_dataset(folder):
    from emola_jax.data import tfds_builders

    faces = folder / "demo_out" / "faces"
    for split in ("train", "eval"):  # FABA-Instruct's layout, paths relative to the dataset folder
        (faces / split).mkdir(exist_ok=True)
        (faces / split / f"{split}_emotion_anno.json").write_text((faces / f"{split}_emotion_anno.json").read_text())
    builder = tfds_builders.build("faba_instruct", faces, folder / "tfds", config="emotion",
                                  landmarks=faces / "landmarks.array_record")
    (folder / "faces_tfds.py").write_text(TFDS_CONFIG.format(tfds_dir=str(builder.data_dir)))
    args = ["--config", str(folder / "faces_tfds.py"), "--steps", "4", "--set", "data.batch_size=8"]
    train(folder, [*args, "--workdir", "tfds_one"], count=1, devices=4)
    train(folder, [*args, "--workdir", "tfds_two"], count=2, devices=2)
    order = global_order(folder / "tfds_two", 2)
    assert order == global_order(folder / "tfds_one", 1)
    assert len(set(sum(order[:3], []))) == 24 and all(i.startswith("train_") for i in sum(order, []))
    np.testing.assert_allclose(losses(folder / "tfds_two"), losses(folder / "tfds_one"), rtol=1e-5)


@pytest.mark.slow  # a third two-process run, killed and rerun (70 s); the default run keeps a failing process
# telling the others why and a stopped two-process run resuming to the same losses
def test_a_killed_process_ends_the_others_with_one_sentence_and_the_rerun_resumes(folder, straight_runs):
    _, two = straight_runs
    run = Run(["train", *TRAIN, "--workdir", "killed", "--peer-timeout", "10"], count=2, devices=2, cwd=folder,
              logs=folder / "killed.logs")
    try:
        checkpoint = folder / "killed" / "checkpoints" / "3"  # orbax renames it into place when complete
        deadline = time.monotonic() + TIMEOUT
        while not checkpoint.is_dir() and time.monotonic() < deadline and run.procs[1].poll() is None:
            time.sleep(0.05)
        assert run.procs[1].poll() is None, "process 1 ended before it could be killed"
        run.procs[1].kill()  # SIGKILL
        killed_at = time.monotonic()
        code = run.procs[0].wait(timeout=60)
        waited = time.monotonic() - killed_at
    finally:
        run.kill()
    assert code == 1 and waited < 25, (code, waited)
    output = run.output(0)
    lines = [line for line in output.replace("\r", "\n").splitlines() if line.startswith("error:")]
    sentence = "error: process 1 of 2 was lost (no sign of life for"
    assert output.count("error:") == 1 and len(lines) == 1 and lines[0].startswith(sentence), output[-2000:]
    assert "Check failure" not in output and "Fatal" not in output
    # the rerun resumes from the last complete checkpoint and ends as the straight run did
    train(folder, [*TRAIN, "--workdir", "killed"], count=2, devices=2)
    assert losses(folder / "killed") == losses(two)
    assert global_order(folder / "killed", 2) == global_order(two, 2)


def test_two_processes_evaluate_the_trained_model_as_one(folder, straight_runs):
    _, two = straight_runs
    inputs = DemoInputs.in_folder(folder / "demo_out")
    args = ["evaluate", "--ckpt", str(two / "model"), "--data", str(inputs.annotations["eval_emotion"]),
            "--landmarks", str(inputs.landmarks), "--task", "emotion", "--max-new-tokens", "8", "--batch-size", "4"]
    for name, count, devices in (("eval_one", 1, 4), ("eval_two", 2, 2)):
        Run([*args, "--out", str(folder / name)], count=count, devices=devices, cwd=folder,
            logs=folder / f"{name}.logs").check()
    predictions = [[json.loads(line) for line in (folder / name / "predictions.jsonl").read_text().splitlines()]
                   for name in ("eval_one", "eval_two")]
    records = json.loads(inputs.annotations["eval_emotion"].read_text())
    assert predictions[0] == predictions[1] and [p["id"] for p in predictions[1]] == [r["id"] for r in records]
