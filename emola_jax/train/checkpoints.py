"""Training checkpoints: the small trainable state, written by orbax asynchronously and atomically.

Only what changes during training is saved (trainable weights, optimiser state, step, RNG,
skipped-update count) plus, in the step's metadata, the data iterator's state and the base
checkpoint's path and fingerprint. The frozen base is referenced, never copied; restoring
against a different base is an error. Orbax writes each step into a temporary folder and renames
it when complete, so a run killed mid-save resumes from the previous checkpoint.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import jax
from orbax.checkpoint import v1 as ocp

STATE = "state"


def base_fingerprint(path: str | Path) -> str:
    """A cheap identity of a base checkpoint: its config and the names and sizes of its weight files."""
    path = Path(path).absolute()
    digest = hashlib.sha256((path / "config.json").read_bytes())
    for file in sorted(p for p in (path / "params").rglob("*") if p.is_file()):
        digest.update(f"{file.relative_to(path)}:{file.stat().st_size}\n".encode())
    return digest.hexdigest()[:16]


class TrainCheckpoints:
    """`DIR/checkpoints/<step>/`, the last `keep` of them."""

    def __init__(self, workdir: str | Path, *, keep: int, base: str | None, fingerprint: str | None):
        self.directory = Path(workdir).absolute() / "checkpoints"
        self.base, self.fingerprint = base, fingerprint
        self._checkpointer = ocp.training.Checkpointer(
            self.directory,
            preservation_policy=ocp.training.preservation_policies.LatestN(keep),
            cleanup_tmp_directories=True,  # leftovers of a save that a kill interrupted
        )

    def latest_step(self) -> int | None:
        latest = self._checkpointer.latest
        return None if latest is None else int(latest.step)

    def save(self, step: int, state: dict, data_state: Any) -> None:
        """Starts an asynchronous save; the device arrays are copied before this returns."""
        metadata = {"data_iterator": _jsonable(data_state), "base": self.base, "base_fingerprint": self.fingerprint}
        self._checkpointer.save_checkpointables_async(step, {STATE: state}, custom_metadata=metadata, force=True)

    def restore(self, abstract_state: dict) -> tuple[dict, Any]:
        """The latest state, laid out as `abstract_state` (shapes, dtypes, shardings), and the data state."""
        step = self.latest_step()
        metadata = self._checkpointer.metadata(step).custom_metadata or {}
        if self.fingerprint is not None and metadata.get("base_fingerprint") != self.fingerprint:
            raise ValueError(
                f"{self.directory / str(step)} was trained on base {metadata.get('base')} "
                f"(fingerprint {metadata.get('base_fingerprint')}), but this run's base {self.base} has "
                f"fingerprint {self.fingerprint}; point train.base at the original base or use a new workdir"
            )
        try:
            restored = self._checkpointer.load_checkpointables(step, {STATE: abstract_state})
        except Exception as err:  # orbax/tensorstore raise many types; name the checkpoint once.
            raise ValueError(f"could not restore the training checkpoint {self.directory / str(step)}: {err}") from err
        return restored[STATE], _from_jsonable(metadata.get("data_iterator"))

    def wait(self) -> None:
        self._checkpointer.wait()

    def close(self) -> None:
        self._checkpointer.close()


def _jsonable(state: Any) -> Any:
    """Grain iterators report their state as bytes (JSON inside); metadata must be JSON."""
    if isinstance(state, bytes):
        return {"bytes": state.decode()}
    return json.loads(json.dumps(state))


def _from_jsonable(state: Any) -> Any:
    if isinstance(state, dict) and set(state) == {"bytes"}:
        return state["bytes"].encode()
    return state


def abstract_like(tree: Any) -> Any:
    """`ShapeDtypeStruct`s with the shardings of `tree`'s arrays: the target of a restore."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)
