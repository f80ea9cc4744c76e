"""`run.py ablation TABLE`: trains and scores every row of one of the paper's ablation tables
(`configs/ablations/`, which holds the rows and the paper's numbers) and writes `table.md` (this
run's numbers beside the paper's) and `table.png`. Without evaluation sets of its own, the rows
train from the demo's converted base on its drawn faces.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure  # drawn straight to a file: no pyplot state, no window

from configs.ablations import TABLES, TASKS, experiment_for, row, runs, scored_on
from configs.demo_faces import DemoInputs, from_base
from emola_jax.apps import demo
from emola_jax.checkpoint import load_tokenizer
from emola_jax.config import PriorToken
from emola_jax.data.conversation import pad_token_id
from emola_jax.eval.evaluate import evaluate_model
from emola_jax.generate import GenerationConfig
from emola_jax.progress import stage_lines
from emola_jax.train.loop import train

# ---------------------------------------------------------------------------------------------
# the table


def write_table(out: str | Path, table: str, results: list[dict[str, Any]]) -> Path:
    """Writes `out/table.md` (this run's S_re, S_ge, S_rege per row and task beside the paper's)
    and `out/table.png` (a bar chart of S_rege); returns the markdown file. `results` hold
    `row`, `task` (the task scored) and `trained_on`, `s_re`, `s_ge`, `s_rege` each."""

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
    chart(table, results).savefig(out / "table.png", dpi=120)
    return path


def chart(table: str, results: list[dict[str, Any]]) -> Figure:
    """S_rege of each row and task beside the paper's, on the table's scale (0-200)."""
    labels = [f"{r['row']}\n{r['task']}" for r in results]
    ours = [r["s_rege"] for r in results]
    theirs = [((row(table, r["row"]).paper or {}).get(r["task"]) or (math.nan,) * 3)[2] for r in results]
    figure = Figure(figsize=(max(4.0, 1.4 * len(results)), 3.6))
    axes = figure.subplots()
    x = range(len(results))
    axes.bar([i - 0.2 for i in x], ours, width=0.4, label="this run")
    axes.bar([i + 0.2 for i in x], theirs, width=0.4, label="paper", hatch="//", alpha=0.6)
    axes.set_xticks(list(x), labels, fontsize=7)
    axes.set_ylabel("S_rege = S_re + S_ge (0-200)")
    axes.set_ylim(0, 200)  # the table's scale: each of S_re and S_ge runs to 100
    axes.set_title(f"Ablation: {table}")
    axes.legend(fontsize=7)
    figure.tight_layout()
    return figure


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
    workdir = Path(workdir).absolute()
    everything = _all_priors(table, experiment)
    on_demo = eval_sets is None
    note = stage_lines(progress)
    if on_demo:
        data_dir = workdir / "data"
        model = experiment.model.replace(priors=everything)
        inputs = demo.prepared(data_dir, model, seed)  # runs trained on an earlier preparation need its base
        if inputs is None:
            note(f"preparing the demo's base and drawn faces in {data_dir}")
            inputs = demo.prepare(data_dir, model, seed, progress=progress)
        eval_sets = EvalSets({t: inputs.annotations[f"eval_{t}"] for t in TASKS}, inputs.faces,
                             inputs.landmarks if isinstance(inputs.landmarks, tuple) else (inputs.landmarks,))
    results = []
    planned = runs(table)
    for number, (chosen, task) in enumerate(planned, 1):
        whole = chosen.change(experiment)
        priors = whole.model.priors
        if not on_demo:
            files = experiment.data.landmarks
            files = (files,) if isinstance(files, (str, Path)) else tuple(files)
            start = dataclasses.replace(experiment, data=dataclasses.replace(
                experiment.data, landmarks=_pick(files, everything, priors)))
        else:
            start = from_base(experiment, DemoInputs.in_folder(data_dir, priors), seed)
        run = experiment_for(start, table, chosen.name, task)
        steps = f"{run.train.steps} step{'' if run.train.steps == 1 else 's'}"
        note(f"run {number}/{len(planned)}: {chosen.name}, trained on {task} ({steps})")
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
            note(f"run {number}/{len(planned)}: {chosen.name}, scored on {scored}: S_re {metrics['s_re']:.1f}  "
                 f"S_ge {metrics['s_ge']:.1f}  S_rege {metrics['s_rege']:.1f}")
            (workdir / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    return write_table(workdir, table, results)
