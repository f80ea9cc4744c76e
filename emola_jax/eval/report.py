"""Scoring a predictions file and writing `metrics.json` + `report.md` with its figures."""

from __future__ import annotations

import json
from pathlib import Path

from emola_jax import atomic
from emola_jax.data.labels import AU_SETS
from emola_jax.eval import scoring
from emola_jax.settings import AuTask, EmotionTask, Protocol, Task, check_choice, choices

EMOTION_TASKS = choices(EmotionTask)
AU_TASKS = choices(AuTask)
TASKS = choices(Task)

# Paper (Tab. 7 and the traditional-dataset tables) and the official repository's own outputs.
PAPER = {
    "emotion": {"EmoLA (paper)": (64.5, 31.7, 96.2), "EmoLA (official outputs)": (63.03, 31.84, None),
                "LLaVA-1.5 fine-tuned (paper)": (62.3, 31.6, 93.9)},
    "au": {"EmoLA (paper)": (60.2, 34.7, 94.9), "EmoLA (official outputs)": (56.12, 35.26, None),
           "LLaVA-1.5 fine-tuned (paper)": (57.1, 34.3, 91.4)},
    "rafdb": {"EmoLA (paper), accuracy": (92.05, None, None)},
    "disfa": {"EmoLA (paper), mean F1": (65.1, None, None)},
    "bp4d": {"EmoLA (paper), mean F1": (64.2, None, None)},
    "gft": {"EmoLA (paper), mean F1": (62.1, None, None)},
}


PREDICTION_FIELDS = ("prediction", "reference", "label")
REPORT_FILES = ("metrics.json", "report.md", "f1_per_au.png", "confusion_matrix.png")  # what write_report writes


def label_parser(task: str):
    """The function that reads a label of `task` (an emotion id or name, or an AU list)."""
    if task in EMOTION_TASKS:
        return scoring.emotion_label
    if task in AU_TASKS:
        return scoring.au_label
    raise ValueError(f"task must be one of {', '.join(TASKS)}, not {task!r}")


def read_prediction_lines(path: str | Path, *, appended: bool = False, task: str | None = None) -> list[dict]:
    """The lines of a predictions file: one JSON object per line with `prediction`, `reference` and
    `label` (and whatever else an evaluation writes, e.g. `id`). Blank lines are skipped; any other
    bad line, or with `task` a label that is not one of that task's, is an error naming it.

    `appended`: the file is one an evaluation appends to as it runs. A missing file then holds
    nothing yet, and a last line without its newline is a write a kill cut short: it is left out."""
    parse = label_parser(task) if task is not None else None
    lines = []
    for number, record in atomic.read_jsonl(path, appended=appended):
        missing = [k for k in PREDICTION_FIELDS if not isinstance(record, dict) or k not in record]
        if missing:
            raise ValueError(f"{path}, line {number}: missing {', '.join(missing)}")
        if not isinstance(record["prediction"], str) or not isinstance(record["reference"], str):
            raise ValueError(f"{path}, line {number}: prediction and reference must be strings")
        if parse is not None:
            try:
                parse(record["label"])
            except ValueError as err:
                raise ValueError(f"{path}, line {number}: {err}") from None
        lines.append(record)
    return lines


def samples(lines: list[dict]) -> list[scoring.Sample]:
    return [scoring.Sample(line["prediction"], line["reference"], line["label"]) for line in lines]


def read_predictions(path: str | Path, task: str | None = None) -> list[scoring.Sample]:
    """The samples of a predictions file, to score (their labels checked for `task` when given); a
    file with none is an error."""
    found = samples(read_prediction_lines(path, task=task))
    if not found:
        raise ValueError(f"{path} holds no predictions")
    return found


def score(samples: list[scoring.Sample], task: str, protocol: str = "official") -> dict:
    check_choice(protocol, Protocol, "protocol")
    if task in EMOTION_TASKS:
        metrics = scoring.score_emotion(samples, protocol)
        metrics["task"] = task
        return metrics
    if task in AU_TASKS:
        return scoring.score_au(samples, protocol, AU_SETS[task], task)
    raise ValueError(f"task must be one of {', '.join(TASKS)}, not {task!r}")


def _fmt(value: float | None) -> str:
    return "" if value is None else f"{value:.2f}"


def write_report(out: str | Path, metrics: dict) -> Path:
    """metrics.json, report.md, and the per-AU F1 chart or the confusion matrix as PNG."""
    out = atomic.make_folder(out)
    atomic.write_text(out / "metrics.json", json.dumps(metrics, indent=2) + "\n")
    task = metrics["task"]
    lines = [
        f"# {task} evaluation ({metrics['num_samples']} samples, protocol `{metrics['protocol']}`)",
        "",
        "| model | S_re | S_ge | S_rege |",
        "|---|---|---|---|",
        f"| this run | {_fmt(metrics['s_re'])} | {_fmt(metrics['s_ge'])} | {_fmt(metrics['s_rege'])} |",
    ]
    lines += [f"| {name} | {_fmt(a)} | {_fmt(b)} | {_fmt(c)} |" for name, (a, b, c) in PAPER.get(task, {}).items()]
    lines += ["", f"Predictions with no recognisable {'emotion' if task in EMOTION_TASKS else 'AU'}: "
              f"{metrics['unrecognised_predictions']}; ROUGE failures (left out of S_ge): {metrics['rouge_failures']}."]
    if metrics["protocol"] == "official":
        lines.append("ROUGE-L as the `rouge` 1.0.1 package computes it (case kept, whitespace tokens), "
                     "as the paper did.")
    else:
        lines.append("ROUGE-L from `rouge-score` (lower-cased, alphanumeric tokens): "
                     "not comparable with the paper's S_ge.")
    if "f1_per_au" in metrics:
        lines += ["", "| AU | F1 |", "|---|---|"]
        lines += [f"| {au} | {f1:.2f} |" for au, f1 in metrics["f1_per_au"].items()]
        if metrics["aus_skipped"]:
            lines.append(f"\nLeft out of the mean (one value in every target and prediction): "
                         f"{', '.join(metrics['aus_skipped'])}.")
        _bar_chart(out / "f1_per_au.png", metrics["f1_per_au"], task)
        lines += ["", "![per-AU F1](f1_per_au.png)"]
    else:
        _confusion_chart(out / "confusion_matrix.png", metrics["confusion_matrix"], metrics["classes"])
        lines += ["", "![confusion matrix](confusion_matrix.png)"]
    atomic.write_text(out / "report.md", "\n".join(lines) + "\n")
    return out / "report.md"


def _pyplot():
    # deferred: start-up time (matplotlib)
    import matplotlib

    matplotlib.use("Agg")
    # deferred: start-up time (matplotlib)
    import matplotlib.pyplot as plt

    return plt


def _bar_chart(path: Path, f1_per_au: dict[str, float], task: str) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(4, 0.6 * len(f1_per_au) + 1), 3.2))
    ax.bar(list(f1_per_au), list(f1_per_au.values()), color="#4c72b0")
    ax.set_ylim(0, 100)
    ax.set_ylabel("F1 (%)")
    ax.set_title(f"{task}: per-AU F1")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _confusion_chart(path: Path, matrix: list[list[int]], classes: list[str]) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.2, 4.6))
    image = ax.imshow(matrix, cmap="Blues")
    ax.set_xticks(range(len(classes)), classes, rotation=45, ha="right")
    ax.set_yticks(range(len(classes)), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("label")
    for i, row in enumerate(matrix):
        for j, count in enumerate(row):
            ax.text(j, i, str(count), ha="center", va="center", fontsize=8)
    fig.colorbar(image, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
