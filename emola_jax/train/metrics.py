"""Per-step metrics: `metrics.jsonl` (one object per step) and TensorBoard event files."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from emola_jax import atomic


class StepLog:
    """A JSON-lines file with one object per step (`{"step": ..., ...}`). On resume, lines of
    steps after the restored one (logged by a run killed before its next checkpoint) are
    dropped, so each step appears once."""

    def __init__(self, path: str | Path, *, resume_step: int):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        kept = [json.dumps(entry) + "\n" for number, entry in atomic.read_jsonl(self.path, appended=True)
                if _step(self.path, number, entry) <= resume_step]
        atomic.write_text(self.path, "".join(kept))  # whole: a kill now leaves the old file or the new
        self._file = self.path.open("a")

    def write(self, record: dict[str, Any]) -> None:
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def _step(path: Path, number: int, entry: Any) -> int:
    if not isinstance(entry, dict) or not isinstance(entry.get("step"), int):
        raise ValueError(f"{path}, line {number}: not a step's entry (no integer \"step\")")
    return entry["step"]


class MetricsWriter:
    """`metrics.jsonl` and TensorBoard, written by process 0 only; resumes as `StepLog` does."""

    def __init__(self, workdir: str | Path, *, resume_step: int, enabled: bool = True):
        self.enabled = enabled
        if not enabled:
            return
        # deferred: start-up time (tensorboardX)
        from tensorboardX import SummaryWriter

        self._log = StepLog(Path(workdir) / "metrics.jsonl", resume_step=resume_step)
        self._tensorboard = SummaryWriter(str(Path(workdir) / "tensorboard"), purge_step=resume_step + 1)

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self._log.write(record)
        for name, value in record.items():
            if name != "step" and isinstance(value, int | float):
                self._tensorboard.add_scalar(f"train/{name}", value, record["step"])

    def flush(self) -> None:
        """TensorBoard's events on disk (at each checkpoint: a process that is lost keeps them)."""
        if self.enabled:
            self._tensorboard.flush()

    def close(self) -> None:
        if self.enabled:
            self._log.close()
            self._tensorboard.close()
