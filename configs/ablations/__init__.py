"""The paper's ablations (Tables 8, 9, 13 and 14, plus several priors) as configs: each table a list
of rows, each row a change to the full EmoLA experiment; one file per table, `get_config("row=ROW,task=TASK")`
one run.

    python run.py train --config 'ablations/tokens:row=prior_only,task=emotion' --workdir runs/tok-p-emo

Each starts from `configs/emola_7b.py` (FABA-Instruct, LLaVA-1.5-7B base; paths changed with
`--set`) and applies the row. As the paper trains the two FABA tasks individually, a row of the
tokens, tuning, position and priors tables is trained on one task's set and scored on it (TASK:
emotion or au, one epoch of that set); the tasks table adds the multi-task row (`multi`: both sets,
scored on each). Without an argument: the table's last row (EmoLA as published), on emotion.
`python run.py ablation TABLE` trains and scores a whole table (`emola_jax/apps/ablation.py`) beside
the paper's numbers, which the rows hold.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

from configs.emola_7b import get_config as emola_7b
from emola_jax.config import LANDMARK_DIM, PriorToken
from emola_jax.models.tree import LORA_PATTERN, PRIOR_PROJECTOR_PATTERN, PROJECTOR_PATTERN

TASKS = ("emotion", "au")
MULTI = "multi"  # the tasks table's row trained on both sets
# FABA-Instruct's training records per task (the paper's Table 2): one epoch of a single task
# is this share of the two sets' epoch when the annotation files are not at hand
FABA_RECORDS = {"emotion": 19474, "au": 15835}
DLIB68 = PriorToken("dlib68", 136)
DESCRIPTOR = PriorToken("dlib-face-descriptor", 128)


@dataclasses.dataclass(frozen=True)
class Row:
    """One row: `change` turns the full EmoLA experiment into this row's; `paper` holds the
    paper's `(S_re, S_ge, S_rege)` per task (None where the paper has no such row)."""

    name: str
    label: str
    change: Callable[[Any], Any]
    paper: dict[str, tuple[float, float, float]] | None = None
    tasks: tuple[str, ...] = TASKS  # what it is trained on, one run each ("multi": both sets at once)


def _paper(emotion: tuple[float, float], au: tuple[float, float], rege: tuple[float, float] | None = None):
    """Per-task `(S_re, S_ge, S_rege)`; S_rege = S_re + S_ge where a table leaves it out."""
    rege = rege or (round(sum(emotion), 1), round(sum(au), 1))
    return {"emotion": (*emotion, rege[0]), "au": (*au, rege[1])}


def _model(experiment, **changes):
    return dataclasses.replace(experiment, model=dataclasses.replace(experiment.model, **changes))


# what a row may retune or freeze, by the trainable group's pattern (`models/tree.py`)
GROUPS = {"lora": LORA_PATTERN, "prior": PRIOR_PROJECTOR_PATTERN, "projector": PROJECTOR_PATTERN}


def _rates(experiment, **rates):
    """The experiment with the learning rate of its LoRA (`lora`), prior projector (`prior`) or
    multi-modal projector (`projector`) group replaced (None freezes). ValueError when the
    experiment's `train.trainable` does not list the group's pattern (a row would change nothing)."""
    trainable = dict(experiment.train.trainable)
    for group, rate in rates.items():
        if GROUPS[group] not in trainable:
            raise ValueError(f"train.trainable does not list the {group} pattern {GROUPS[group]!r}, which this "
                             "ablation row retunes")
        trainable[GROUPS[group]] = rate
    train = dataclasses.replace(experiment.train, trainable=tuple(trainable.items()))
    return dataclasses.replace(experiment, train=train)


def _rate_of(experiment, group: str) -> float | None:
    return dict(experiment.train.trainable).get(GROUPS[group])


def _same(experiment):
    return experiment


def _prior_only(experiment):
    # the multi-modal projector has nothing to project without visual tokens
    return _rates(_model(experiment, visual_tokens=False), projector=None)


def _lora_only(experiment):
    return _rates(experiment, prior=None)


def _projector_only(experiment):
    return _rates(experiment, lora=None)


TABLES: dict[str, tuple[Row, ...]] = {
    "tokens": (  # Table 8: H_v visual tokens, H_p the prior token
        Row("prior_only", "H_p only", _prior_only, _paper((41.2, 29.9), (40.5, 33.7))),
        Row("visual_only", "H_v only", lambda e: _model(e, prior_position="off"), _paper((62.5, 32.1), (55.3, 34.8))),
        Row("both", "H_v + H_p", _same, _paper((64.5, 31.7), (60.2, 34.7))),
    ),
    "tuning": (  # Table 9: what trains
        Row("projector_only", "prior projector only", _projector_only, _paper((44.9, 29.6), (47.7, 34.0))),
        Row("lora_only", "LoRA only", _lora_only, _paper((63.0, 32.1), (55.6, 34.9))),
        Row("both", "LoRA + prior projector", _same, _paper((64.5, 31.7), (60.2, 34.7))),
    ),
    "tasks": (  # Table 13: one task's set per run, or both sets in one run
        Row("single", "single task", _same, _paper((64.5, 31.7), (60.2, 34.7), (96.2, 94.9))),
        Row("multi", "multi-task", _same, _paper((64.3, 32.0), (54.7, 33.9), (96.3, 88.6)), tasks=(MULTI,)),
    ),
    "position": (  # Table 14: where the prior token goes
        Row("before", "prior token before visual tokens", lambda e: _model(e, prior_position="before"),
            _paper((63.5, 32.1), (57.8, 35.3), (95.6, 93.1))),
        Row("after", "prior token after visual tokens", lambda e: _model(e, prior_position="after"),
            _paper((64.5, 31.7), (60.2, 34.7), (96.2, 94.9))),
    ),
    "priors": (  # not in the paper: the face priors it leaves to future work, alone and beside 2d106det
        Row("2d106det", "2d106det landmarks", lambda e: _model(e, priors=(PriorToken("2d106det", LANDMARK_DIM),))),
        Row("dlib68", "dlib68 landmarks", lambda e: _model(e, priors=(DLIB68,))),
        Row("descriptor", "dlib face descriptor (identity)", lambda e: _model(e, priors=(DESCRIPTOR,))),
        Row("2d106det_dlib68", "2d106det + dlib68 landmarks",
            lambda e: _model(e, priors=(PriorToken("2d106det", LANDMARK_DIM), DLIB68))),
    ),
}


def row(table: str, name: str) -> Row:
    """The row `name` of `table`; ValueError naming the valid ones."""
    if table not in TABLES:
        raise ValueError(f"ablation table {table!r} is unknown; tables: {', '.join(TABLES)}")
    rows = {r.name: r for r in TABLES[table]}
    if name not in rows:
        raise ValueError(f"table {table} has no row {name!r}; rows: {', '.join(rows)}")
    return rows[name]


def experiment_for(experiment, table: str, name: str, task: str):
    """`experiment` (full EmoLA, trained on `data.annotations` = (emotion set, AU set)) as row
    `name` of `table` trained on `task` ("emotion", "au" or "multi": both sets). A single task
    keeps one set and the steps of one epoch of it (`single_task_steps`)."""
    chosen = row(table, name)
    if task not in chosen.tasks and not (task in TASKS and chosen.tasks == TASKS):
        raise ValueError(f"row {name} of table {table} is trained on {' or '.join(chosen.tasks)}, not {task!r}")
    out = chosen.change(experiment)
    if _rate_of(out, "prior") is not None and out.model.prior_position == "off":  # nothing to train there
        out = _rates(out, prior=None)
    return out if task == MULTI else single_task(out, task)


def single_task(experiment, task: str):
    """`experiment` trained on one task's set: `data.annotations[0]` is the emotion set and
    `[1]` the AU set (as `configs/emola_7b.py` and the demo give them)."""
    if task not in TASKS:
        raise ValueError(f"task must be one of {', '.join(TASKS)}, not {task!r}")
    annotations = tuple(experiment.data.annotations) if not isinstance(experiment.data.annotations, str) else ()
    if len(annotations) != 2:
        raise ValueError(f"data.annotations must be (emotion set, AU set) to train one task, not {annotations!r}")
    steps = single_task_steps(experiment.train.steps, annotations, task)
    data = dataclasses.replace(experiment.data, annotations=(annotations[TASKS.index(task)],))
    return dataclasses.replace(experiment, data=data, train=dataclasses.replace(experiment.train, steps=steps))


def single_task_steps(steps: int, annotations: tuple[str, ...], task: str) -> int:
    """`steps` for both sets scaled to one set's share of their records: counted in the files
    when they are there, else FABA-Instruct's counts (`FABA_RECORDS`)."""
    try:
        counts = [len(json.loads(Path(a).read_text())) for a in annotations]
    except (OSError, ValueError):
        counts = [FABA_RECORDS[t] for t in TASKS]
    return max(1, math.ceil(steps * counts[TASKS.index(task)] / sum(counts)))


def runs(table: str) -> list[tuple[Row, str]]:
    """Every (row, task trained on) of `table`, in order."""
    if table not in TABLES:
        raise ValueError(f"ablation table {table!r} is unknown; tables: {', '.join(TABLES)}")
    return [(r, task) for r in TABLES[table] for task in r.tasks]


def scored_on(task: str) -> tuple[str, ...]:
    """The tasks a run trained on `task` is scored on (a multi-task run: both)."""
    return TASKS if task == MULTI else (task,)


def config_for(table: str, arg: str = ""):
    """The experiment of one row and task of `table`; `arg` is `row=ROW,task=TASK` (either may be left out)."""
    settings = dict(row=TABLES[table][-1].name, task=None)
    for part in filter(None, arg.split(",")):
        key, sep, value = part.partition("=")
        if not sep or key not in settings:
            raise ValueError(f"ablation config argument {part!r} is not row=ROW or task=TASK")
        settings[key] = value
    chosen = row(table, settings["row"])
    task = settings["task"] or ("emotion" if chosen.tasks == TASKS else chosen.tasks[0])
    return experiment_for(emola_7b(), table, chosen.name, task)
