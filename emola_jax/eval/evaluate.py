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
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from tqdm import tqdm

from emola_jax import atomic
from emola_jax.atomic import make_folder
from emola_jax.checkpoint import PRIOR_RECIPES, load_config, load_pretrained, load_tokenizer, read_source
from emola_jax.data import conversation, image
from emola_jax.data.labels import AU_QUESTION, EMOTION_QUESTION
from emola_jax.data.landmark_store import read_info
from emola_jax.data.prior import PriorFeatures
from emola_jax.data.records import EvalRecord, read_eval_records
from emola_jax.eval import report, scoring
from emola_jax.generate import GenerationConfig, generate
from emola_jax.lora import merge_lora

PREDICTIONS = "predictions.jsonl"
RUN_SETTINGS = "run_settings.json"


def bucket(length: int, multiple: int = 64) -> int:
    """Prompt lengths are rounded up to a multiple: one compile per bucket, not per batch."""
    return -(-length // multiple) * multiple


def left_pad(rows: list[np.ndarray], pad_id: int, length: int) -> tuple[np.ndarray, np.ndarray]:
    ids = np.full((len(rows), length), pad_id, np.int32)
    mask = np.zeros((len(rows), length), np.int32)
    for i, row in enumerate(rows):
        ids[i, length - len(row):] = row
        mask[i, length - len(row):] = 1
    return ids, mask


class Evaluator:
    """Holds the model, tokenizer and mesh; `predict` turns records into answers."""

    def __init__(self, checkpoint: str | Path, *, dtype: str = "float32", generation: GenerationConfig | None = None,
                 landmarks: str | Path | Sequence[str | Path] | None = None, records: bool = True,
                 fit_context: bool = False):
        """`landmarks`: ArrayRecord files of prior features by record id (`precompute-priors`), one
        per prior of the model, in its order (each checked against it before the weights load);
        without them, each record's own `.npy` file (the official layout) is read. `records=False`:
        no record is read (`answer`, `answer_batch`: the caller gives each image's feature).
        `fit_context`: `generation.max_new_tokens` is a ceiling, lowered by `check_room` to the
        positions the context leaves after a prompt (as transformers' `generate` stops at the
        model's length), instead of a refusal."""
        self.fit_context = fit_context
        config = load_config(checkpoint)
        if records and config.prior_position != "off":
            self.prior = PriorFeatures.open(landmarks, priors=config.priors)
            _check_recipes(checkpoint, self.prior)
        elif landmarks is not None:
            raise ValueError("feature files go with records (evaluate); this evaluator is given each image's feature")
        else:
            self.prior = PriorFeatures()
        # devices grouped by process, so that process p's rows are the p-th slice of the batch
        devices = sorted(jax.devices(), key=lambda d: (d.process_index, d.id))
        self.mesh = Mesh(np.asarray(devices), ("data",))
        replicated = NamedSharding(self.mesh, PartitionSpec())  # weights on every device, the batch split
        model, self.config = load_pretrained(checkpoint, dtype=dtype, sharding=replicated)
        # LoRA folded into the kernels once, as LLaVA's loader does before inference (merge_and_unload):
        # each decode step then reads every projection once, without the adapter's two extra matmuls.
        self.model = merge_lora(model)
        self.tokenizer = load_tokenizer(checkpoint)
        self.generation = generation or GenerationConfig(eos_token_id=self.tokenizer.eos_token_id,
                                                         pad_token_id=conversation.pad_token_id(self.tokenizer))
        self.key = jax.random.key(0)

    def tokens(self, question: str) -> np.ndarray:
        prompt = conversation.generation_prompt(question)
        return conversation.tokenize_with_image(
            self.tokenizer, prompt, self.config.image_token_id, self.config.image_seq_length
        )

    def inputs(self, records: list[EvalRecord], length: int):
        """Left-padded ids, pixels, mask and landmarks for `records`."""
        size = self.config.vision.image_size
        ids, mask = left_pad([self.tokens(r.question) for r in records], self.generation.pad_token_id, length)
        pixels = np.stack([image.clip_preprocess(image.load_image(r.image), size) for r in records])
        landmarks = (
            np.stack([self.prior.get(r.id, r.landmark) for r in records])
            if self.config.prior_position != "off" else None
        )
        return ids, pixels, mask, landmarks

    def predict(self, batch: list[EvalRecord]) -> list[tuple[str, bool]]:
        """Answers for the global `batch` (a multiple of the device count); every process calls
        this with the same batch and feeds its own share of the rows."""
        per_process = len(batch) // jax.process_count()
        mine = batch[jax.process_index() * per_process:(jax.process_index() + 1) * per_process]
        length = bucket(max(len(self.tokens(r.question)) for r in batch))  # the same on every process
        ids, pixels, mask, landmarks = self.inputs(mine, length)
        sharding = NamedSharding(self.mesh, PartitionSpec("data"))
        place = lambda x: None if x is None else jax.make_array_from_process_local_data(sharding, x)  # noqa: E731
        self.key, key = jax.random.split(self.key)
        with jax.set_mesh(self.mesh):  # kernels under shard_map (splash attention) read the mesh here
            tokens = generate(self.model, place(ids), place(pixels), place(mask), place(landmarks), key,
                              self.generation)
        tokens = np.asarray(multihost_utils.process_allgather(tokens, tiled=True))
        return [self.decode_with_stop(row) for row in tokens]

    def answer(self, image_path: str | Path, question: str, landmarks: np.ndarray | None) -> str:
        """One answer, for `run.py generate`."""
        if self.config.prior_position != "off" and landmarks is None:
            raise ValueError("this model uses a facial prior token: give --landmarks FILE.npy or --onnx MODEL.onnx")
        if landmarks is not None and np.size(landmarks) != self.config.prior_dim:
            raise ValueError(f"the prior feature has {np.size(landmarks)} values; this model's priors "
                             f"({', '.join(p.name for p in self.config.priors)}) take {self.config.prior_dim}")
        if landmarks is not None and not np.isfinite(landmarks).all():
            raise ValueError(f"the prior feature holds {int((~np.isfinite(landmarks)).sum())} values that are NaN or "
                             "infinite; a landmark feature is finite")
        pixels = image.clip_preprocess(image.load_image(image_path), self.config.vision.image_size)[None]
        landmarks = None if self.config.prior_position == "off" else np.asarray(landmarks, np.float32).reshape(1, -1)
        return self.answer_batch(question, pixels, landmarks)[0][0]

    def check_room(self, question: str) -> np.ndarray:
        """The prompt's token ids; ValueError when the prompt and `max_new_tokens` exceed the context
        (with `fit_context`, `max_new_tokens` is lowered to the room left, while there is any: call
        it for every question first, so that they share the smallest and one compile)."""
        row = self.tokens(question)
        context = self.config.text.max_position_embeddings
        room = context - len(row)
        if self.fit_context and 1 <= room < self.generation.max_new_tokens:
            self.generation = dataclasses.replace(self.generation, max_new_tokens=room)
        if len(row) + self.generation.max_new_tokens > context:
            raise ValueError(f"the prompt is {len(row)} tokens (with the image's {self.config.image_seq_length}); with "
                             f"--max-new-tokens {self.generation.max_new_tokens} that exceeds the model's context of "
                             f"{context} positions")
        return row

    def answer_batch(self, question: str, pixels: np.ndarray, landmarks: np.ndarray | None,
                     rows: int | None = None) -> list[tuple[str, bool]]:
        """The answer to `question` about each of `n` images, and whether it ended with EOS.

        `pixels` `[n, size, size, 3]` as `image.clip_preprocess` gives them; `landmarks`
        `[n, prior_dim]` (None for a model without a prior token). `rows` pads the batch with
        copies of its first image up to that many rows, so that batches of up to `rows` images
        share one compile. Every process computes the same answers."""
        row = self.check_room(question)
        count = len(pixels)
        if rows is not None and rows < count:
            raise ValueError(f"{count} images do not fit a batch of {rows} rows")
        fill = lambda x: None if x is None else np.concatenate([x, np.repeat(x[:1], (rows or count) - count, 0)])
        ids, mask = left_pad([row] * (rows or count), self.generation.pad_token_id, bucket(len(row)))
        replicated = NamedSharding(self.mesh, PartitionSpec())
        ids, pixels, mask, landmarks = jax.device_put((ids, fill(pixels), mask, fill(landmarks)), replicated)
        self.key, key = jax.random.split(self.key)
        with jax.set_mesh(self.mesh):
            tokens = np.asarray(generate(self.model, ids, pixels, mask, landmarks, key, self.generation))
        return [self.decode_with_stop(tokens_row) for tokens_row in tokens[:count]]

    def decode_with_stop(self, row: np.ndarray) -> tuple[str, bool]:
        """The answer text, and whether it ended with EOS (False: cut at max_new_tokens)."""
        stop = np.flatnonzero(row == self.generation.eos_token_id)
        row = row[: stop[0]] if stop.size else row
        return self.tokenizer.decode(row.tolist(), skip_special_tokens=True).strip(), bool(stop.size)


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
    evaluator = Evaluator(checkpoint, dtype=dtype, generation=generation, landmarks=landmarks) if todo else None
    if evaluator is not None:
        # every process takes the same number of rows; the global batch is a multiple of the devices
        global_batch = -(-batch_size // jax.device_count()) * jax.device_count()
        bar = tqdm(total=len(todo), desc="evaluating", unit="record", disable=not (progress and lead))  # one bar
        for batch in batches(todo, global_batch):
            padded = batch + [batch[-1]] * (global_batch - len(batch))  # repeat the last: static shapes
            answers = evaluator.predict(padded)[: len(batch)]
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
