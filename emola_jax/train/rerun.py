"""What a rerun in a workdir may change: the run's settings are kept in `WORKDIR/experiment.json`.

A run's trajectory (its weights at every step) follows from its whole config: the model, the
data, the optimiser, the schedule (whose length is `train.steps`) and the seeds. Resuming a
checkpoint under other settings would go on silently as another run, so a rerun that changes any
of them is refused, each difference named. May change between reruns:

- how the run is logged, saved and computed, never what it computes: `train.log_every`,
  `train.checkpoint_every`, `train.keep_checkpoints`, `train.remat`, `train.attention`,
  `train.mesh` (a resume on other hardware) and `train.on_nonfinite` (both policies drop a
  non-finite update; `stop` also ends the run);
- paths written differently that point at the same files (`train.base` and the data's files are
  kept resolved; the base's contents are checked by its fingerprint in each checkpoint);
- `train.steps`, raised, with `extend=True` (`run.py train --extend`): the remaining steps then
  follow the longer run's schedule (a cosine decay over the new length), not the one the earlier
  steps were taken under.

`train.steps` below the latest checkpoint's step is always refused: that run cannot be made
shorter than it already is. A workdir with no checkpoint yet has no trajectory to keep: its run
starts afresh and the file is written anew.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
from pathlib import Path
from typing import Any

import jax

from emola_jax import atomic
from emola_jax.config import EmolaConfig, build, differences
from emola_jax.train.config import Experiment, TrainConfig

EXPERIMENT_FILE = "experiment.json"
# fields a rerun may change (see the module's docstring)
MAY_CHANGE = frozenset({
    "train.log_every", "train.checkpoint_every", "train.keep_checkpoints", "train.remat", "train.attention",
    "train.mesh", "train.on_nonfinite",
})
DATA_PATHS = ("annotations", "images_root", "landmarks", "tfds_dir")  # data config fields naming files


def recorded(experiment: Experiment, model: EmolaConfig) -> Experiment:
    """What the workdir keeps of `experiment`: the whole model it trains (`model`, with the base's
    architecture), and every path resolved, so that the same files compare equal."""
    train = experiment.train
    if train.base is not None:
        train = dataclasses.replace(train, base=_resolve(train.base))
    data = experiment.data
    if dataclasses.is_dataclass(data):
        paths = {name: _resolve(getattr(data, name)) for name in DATA_PATHS
                 if hasattr(data, name) and getattr(data, name)}
        data = dataclasses.replace(data, **paths)
    elif data is not None:
        data = repr(data)  # a data object that is no config dataclass is kept and compared as its text
    return Experiment(model=model, train=train, data=data)


def _resolve(value: str | tuple[str, ...]) -> str | tuple[str, ...]:
    if isinstance(value, (tuple, list)):
        return tuple(str(Path(v).expanduser().resolve()) for v in value)
    return str(Path(value).expanduser().resolve())


def to_json(experiment: Experiment) -> dict[str, Any]:
    data = experiment.data
    if dataclasses.is_dataclass(data):
        data = {"type": f"{type(data).__module__}.{type(data).__qualname__}", **dataclasses.asdict(data)}
    return {"model": dataclasses.asdict(experiment.model), "train": dataclasses.asdict(experiment.train),
            "data": data}


def from_json(saved: dict[str, Any]) -> Experiment:
    data = saved.get("data")
    if isinstance(data, dict) and "type" in data:
        data = dict(data)
        module, _, name = data.pop("type").rpartition(".")
        data = build(getattr(importlib.import_module(module), name), data, "data")
    return Experiment(model=build(EmolaConfig, saved["model"], "model"),
                      train=build(TrainConfig, saved["train"], "train"), data=data)


def load(workdir: Path) -> Experiment | None:
    """The settings `workdir`'s run was started with (None: not kept there)."""
    file = workdir / EXPERIMENT_FILE
    return read(file) if file.is_file() else None


def read(file: Path) -> Experiment:
    """The settings in `file` (an `experiment.json`); ValueError naming it when it is not one."""
    try:
        return from_json(json.loads(Path(file).read_text()))
    except (ValueError, KeyError, TypeError, AttributeError, ImportError) as err:
        raise ValueError(f"{file} is not a run's settings ({err}); restore it, or use a new workdir") from err


def save(workdir: Path, experiment: Experiment) -> None:
    """Writes `WORKDIR/experiment.json` whole (process 0; the workdir is shared)."""
    if jax.process_index() == 0:
        atomic.write_text(workdir / EXPERIMENT_FILE, _text(experiment))


def _text(experiment: Experiment) -> str:
    return json.dumps(to_json(experiment), indent=2) + "\n"


def check_rerun(workdir: Path, experiment: Experiment, latest_step: int | None, *, extend: bool = False,
                kept: dict[str, Any] | None = None) -> None:
    """Refuses a rerun whose settings would alter the trajectory of the run kept in `workdir`
    (`experiment` as `recorded` gives it; `latest_step`: the latest checkpoint's, None if none;
    `kept`: the settings stored with that checkpoint, which rule over `experiment.json`, a copy a
    user may damage or move), and keeps the settings the run goes on with."""
    steps = experiment.train.steps
    if latest_step is not None and steps < latest_step:
        raise ValueError(f"train.steps {steps} is below step {latest_step} of the latest checkpoint in "
                         f"{workdir / 'checkpoints'}; a run cannot be made shorter than it is (use a new workdir)")
    saved = None
    if latest_step is not None:
        saved = from_json(kept) if kept is not None else load(workdir)
        if saved is None:
            raise ValueError(f"{workdir} holds checkpoints up to step {latest_step} but no record of the settings "
                             f"they were trained under ({workdir / EXPERIMENT_FILE} is gone); restore that file, or "
                             "use a new workdir")
    if saved is not None:
        skip = MAY_CHANGE | ({"train.steps"} if extend and steps >= saved.train.steps else set())
        changed = differences(experiment, saved, skip=skip)
        if changed:
            hint = "; train --extend allows raising train.steps" if not extend and steps > saved.train.steps else ""
            raise ValueError(f"{workdir} holds a run with other settings ({'; '.join(changed)}): rerun it "
                             f"with the settings in {workdir / EXPERIMENT_FILE}, or use a new workdir{hint}")
    file = workdir / EXPERIMENT_FILE
    if not file.is_file() or file.read_text() != _text(experiment):  # (re)written: gone, torn or changed
        save(workdir, experiment)
