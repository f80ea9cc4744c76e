"""The paper's ablations (Tables 8, 9, 13 and 14, plus several priors) as changes to an experiment.

Each table is a list of rows; a row changes an `Experiment` (its model and what trains) and is run
once per task it is scored on. As the paper trains the two FABA tasks individually, a row of the
tokens, tuning, position and priors tables is trained on one task's set and scored on it; the
tasks table adds the multi-task row (both sets, scored on each). `configs/ablations/` names every
row as a config file; `run.py ablation TABLE` trains and scores a whole table and writes
`table.md` (this run's numbers beside the paper's) and `table.png`.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

from emola_jax.config import LANDMARK_DIM, PriorToken

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


def _rates(experiment, **rates):
    """The experiment with the learning rate of its LoRA (`lora`), prior projector (`prior`) or
    multi-modal projector (`projector`) patterns replaced (None freezes)."""
    kinds = {"lora": lambda p: "lora" in p, "prior": lambda p: p.startswith("prior_projector"),
             "projector": lambda p: p.startswith("multi_modal_projector")}
    trainable = tuple((pattern, next((rates[k] for k in rates if kinds[k](pattern)), rate))
                      for pattern, rate in experiment.train.trainable)
    return dataclasses.replace(experiment, train=dataclasses.replace(experiment.train, trainable=trainable))


def _rate_of(experiment, kind: str) -> float | None:
    test = {"lora": lambda p: "lora" in p, "prior": lambda p: p.startswith("prior_projector")}[kind]
    return next((rate for pattern, rate in experiment.train.trainable if test(pattern)), None)


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


# ---------------------------------------------------------------------------------------------
# the table


def write_table(out: str | Path, table: str, results: list[dict[str, Any]]) -> Path:
    """Writes `out/table.md` (this run's S_re, S_ge, S_rege per row and task beside the paper's)
    and `out/table.png` (a bar chart of S_rege); returns the markdown file. `results` hold
    `row`, `task` (the task scored) and `trained_on`, `s_re`, `s_ge`, `s_rege` each."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    lines = [f"# Ablation: {table}", "",
             "| row | trained on | scored on | S_re | S_ge | S_rege | paper S_re | paper S_ge | paper S_rege |",
             "|---|---|---|---|---|---|---|---|---|"]
    for result in results:
        chosen = row(table, result["row"])
        paper = (chosen.paper or {}).get(result["task"])
        theirs = [f"{v:.1f}" for v in paper] if paper else ["—"] * 3
        ours = [f"{result[k]:.1f}" for k in ("s_re", "s_ge", "s_rege")]
        lines.append(f"| {chosen.label} | {result['trained_on']} | {result['task']} | " + " | ".join(ours + theirs)
                     + " |")
    path = out / "table.md"
    path.write_text("\n".join(lines) + "\n")

    labels = [f"{r['row']}\n{r['task']}" for r in results]
    ours = [r["s_rege"] for r in results]
    theirs = [((row(table, r["row"]).paper or {}).get(r["task"]) or (math.nan,) * 3)[2] for r in results]
    figure, axes = plt.subplots(figsize=(max(4.0, 1.4 * len(results)), 3.6))
    x = range(len(results))
    axes.bar([i - 0.2 for i in x], ours, width=0.4, label="this run")
    axes.bar([i + 0.2 for i in x], theirs, width=0.4, label="paper", hatch="//", alpha=0.6)
    axes.set_xticks(list(x), labels, fontsize=7)
    axes.set_ylabel("S_rege")
    axes.set_title(f"Ablation: {table}")
    axes.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(out / "table.png", dpi=120)
    plt.close(figure)
    return path


def runs(table: str) -> list[tuple[Row, str]]:
    """Every (row, task trained on) of `table`, in order."""
    if table not in TABLES:
        raise ValueError(f"ablation table {table!r} is unknown; tables: {', '.join(TABLES)}")
    return [(r, task) for r in TABLES[table] for task in r.tasks]


def scored_on(task: str) -> tuple[str, ...]:
    """The tasks a run trained on `task` is scored on (a multi-task run: both)."""
    return TASKS if task == MULTI else (task,)


# ---------------------------------------------------------------------------------------------
# running a table


@dataclasses.dataclass(frozen=True)
class EvalSets:
    """What each task is scored on: annotations per task, their images, and their prior features
    (one file per prior of the largest row's model, in its order)."""

    annotations: dict[str, Path]
    images_root: Path | None
    landmarks: tuple[Path, ...]


def _pick(files: tuple[Path, ...], everything: tuple[PriorToken, ...], wanted: tuple[PriorToken, ...]):
    """The feature files of `wanted` priors out of those of `everything` (same order); one file as a Path."""
    index = {p.name: i for i, p in enumerate(everything)}
    missing = [p.name for p in wanted if p.name not in index]
    if missing:
        raise ValueError(f"no prior features given for {missing[0]!r}; given: {', '.join(index)}")
    picked = tuple(Path(files[index[p.name]]) for p in wanted)
    return picked[0] if len(picked) == 1 else picked


def _all_priors(table: str, experiment) -> tuple[PriorToken, ...]:
    """Every prior some row of `table` uses, each once, in the order the rows first name them."""
    seen: dict[str, PriorToken] = {}
    for r in TABLES[table]:
        for prior in r.change(experiment).model.priors:
            seen.setdefault(prior.name, prior)
    return tuple(seen.values())


def run_table(table: str, workdir: str | Path, experiment, *, seed: int = 0, eval_sets: EvalSets | None = None,
              max_new_tokens: int = 64, batch_size: int = 14, progress: bool = False) -> Path:
    """Trains and scores every row of `table` under `workdir` (`runs/ROW-TASK`, `evaluation/ROW-TASK-SCORED`)
    and writes `workdir/table.md` and `table.png`; returns the markdown file.

    Without `eval_sets`, `experiment` is a whole tiny model and the rows train from the demo's
    converted base on its drawn faces (prepared in `workdir/data`); with them, `experiment` is a
    real run (`train.base` set, `data.annotations` = (emotion set, AU set), `data.landmarks` one file
    per prior of `_all_priors`) and each task is scored on `eval_sets`."""
    from emola_jax import demo
    from emola_jax.checkpoint import load_tokenizer
    from emola_jax.data.conversation import pad_token_id
    from emola_jax.eval.evaluate import evaluate_model
    from emola_jax.generate import GenerationConfig
    from emola_jax.train.loop import train

    workdir = Path(workdir).absolute()
    everything = _all_priors(table, experiment)
    on_demo = eval_sets is None
    if on_demo:
        data_dir = workdir / "data"
        model = experiment.model.replace(priors=everything)
        inputs = demo.prepared(data_dir, model, seed) or demo.prepare(data_dir, model, seed)  # runs need this base
        eval_sets = EvalSets({t: inputs.annotations[f"eval_{t}"] for t in TASKS}, inputs.faces,
                             inputs.landmarks if isinstance(inputs.landmarks, tuple) else (inputs.landmarks,))
    results = []
    for chosen, task in runs(table):
        whole = chosen.change(experiment)
        priors = whole.model.priors
        if not on_demo:
            files = experiment.data.landmarks
            files = (files,) if isinstance(files, (str, Path)) else tuple(files)
            start = dataclasses.replace(experiment, data=dataclasses.replace(
                experiment.data, landmarks=_pick(files, everything, priors)))
        else:
            start = demo.from_base(experiment, demo.DemoInputs.in_folder(data_dir, priors), seed)
        run = experiment_for(start, table, chosen.name, task)
        result = train(run, workdir / "runs" / f"{chosen.name}-{task}", progress=progress)
        tokenizer = load_tokenizer(run.train.base)
        generation = GenerationConfig(max_new_tokens=max_new_tokens, eos_token_id=tokenizer.eos_token_id,
                                      pad_token_id=pad_token_id(tokenizer))
        for scored in scored_on(task):
            metrics = evaluate_model(
                result["model"], eval_sets.annotations[scored], scored,
                workdir / "evaluation" / f"{chosen.name}-{task}-{scored}", images_root=eval_sets.images_root,
                batch_size=batch_size, progress=progress, generation=generation,
                landmarks=_pick(eval_sets.landmarks, everything, priors) if whole.model.prior_position != "off"
                else None)
            results.append({"row": chosen.name, "trained_on": task, "task": scored,
                            **{k: float(metrics[k]) for k in ("s_re", "s_ge", "s_rege")}})
            (workdir / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    return write_table(workdir, table, results)
