"""Starting a multi-process run wrongly, through `run.py` as real separate processes on this machine:
each fault is one sentence on every process that takes part (naming the process, the coordinator
and what to change), exit status 1, no stack dump and no hang, before any work is done.

The commands stop at the join, so they need no model or data: `train --config tiny` stops before
its config is even read, `evaluate` before its checkpoint is opened.
"""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from emola_jax.distributed import different_settings
from tests.processes import Run, free_port

PEER_TIMEOUT = 5  # seconds the processes wait for each other at the start
WAIT = 90  # seconds a test's processes may take before it fails instead of hanging
DUMPS = ("Traceback", "Check fail", "*** ", "Fatal", "Segmentation", "terminate called", "@ 0x")


class Started(Run):
    """`run.py` started as one process per command line, each with one CPU device; "PORT" in an
    argument is the coordinator's port."""

    def __init__(self, commands: list[list[str]], *, cwd: Path, logs: Path, port: int | None = None):
        self.port = free_port() if port is None else port
        self.address = f"127.0.0.1:{self.port}"
        self._start([[a.replace("PORT", str(self.port)) for a in command] for command in commands], devices=1,
                    cwd=cwd, logs=logs)

    def wait(self) -> tuple[list[int], list[float]]:
        """Every process's exit status and seconds from the start to its end (all killed after WAIT s)."""
        return super().wait(WAIT), self.ends

    def errors(self, i: int) -> list[str]:
        """Process `i`'s `error:` lines; fails on a stack dump in its output."""
        output = self.output(i)
        assert not any(dump in output for dump in DUMPS), output[-3000:]
        return [line for line in output.replace("\r", "\n").splitlines() if line.startswith("error:")]


def distributed(count: int, process: int, timeout: float = PEER_TIMEOUT) -> list[str]:
    return ["--coordinator", "127.0.0.1:PORT", "--num-processes", str(count), "--process-id", str(process),
            "--peer-timeout", str(timeout)]


def train(workdir: Path, *more: str) -> list[str]:
    return ["train", "--config", "tiny", "--workdir", str(workdir), *more]


def test_processes_started_with_different_settings_all_refuse_before_any_work(tmp_path):
    workdir = tmp_path / "run"
    run = Started([train(workdir, "--steps", "30", *distributed(2, 0)),
                   train(workdir, "--steps", "40", *distributed(2, 1))], cwd=tmp_path, logs=tmp_path / "logs")
    codes, _ = run.wait()
    assert codes == [1, 1]
    sentence = ("error: the processes were started with different settings: --steps is 30 on process 0 and 40 on "
                "process 1; start every process with the same command (only --process-id differs)")
    assert run.errors(0) == run.errors(1) == [sentence]
    assert not workdir.exists()  # no checkpoint, nothing at all


def test_evaluate_processes_with_different_decoding_refuse_before_any_work(tmp_path):
    out = tmp_path / "out"
    evaluate = ["evaluate", "--task", "emotion", "--ckpt", str(tmp_path / "ckpt"), "--data",
                str(tmp_path / "eval.json"), "--out", str(out)]
    run = Started([[*evaluate, "--max-new-tokens", "8", *distributed(2, 0)],
                   [*evaluate, "--max-new-tokens", "16", "--temperature", "0.5", *distributed(2, 1)]],
                  cwd=tmp_path, logs=tmp_path / "logs")
    codes, _ = run.wait()
    assert codes == [1, 1]
    sentence = ("error: the processes were started with different settings: --max-new-tokens is 8 on process 0 "
                "and 16 on process 1; --temperature is 0.0 on process 0 and 0.5 on process 1; start every process "
                "with the same command (only --process-id differs)")
    assert run.errors(0) == run.errors(1) == [sentence]
    assert not out.exists()


def test_the_sentence_groups_the_processes_by_value():
    settings = {0: {"the command": "train", "--steps": 30, "--set": []},
                1: {"the command": "train", "--steps": 40, "--set": ["a=1"]},
                2: {"the command": "train", "--steps": 30, "--set": []}}
    assert different_settings(settings) == (
        'the processes were started with different settings: --steps is 30 on processes 0 and 2 and 40 on '
        'process 1; --set is [] on processes 0 and 2 and ["a=1"] on process 1; start every process with the same '
        'command (only --process-id differs)')
    assert different_settings({0: {"--steps": None, "--extend": True}, 1: {"--extend": False}}) == (
        "the processes were started with different settings: --extend is given on process 0 and not given on "
        "process 1; start every process with the same command (only --process-id differs)")
    assert different_settings({0: settings[0], 1: dict(settings[0])}) is None


def test_two_processes_with_the_same_process_id_both_stop(tmp_path):
    run = Started([train(tmp_path / "run", *distributed(2, 0)), train(tmp_path / "run", *distributed(2, 0))],
                  cwd=tmp_path, logs=tmp_path / "logs")
    codes, _ = run.wait()
    assert codes == [1, 1]
    sentence = (f"error: process 0 of 2 cannot start (coordinator {run.address}): two processes were started with "
                "--process-id 0; give each process its own --process-id from 0 to 1")
    assert run.errors(0) == run.errors(1) == [sentence]
    assert not (tmp_path / "run").exists()


def test_a_doubled_process_id_stops_every_process(tmp_path):
    run = Started([train(tmp_path / "run", *distributed(3, i)) for i in (0, 1, 1)], cwd=tmp_path,
                  logs=tmp_path / "logs")
    codes, _ = run.wait()
    assert codes == [1, 1, 1]
    what = (f"cannot start (coordinator {run.address}): two processes were started with --process-id 1; give each "
            "process its own --process-id from 0 to 2")
    assert [run.errors(i) for i in range(3)] == [[f"error: process {p} of 3 {what}"] for p in (0, 1, 1)]


def test_a_coordinator_port_in_use_is_named(tmp_path):
    with socket.create_server(("", 0)) as held:  # another program's port
        run = Started([train(tmp_path / "run", *distributed(2, i)) for i in range(2)], cwd=tmp_path,
                      logs=tmp_path / "logs", port=held.getsockname()[1])
        codes, ends = run.wait()
    assert codes == [1, 1]
    fix = "give every process the same free port in --coordinator"
    assert run.errors(0) == [f"error: process 0 of 2 cannot start (coordinator {run.address}): port {run.port} is "
                             f"in use by another program; {fix}"]
    assert run.errors(1) == [f"error: process 1 of 2 cannot start (coordinator {run.address}): no process 0 of this "
                             f"run answered there within {PEER_TIMEOUT} s; start process 0, which hosts the "
                             "coordinator, and give every process the same --coordinator with a free port"]


def test_a_process_that_cannot_reach_the_coordinator_gives_up_within_the_peer_timeout(tmp_path):
    run = Started([train(tmp_path / "run", *distributed(2, 1))], cwd=tmp_path, logs=tmp_path / "logs")  # no process 0
    codes, ends = run.wait()
    assert codes == [1] and ends[0] < PEER_TIMEOUT + 20, ends  # python and jax start in the rest
    assert run.errors(0) == [f"error: process 1 of 2 cannot start (coordinator {run.address}): no process 0 of this "
                             f"run answered there within {PEER_TIMEOUT} s; start process 0, which hosts the "
                             "coordinator, and give every process the same --coordinator with a free port"]
    assert not (tmp_path / "run").exists()


def test_a_process_that_never_comes_and_a_wrong_process_count_are_named(tmp_path):
    missing = Started([train(tmp_path / "run", *distributed(3, i)) for i in range(2)], cwd=tmp_path,
                      logs=tmp_path / "missing")
    codes, _ = missing.wait()
    assert codes == [1, 1]
    what = (f"cannot start (coordinator {missing.address}): process 2 did not join within {PEER_TIMEOUT} s; start "
            "every process with the same --coordinator and --num-processes, each with its own --process-id from 0 "
            "to 2")
    assert [missing.errors(i) for i in range(2)] == [[f"error: process {i} of 3 {what}"] for i in range(2)]

    counts = Started([train(tmp_path / "run", *distributed(2, 0)), train(tmp_path / "run", *distributed(3, 1))],
                     cwd=tmp_path, logs=tmp_path / "counts")
    codes, _ = counts.wait()
    assert codes == [1, 1]
    what = (f"cannot start (coordinator {counts.address}): process 1 was started with --num-processes 3 and "
            "process 0 with 2; give every process the same --num-processes")
    assert counts.errors(0) == [f"error: process 0 of 2 {what}"]
    assert counts.errors(1) == [f"error: process 1 of 3 {what}"]
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("argv, message", [
    (["--num-processes", "2", "--process-id", "2"], "error: --process-id 2 is not below --num-processes 2: the ids "
                                                    "of 2 processes run from 0 to 1"),
    (["--num-processes", "2", "--process-id", "1", "--coordinator", "nowhere"],
     "error: --coordinator must be HOST:PORT, not 'nowhere'"),
], ids=["id-not-below-count", "address-without-port"])
def test_impossible_ids_and_addresses_are_refused_at_once(tmp_path, argv, message):
    flags = argv if "--coordinator" in argv else [*argv, "--coordinator", "127.0.0.1:PORT"]
    run = Started([train(tmp_path / "run", *flags)], cwd=tmp_path, logs=tmp_path / "logs")
    codes, _ = run.wait()
    assert codes == [1] and run.errors(0) == [message]
