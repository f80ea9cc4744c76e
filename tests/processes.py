"""`run.py` as the processes of one multi-process run on this machine (127.0.0.1, CPU devices)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RUN = [sys.executable, str(ROOT / "run.py")]
TIMEOUT = 600  # seconds a whole run may take before the test fails instead of hanging


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# `run.py train` of a smaller tiny (one layer per tower, 28-pixel images, LoRA on q and v): quick
SMALL_TRAIN = ["train", "--config", "tiny", "--steps", "4", "--set", "train.checkpoint_every=2",
               "--set", "data.seq_length=48", "--set", "model.vision.num_hidden_layers=1",
               "--set", "model.vision.image_size=28", "--set", "model.text.num_hidden_layers=1",
               "--set", 'model.lora.targets=["q_proj", "v_proj"]']


def cpu_env(devices: int) -> dict:
    """The environment of a process with `devices` virtual CPU devices."""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    return {**env, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}", "JAX_PLATFORMS": "cpu"}


class Run:
    """`run.py ARGS` started as `count` processes (one process: no distributed flags), each with
    `devices` CPU devices; each one's stdout and stderr go to `logs/process{i}.out` and `.err`.
    `cwd_of[i]`: the working directory of process `i` when not `cwd` (the command is the same on
    every process: only what it finds on its host may differ). `env`: variables set for every
    process (None: removed)."""

    def __init__(self, args: list[str], *, count: int, devices: int, cwd: Path, logs: Path,
                 cwd_of: dict[int, Path] | None = None, env: dict[str, str | None] | None = None):
        port = free_port()
        commands = [[*args, *(["--coordinator", f"127.0.0.1:{port}", "--num-processes", str(count),
                               "--process-id", str(i)] if count > 1 else [])] for i in range(count)]
        self._start(commands, devices=devices, cwd=cwd, logs=logs, cwd_of=cwd_of, env=env)

    def _start(self, commands: list[list[str]], *, devices: int, cwd: Path, logs: Path,
               cwd_of: dict[int, Path] | None = None, env: dict[str, str | None] | None = None) -> None:
        """One process per command line (its `run.py` arguments)."""
        environment = {**cpu_env(devices), **(env or {})}
        environment = {k: v for k, v in environment.items() if v is not None}
        self.logs = Path(logs)
        self.logs.mkdir(parents=True, exist_ok=True)
        self.start, self.procs, self.ends = time.monotonic(), [], []
        for i, command in enumerate(commands):
            with open(self.logs / f"process{i}.out", "w") as out, open(self.logs / f"process{i}.err", "w") as err:
                self.procs.append(subprocess.Popen([*RUN, *command], cwd=(cwd_of or {}).get(i, cwd),
                                                   env=environment, stdout=out, stderr=err))

    def stdout(self, i: int) -> str:
        return (self.logs / f"process{i}.out").read_text()

    def output(self, i: int) -> str:
        """Process `i`'s stdout, then its stderr."""
        return self.stdout(i) + (self.logs / f"process{i}.err").read_text()

    def wait(self, timeout: float = TIMEOUT) -> list[int]:
        """Every process's return code (and in `ends` its seconds from the start to its end); all are
        killed if the run is not over within `timeout`."""
        deadline, self.ends = time.monotonic() + timeout, []
        try:
            for p in self.procs:
                p.wait(timeout=max(deadline - time.monotonic(), 0))
                self.ends.append(time.monotonic() - self.start)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"a process still ran after {timeout} s; logs in {self.logs}") from None
        return [p.returncode for p in self.procs]

    def kill(self) -> None:
        for p in self.procs:
            p.kill()
            p.wait()

    def check(self, timeout: float = TIMEOUT) -> Run:
        """Waits, and fails with the end of each log unless every process succeeded."""
        codes = self.wait(timeout)
        assert codes == [0] * len(codes), [self.output(i)[-3000:] for i in range(len(codes))]
        return self
