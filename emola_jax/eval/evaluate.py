"""Sharded FABA-Bench evaluation: check the labels, generate for every record, append predictions,
then score against the annotation file's labels and references as they are now.

The batch is laid out over every device of every process (`data` mesh axis); the tokens are
gathered back in input order and process 0 appends them to `predictions.jsonl`, one fsynced
line per record. A rerun reads that file first and continues after the last complete line, so
an evaluation killed half-way loses at most the batch in flight.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import jax
import numpy as np
from jax.experimental import multihost_utils

from emola_jax import atomic
from emola_jax.atomic import make_folder
from emola_jax.checkpoint import PRIOR_RECIPES, load_config, read_source
from emola_jax.data import conversation
from emola_jax.data.labels import AU_QUESTION, EMOTION_QUESTION
from emola_jax.data.landmark_store import read_info
from emola_jax.data.priors import PriorFeatures
from emola_jax.data.records import EvalRecord, read_eval_records
from emola_jax.eval import report, scoring
from emola_jax.generate import GenerationConfig
from emola_jax.predictor import Answer, Predictor
from emola_jax.progress import bar as progress_bar

PREDICTIONS = "predictions.jsonl"
RUN_SETTINGS = "run_settings.json"


def answer_records(predictor: Predictor, features: PriorFeatures, batch: list[EvalRecord]) -> list[Answer]:
    """Answers for the global `batch` (a multiple of the device count); every process calls this
    with the same batch, reads its own share of the rows, and gets every row's answer."""
    share = len(batch) // jax.process_count()
    mine = batch[jax.process_index() * share:(jax.process_index() + 1) * share]
    pixels = np.stack([predictor.pixels(r.image) for r in mine])
    landmarks = np.stack([features.get(r.id, r.landmark) for r in mine]) if predictor.uses_prior else None
    return predictor.answer_split([predictor.prompt_ids(r.question) for r in batch], pixels, landmarks)


def _open(checkpoint: str | Path, landmarks: str | Path | Sequence[str | Path] | None, *, dtype: str,
          generation: GenerationConfig | None) -> tuple[Predictor, PriorFeatures]:
    """The predictor and the records' prior features: the ArrayRecord files `landmarks` (one per
    prior of the model, in its order, each checked against it before the weights load), or each
    record's own `.npy` file (the official layout) without them."""
    config = load_config(checkpoint)
    features = PriorFeatures()
    if config.prior_position != "off":
        features = PriorFeatures.open(landmarks, priors=config.priors)
        _check_recipes(checkpoint, features)
    return Predictor(checkpoint, dtype=dtype, generation=generation, fit_context=False), features


def _check_recipes(checkpoint: str | Path, features: PriorFeatures) -> None:
    """Each feature store was made with the recipe the model's training features were (source.json's
    `prior_recipes`): another recipe gives other numbers for the same face (2d106det's official
    recipe and insightface's differ by far more than a face's expression moves them)."""
    trained = read_source(checkpoint).get(PRIOR_RECIPES, {})
    for table in features.tables:
        wanted, found = trained.get(table.info.prior), table.info.recipe
        if wanted is not None and found is not None and wanted != found:
            raise ValueError(f"{table.source} holds {table.info.prior} features of the {found} recipe, but "
                             f"{checkpoint} was trained on the {wanted} recipe's; compute them with --recipe {wanted} "
                             "(run.py precompute-priors)")


def batches(items: list, size: int) -> Iterator[list]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


def evaluate_model(
    checkpoint: str | Path, annotations: str | Path, task: str, out: str | Path, *,
    images_root: str | Path | None = None, batch_size: int = 8, protocol: str = "official",
    dtype: str = "float32", generation: GenerationConfig | None = None, progress: bool = True,
    official_prompt: bool = True, landmarks: str | Path | Sequence[str | Path] | None = None,
) -> dict:
    """Predictions for every record of `annotations` (resuming), then metrics and report.

    Only process 0 reads and writes `predictions.jsonl`; the others learn how many records are
    done from it. Returns the metrics (on process 0; an empty dict elsewhere).
    """
    records = read_eval_records(annotations, images_root, prompt=prompt_for(task) if official_prompt else None)
    _check_labels(records, task, annotations)  # before any answer is generated
    out = make_folder(out)
    predictions_file = out / PREDICTIONS
    lead = jax.process_index() == 0
    settings = {"checkpoint": str(Path(checkpoint).resolve()), "annotations": str(Path(annotations).resolve()),
                "images_root": str(Path(images_root).resolve()) if images_root is not None else None,
                "landmarks": _stores(landmarks), "dtype": dtype,
                "generation": dataclasses.asdict(generation) if generation else None,
                "official_prompt": official_prompt}
    done_count, refusal = 0, None
    if lead:
        try:
            done_count = _resume_point(predictions_file, out / RUN_SETTINGS, settings, records, annotations)
        except Exception as err:  # whatever stops process 0 must stop the others
            done_count, refusal = -1, err
    if jax.process_count() > 1:  # -1: process 0 refused; the others stop too instead of waiting for it
        done_count = int(multihost_utils.broadcast_one_to_all(np.int32(done_count)))
    if refusal is not None:
        raise refusal
    if done_count < 0:
        raise ValueError(f"process 0 refused to resume {predictions_file}; its error says why")
    todo = records[done_count:]
    if todo:
        predictor, features = _open(checkpoint, landmarks, dtype=dtype, generation=generation)
        # every process takes the same number of rows; the global batch is a multiple of the devices
        global_batch = -(-batch_size // jax.device_count()) * jax.device_count()
        bar = progress_bar(total=len(todo), desc="evaluating", unit="record", enabled=progress and lead)  # one bar
        for batch in batches(todo, global_batch):
            padded = batch + [batch[-1]] * (global_batch - len(batch))  # repeat the last: static shapes
            answers = answer_records(predictor, features, padded)[: len(batch)]
            if lead:
                _append(predictions_file, [_line(r, *a) for r, a in zip(batch, answers, strict=True)])
            bar.update(len(batch))
        bar.close()
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices("emola_jax evaluate: predictions written")
    if not lead:
        return {}
    lines = report.read_prediction_lines(predictions_file, appended=True)
    # the truth is the annotation file's now: a label fixed after the answers were written counts
    samples = [scoring.Sample(line["prediction"], record.reference, record.label)
               for line, record in zip(lines, records, strict=True)]
    metrics = report.score(samples, task, protocol)
    metrics["answers_cut_at_max_new_tokens"] = sum(not line.get("stopped_at_eos", True) for line in lines)
    report.write_report(out, metrics)
    return metrics


def _check_labels(records: list[EvalRecord], task: str, annotations: str | Path) -> None:
    """Every record's label is one of `task`'s, or an error naming the file and the record."""
    parse = report.label_parser(task)
    for record in records:
        try:
            parse(record.label)
        except ValueError as err:
            raise ValueError(f"{annotations}: record {record.id}: {err}") from None


def _stores(landmarks: str | Path | Sequence[str | Path] | None) -> list[dict] | None:
    """What the answers depend on in each prior-feature file: its path, size, and footer (prior,
    recipe, records): a store written again, or another recipe's, is another input."""
    if landmarks is None:
        return None
    paths = [landmarks] if isinstance(landmarks, (str, os.PathLike)) else list(landmarks)
    stores = []
    for path in map(Path, paths):
        info = read_info(path)
        stores.append({"file": str(path.resolve()), "bytes": path.stat().st_size, "prior": info.prior,
                       "recipe": info.recipe, "records": info.count})
    return stores


def _resume_point(predictions: Path, settings_file: Path, settings: dict, records, annotations) -> int:
    """How many records are already done; refuses to mix two runs in one folder: every input an
    answer depends on (`settings`) must be the one the earlier answers were made with."""
    done = report.read_prediction_lines(predictions, appended=True)
    atomic.cut_torn_line(predictions)
    if done and settings_file.exists():
        try:
            saved = json.loads(settings_file.read_text())
        except ValueError as err:
            raise ValueError(f"{settings_file} is torn ({err}); the answers in {predictions} cannot be matched to "
                             "their settings: point --out at a fresh folder") from None
        changed = [f"{key}: {json.dumps(saved.get(key))} there, {json.dumps(value)} here"
                   for key, value in settings.items() if saved.get(key) != value]
        if changed:
            raise ValueError(f"{predictions.parent} holds predictions made with other settings "
                             f"({'; '.join(changed)[:600]}); rerun with those, or point --out at a fresh folder")
    done_ids = [d.get("id") for d in done]
    if done_ids != [r.id for r in records[: len(done_ids)]]:
        raise ValueError(f"{predictions} does not hold predictions for the first records of {annotations}; "
                         "point --out at a fresh folder")
    atomic.write_text(settings_file, json.dumps(settings, indent=2) + "\n")
    return len(done)


def prompt_for(task: str) -> str:
    """The question the official evaluation asks, whatever the record's own question says."""
    return EMOTION_QUESTION if task in report.EMOTION_TASKS else AU_QUESTION


def _line(record: EvalRecord, answer: str, stopped_at_eos: bool) -> dict:
    return {"id": record.id, "prompt": conversation.generation_prompt(record.question), "prediction": answer,
            "reference": record.reference, "label": record.label, "stopped_at_eos": stopped_at_eos}


def _append(path: Path, lines: list[dict]) -> None:
    with open(path, "a") as f:
        f.write("".join(json.dumps(line) + "\n" for line in lines))
        f.flush()
        os.fsync(f.fileno())
