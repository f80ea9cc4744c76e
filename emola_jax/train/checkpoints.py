"""Training checkpoints: the small trainable state, written by orbax asynchronously and atomically.

Only what changes during training is saved: the `TrainState` (trainable weights, optimiser state,
step, RNG, skipped-update count), which orbax writes as the dict of its fields (the tree these
checkpoints held before the state was typed, so those resume); each process's data-iterator
state in a file of its own (`data/process_{i}-of-{n}.json`, grain's naming); and, in the step's
metadata, the base checkpoint's path and fingerprint. The frozen base is referenced, never
copied; restoring against a different base is an error. Orbax writes each step into a temporary
folder and renames it when every process has finished, so a run killed mid-save resumes from the
previous checkpoint.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import jax
from orbax.checkpoint import v1 as ocp

from emola_jax.checkpoint import storage_error
from emola_jax.train.step import TrainState
from emola_jax.weights import path_name

STATE, DATA = "state", "data"


class DataIteratorState:
    """This process's data-iterator state as an orbax checkpointable: every process writes and
    reads its own `process_{i}-of-{n}.json` in the checkpoint's `data/` folder, since a grain
    iterator's position belongs to the rows that process reads."""

    def __init__(self, state: Any = None):
        self.state = state

    @staticmethod
    def file_name() -> str:
        return f"process_{jax.process_index()}-of-{jax.process_count()}.json"

    async def save(self, directory):
        text = json.dumps(self.state)  # fixed now: the iterator moves on while orbax writes

        async def write() -> None:
            folder = await directory.await_creation()
            (Path(folder) / self.file_name()).write_text(text)

        return write()

    async def load(self, directory):
        async def read() -> None:
            file = Path(directory) / self.file_name()
            if not file.is_file():
                written = sorted(p.name for p in Path(directory).glob("process_*.json"))
                raise ValueError(f"{file} does not exist (the checkpoint holds {', '.join(written) or 'no'} "
                                 "data-iterator files): resume with the process count that wrote it")
            self.state = json.loads(file.read_text())

        return read()


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
        self.settings: dict | None = None  # the run's settings (`rerun.to_json`), kept in each step's metadata
        self._checkpointer = ocp.training.Checkpointer(
            self.directory,
            preservation_policy=ocp.training.preservation_policies.LatestN(keep),
            cleanup_tmp_directories=True,  # leftovers of a save that a kill interrupted
        )

    def latest_step(self) -> int | None:
        latest = self._checkpointer.latest
        return None if latest is None else int(latest.step)

    def save(self, step: int, state: TrainState, data_state: Any) -> None:
        """Starts an asynchronous save (every process calls it); the device arrays are copied and
        `data_state` (this process's iterator state, JSON-able) is fixed before this returns."""
        metadata = {"base": self.base, "base_fingerprint": self.fingerprint, "experiment": self.settings}
        self._checkpointer.save_checkpointables_async(
            step, {STATE: state, DATA: DataIteratorState(data_state)}, custom_metadata=metadata, force=True)

    def latest_settings(self) -> dict | None:
        """The run's settings kept with the latest checkpoint (None: none, or written before they were
        kept): the record of what its weights were trained under, whatever became of `experiment.json`."""
        step = self.latest_step()
        if step is None:
            return None
        return (self._checkpointer.metadata(step).custom_metadata or {}).get("experiment")

    def restore(self, abstract_state: TrainState) -> tuple[TrainState, Any]:
        """The latest state, laid out as `abstract_state` (shapes, dtypes, shardings; its tree
        type too), and this process's data-iterator state."""
        step = self.latest_step()
        metadata = self._checkpointer.metadata(step).custom_metadata or {}
        if self.fingerprint is not None and metadata.get("base_fingerprint") != self.fingerprint:
            raise ValueError(
                f"{self.directory / str(step)} was trained on base {metadata.get('base')} "
                f"(fingerprint {metadata.get('base_fingerprint')}), but this run's base {self.base} has "
                f"fingerprint {self.fingerprint}; point train.base at the original base or use a new workdir"
            )
        where = self.directory / str(step)
        _check_same_weights(where, self._checkpointer.metadata(step).metadata, abstract_state)
        try:
            restored = self._checkpointer.load_checkpointables(
                step, {STATE: abstract_state, DATA: DataIteratorState()})
        except Exception as err:  # orbax/tensorstore raise many types, with pages of detail
            raise storage_error(f"could not restore the training checkpoint {where}", err) from err
        return restored[STATE], restored[DATA].state

    def wait(self) -> None:
        self._checkpointer.wait()

    def close(self) -> None:
        self._checkpointer.close()

    def __enter__(self) -> TrainCheckpoints:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _check_same_weights(where: Path, saved: Any, abstract_state: TrainState) -> None:
    """The checkpoint's trainable weights must be this run's, name for name and shape for shape
    (else the run changed its model or what trains): one line naming the first differences,
    before orbax would answer with pages of tree dumps."""
    def weights(tree) -> dict[str, tuple]:
        """`{name: (shape, dtype)}` of the leaves under `params` (a field of the state, a key on disk)."""
        leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
        return {path_name(p[1:]): (tuple(x.shape), str(x.dtype)) for p, x in leaves if path_name(p[:1]) == "params"}

    ours, theirs = weights(abstract_state), weights(saved or {})
    diffs = [f"{name}: {theirs.get(name, 'absent')} there, {ours.get(name, 'absent')} here"
             for name in sorted(ours.keys() | theirs.keys()) if ours.get(name) != theirs.get(name)]
    if diffs:
        raise ValueError(f"{where} holds other trainable weights than this run has ({len(diffs)} differ; "
                         f"{'; '.join(diffs[:3])}): the model or train.trainable changed; use a new workdir")


def abstract_like(tree: Any) -> Any:
    """`ShapeDtypeStruct`s with the shardings of `tree`'s arrays: the target of a restore."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)
