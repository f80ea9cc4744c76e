"""grain input pipeline for training and evaluation: `Batch`es of this process's rows.

A batch's length is the smallest length bucket that holds its longest row (`max_length` is always
the last bucket). Two sources: an annotation JSON + images + landmark ArrayRecord (tokenised and
checked up front, so bad records are counted before training starts), or the ArrayRecord shards
of a built tfds dataset (checked as they are read). The global order follows from the seed alone
and each process reads its own rows of every global batch (`ProcessRows`), so any process count
sees the same batches; `iter(loader).get_state()` / `set_state()` resume at the same example.
Inside grain a batch is a dict of arrays, what its workers pass on; it becomes a `Batch` as it
leaves the loader.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import logging
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import grain
import numpy as np
from absl import flags
from flax import struct

from emola_jax.config import EmolaConfig, check_ranges
from emola_jax.data import conversation, image
from emola_jax.data.conversation import IGNORE_INDEX, BadRecord
from emola_jax.data.priors import PriorFeatures
from emola_jax.data.records import read_annotation_list

log = logging.getLogger(__name__)


@struct.dataclass
class Batch:
    """Right-padded rows of examples: what the loaders give and the train step takes (a pytree).

        input_ids       int32   [B, L]  image placeholder expanded to `image_seq_length` image-token ids
        labels          int32   [B, L]  aligned with input_ids (not shifted); -100 except answers + </s>
        attention_mask  int32   [B, L]  1 real, 0 padding (right padding)
        pixel_values    float32 [B, S, S, 3]  CLIP-normalised, channels-last, S = vision.image_size;
                                        None: rows without an image (and without placeholders)
        landmarks       float32 [B, P]  P = model prior_dim: the priors' features concatenated in
                                        config order; None: a model without prior tokens
        ids             str     [B]     the records' ids, or None; host-only: which examples made a step

    `B` is the loader's rows (`batch_size // process_count`), `L` the batch's length bucket; a
    training step takes micro-batches stacked `[accum, B, ...]`. A None field is an empty subtree,
    so `jax.tree.map` reaches just the arrays.
    """

    input_ids: np.ndarray
    labels: np.ndarray
    attention_mask: np.ndarray
    pixel_values: np.ndarray | None = None
    landmarks: np.ndarray | None = None
    ids: np.ndarray | None = None


@dataclasses.dataclass(frozen=True)
class PipelineConfig:
    """Where the examples come from and how they are batched.

    Give `annotations` (one path or several; image and `.npy` paths relative to `images_root`,
    default each file's folder) or `tfds_dir` (a built dataset version folder) with `split`
    (tfds split expression, e.g. "fold2+fold3"). `landmarks` is the ArrayRecord file from
    `precompute-priors`, or several, one per prior of the model in its order (each file's footer
    must name that prior and width); None reads each record's official `.npy` (annotations) or the
    stored vector (tfds), 2d106det features for a model with that prior alone. `truncate=False`
    makes a sample longer than `max_length` a bad record;
    `truncate=True` cuts it as LLaVA's collator does (never into the image tokens).
    """

    annotations: str | tuple[str, ...] = ()
    images_root: str | None = None
    landmarks: str | tuple[str, ...] | None = None
    tfds_dir: str | None = None
    split: str = "train"
    max_length: int = 2048
    truncate: bool = False
    pad_to_square: bool = True
    length_buckets: tuple[int, ...] = (768, 1024, 1280, 1536, 2048)
    batch_size: int = 64
    seed: int = 0
    shuffle: bool = True
    num_epochs: int | None = None
    worker_count: int = 2
    worker_buffer_size: int = 2
    read_threads: int = 1  # threads making batches in each worker (or here, without workers)
    on_bad_record: Literal["error", "skip"] = "error"

    def __post_init__(self):
        paths = (self.annotations,) if isinstance(self.annotations, (str, Path)) else tuple(self.annotations)
        object.__setattr__(self, "annotations", tuple(str(p) for p in paths))
        if isinstance(self.landmarks, (list, tuple)):  # several files: one per prior
            object.__setattr__(self, "landmarks", tuple(str(p) for p in self.landmarks) or None)
        elif isinstance(self.landmarks, Path):
            object.__setattr__(self, "landmarks", str(self.landmarks))
        object.__setattr__(self, "length_buckets", tuple(int(b) for b in self.length_buckets))
        if bool(self.annotations) == bool(self.tfds_dir):
            raise ValueError("give either annotations (JSON files) or tfds_dir (a built tfds dataset), not both")
        if self.on_bad_record not in ("error", "skip"):
            raise ValueError(f"on_bad_record must be 'error' or 'skip', not {self.on_bad_record!r}")
        check_ranges(self, positive=("max_length", "batch_size", "read_threads", "worker_buffer_size"),
                     at_least_zero=("worker_count", "seed"))
        if min(self.length_buckets, default=1) < 1:
            raise ValueError(f"length_buckets must all be at least 1, not {self.length_buckets}")
        if self.num_epochs is not None and self.num_epochs < 1:
            raise ValueError("num_epochs must be positive, or None for an endless stream")

    @property
    def landmark_files(self) -> tuple[str, ...]:
        """`landmarks` as a tuple of paths (empty: none given)."""
        if self.landmarks is None:
            return ()
        return (self.landmarks,) if isinstance(self.landmarks, str) else self.landmarks

    @property
    def buckets(self) -> tuple[int, ...]:
        """The bucket lengths in use: those below max_length, then max_length."""
        return tuple(sorted({b for b in self.length_buckets if b < self.max_length})) + (self.max_length,)


@dataclasses.dataclass
class BadRecords:
    """Records left out (on_bad_record='skip'), with the reason for each."""

    items: list[tuple[str, str]] = dataclasses.field(default_factory=list)

    def __len__(self) -> int:
        return len(self.items)


class _Encoding:
    __slots__ = ("input_ids",)

    def __init__(self, input_ids: list[int]):
        self.input_ids = input_ids


class MemoTokenizer:
    """A tokenizer whose recent texts are remembered. Every record repeats the system prompt and
    most repeat their question, so this saves about two thirds of the tokenizer calls that LLaVA's
    per-round label masking makes. Other attributes come from the wrapped tokenizer."""

    def __init__(self, tokenizer, size: int = 4096):
        self.tokenizer, self.size, self.cache = tokenizer, size, {}
        self.lock = threading.Lock()  # grain may make examples on several threads

    def __call__(self, text: str) -> _Encoding:
        with self.lock:
            ids = self.cache.pop(text, None)  # re-inserted below: the dict's order is least recently used first
        if ids is None:
            ids = tuple(self.tokenizer(text).input_ids)
        with self.lock:
            if text not in self.cache and len(self.cache) >= self.size:
                self.cache.pop(next(iter(self.cache)))
            self.cache[text] = ids
        return _Encoding(list(ids))

    def __getattr__(self, name: str):
        if name in ("tokenizer", "size", "cache", "lock"):  # not set yet (unpickling)
            raise AttributeError(name)
        return getattr(self.tokenizer, name)

    def __getstate__(self) -> dict:
        return {"tokenizer": self.tokenizer, "size": self.size, "cache": {}}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state, lock=threading.Lock())


# --- the annotation-file source ------------------------------------------------------------------

class AnnotationSource:
    """Records of annotation files, tokenised and checked up front; images are read by the workers.

    Holds the token ids with a single image placeholder (the expansion happens per example), so
    what is pickled into each worker stays small.
    """

    def __init__(self, config: PipelineConfig, tokenizer, model_config: EmolaConfig):
        self.bad = BadRecords()
        self.files = config.annotations
        needs_prior = model_config.prior_position != "off"
        prior = PriorFeatures.open(config.landmark_files, BadRecord, model_config.priors) if needs_prior else None
        self.ids: list[str] = []
        self.images: list[str] = []
        self.tokens: list[np.ndarray] = []
        self.labels: list[np.ndarray] = []
        features: list[np.ndarray] = []
        seen: set[str] = set()
        tokenizer = MemoTokenizer(tokenizer)
        for annotation in config.annotations:
            root = Path(config.images_root) if config.images_root else Path(annotation).parent
            for rid, record in _read_annotation(annotation):
                try:
                    if rid in seen:
                        raise BadRecord(f"record {rid} appears twice in {', '.join(config.annotations)}")
                    seen.add(rid)
                    path = _image_path(rid, record, root)
                    feature = (prior.get(rid, record.get("landmark"), root) if needs_prior
                               else np.zeros(model_config.prior_dim, np.float32))
                    turns = conversation.conversation_turns(rid, record.get("conversations"))
                    ids, labels = conversation.training_ids(tokenizer, rid, turns, model_config.image_token_id, 1)
                    _check_length(rid, ids, model_config, config)
                except BadRecord as err:
                    if config.on_bad_record == "error":
                        raise
                    self.bad.items.append((rid, str(err)))
                    continue
                self.ids.append(rid)
                self.images.append(str(path))
                self.tokens.append(ids)
                self.labels.append(labels)
                features.append(feature)
        self.landmarks = np.stack(features) if features else np.zeros((0, model_config.prior_dim), np.float32)
        if self.bad:
            log.warning("%d of %d records left out: %s", len(self.bad), len(self.bad) + len(self.ids),
                        "; ".join(reason for _, reason in self.bad.items[:3]) + ("; ..." if len(self.bad) > 3 else ""))
        if not self.ids:
            raise ValueError(f"no usable records in {', '.join(config.annotations)}")

    def __len__(self) -> int:
        return len(self.ids)

    def __repr__(self) -> str:
        """Stable across processes and restarts: grain compares it when a saved state is restored."""
        digest = hashlib.sha256("\n".join(self.ids).encode("utf-8")).hexdigest()[:16]
        return f"AnnotationSource(files={list(self.files)}, records={len(self.ids)}, ids_sha256={digest})"

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {"id": self.ids[index], "image_path": self.images[index], "tokens": self.tokens[index],
                "token_labels": self.labels[index], "landmarks": self.landmarks[index]}


def _read_annotation(path: str) -> list[tuple[str, dict]]:
    out = []
    for index, record in enumerate(read_annotation_list(path)):
        if not isinstance(record, dict):
            record = {"_not_a_record": record}
        out.append((str(record.get("id", f"{path}#{index}")), record))
    return out


def _image_path(rid: str, record: dict, root: Path) -> Path:
    if not isinstance(record.get("image"), str):
        raise BadRecord(f"record {rid} has no image path")
    path = root / record["image"]
    if not path.is_file():
        raise BadRecord(f"record {rid}: image {path} does not exist")
    return path


def _check_length(rid: str, ids: np.ndarray, model_config: EmolaConfig, config: PipelineConfig) -> None:
    """Over-long samples are bad records unless truncating, and truncation never cuts the image."""
    length = len(ids) - 1 + model_config.image_seq_length
    if length <= config.max_length:
        return
    if not config.truncate:
        raise BadRecord(f"record {rid} is {length} tokens long, over max_length {config.max_length}")
    image_end = int(np.flatnonzero(ids == model_config.image_token_id)[0]) + model_config.image_seq_length
    if image_end > config.max_length:
        raise BadRecord(f"record {rid}: cutting it to max_length {config.max_length} would cut its image tokens")


# --- per-example work (runs in the worker processes) ------------------------------------------------

class _MakeExample:
    """Record -> one example (or, on_bad_record='skip', a `_bad` marker that becomes a padding row)."""

    def __init__(self, config: PipelineConfig, model_config: EmolaConfig, tokenizer=None,
                 prior: PriorFeatures | None = None):
        self.config, self.prior = config, prior or PriorFeatures(error=BadRecord)
        self.tokenizer = MemoTokenizer(tokenizer) if tokenizer is not None else None
        self.image_token_id = model_config.image_token_id
        self.image_tokens = model_config.image_seq_length
        self.image_size = model_config.vision.image_size
        self.model_config = model_config

    def map(self, record: dict) -> dict:
        rid = record["id"] if isinstance(record["id"], str) else record["id"].decode("utf-8")
        try:
            if "tokens" in record:  # annotation source: tokenised and checked already
                tokens, token_labels, landmarks = record["tokens"], record["token_labels"], record["landmarks"]
                source = record["image_path"]
            else:
                tokens, token_labels, landmarks = self._from_tfds(rid, record)
                source = io.BytesIO(record["image"])
            pixels = self._pixels(rid, source)
        except BadRecord as err:
            if self.config.on_bad_record == "error":
                raise
            return {"id": rid, "_bad": str(err)}
        ids, labels = _expand(tokens, token_labels, self.image_token_id, self.image_tokens)
        if len(ids) > self.config.max_length:  # only with truncate=True: the check above allowed it
            ids, labels = ids[:self.config.max_length], labels[:self.config.max_length]
        return {"id": rid, "input_ids": ids, "labels": labels, "pixel_values": pixels,
                "landmarks": np.asarray(landmarks, np.float32)}

    def _from_tfds(self, rid: str, record: dict):
        turns = record["conversations"]
        texts = [{"from": _text(f), "value": _text(v)} for f, v in zip(turns["from"], turns["value"], strict=True)]
        turns = conversation.conversation_turns(rid, texts)
        tokens, labels = conversation.training_ids(self.tokenizer, rid, turns, self.image_token_id, 1)
        _check_length(rid, tokens, self.model_config, self.config)
        if self.model_config.prior_position == "off":
            landmarks = np.zeros(self.model_config.prior_dim, np.float32)
        else:  # landmark files given now replace the feature stored at build time (2d106det's)
            landmarks = self.prior.get(rid, optional=True)
            if landmarks is None:
                if not bool(record["has_landmarks"]):
                    raise BadRecord(f"record {rid} was built without a landmark feature")
                landmarks = record["landmarks"]
        return tokens, labels, landmarks

    def _pixels(self, rid: str, source) -> np.ndarray:
        try:
            picture = image.load_image(source)
        except ValueError as err:
            raise BadRecord(f"record {rid}: {err}") from None
        return image.clip_preprocess(picture, self.image_size, pad=self.config.pad_to_square)


def _text(value) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def _expand(tokens: np.ndarray, labels: np.ndarray, image_token_id: int, count: int) -> tuple[np.ndarray, np.ndarray]:
    position = int(np.flatnonzero(tokens == image_token_id)[0])
    ids = np.concatenate([tokens[:position], np.full(count, image_token_id, np.int32), tokens[position + 1:]])
    out = np.concatenate([labels[:position], np.full(count, IGNORE_INDEX, np.int32), labels[position + 1:]])
    return ids.astype(np.int32), out.astype(np.int32)


class _GrainMap(grain.transforms.Map):
    def __init__(self, inner: _MakeExample):
        self.inner = inner

    def map(self, element):
        return self.inner.map(element)


class _Collate:
    """Right-pads a list of examples to the batch's length bucket: a `Batch`'s fields, as a dict.

    A bad record's marker (on_bad_record='skip', found while reading) becomes an all-padding row:
    nothing of it is seen or scored, and every process keeps the same rows of every global batch."""

    def __init__(self, buckets: tuple[int, ...], pad_id: int, image_size: int, prior_dim: int):
        self.buckets, self.pad_id, self.image_size, self.prior_dim = buckets, pad_id, image_size, prior_dim

    def __call__(self, examples: Sequence[dict]) -> dict[str, np.ndarray]:
        good = [e for e in examples if "_bad" not in e]
        for example in examples:
            if "_bad" in example:
                log.warning("skipping a bad record: %s", example["_bad"])
        longest = max((len(e["input_ids"]) for e in good), default=1)
        length = next(b for b in self.buckets if b >= longest)
        rows = len(examples)
        input_ids = np.full((rows, length), self.pad_id, np.int32)
        labels = np.full((rows, length), IGNORE_INDEX, np.int32)
        mask = np.zeros((rows, length), np.int32)
        pixels = np.zeros((rows, self.image_size, self.image_size, 3), np.float32)
        landmarks = np.zeros((rows, self.prior_dim), np.float32)
        for i, example in enumerate(examples):
            if "_bad" in example:
                continue
            n = len(example["input_ids"])
            input_ids[i, :n], labels[i, :n], mask[i, :n] = example["input_ids"], example["labels"], 1
            pixels[i], landmarks[i] = example["pixel_values"], example["landmarks"]
        return {"input_ids": input_ids, "labels": labels, "attention_mask": mask, "pixel_values": pixels,
                "landmarks": landmarks, "ids": np.asarray([e["id"] for e in examples], dtype=str)}


# --- loaders --------------------------------------------------------------------------------------

def make_source(config: PipelineConfig, tokenizer, model_config: EmolaConfig):
    """The random-access source: an `AnnotationSource`, or the tfds dataset's ArrayRecord shards."""
    if config.annotations:
        return AnnotationSource(config, tokenizer, model_config)
    # deferred: start-up time (tensorflow_datasets)
    import tensorflow_datasets as tfds

    return tfds.builder_from_directory(config.tfds_dir).as_data_source(split=config.split)


class ProcessRows(grain.MapDataset):
    """Process `index`'s rows of every global batch of `parent`, in order.

    Global batch `g` is positions `[g * rows * count, (g + 1) * rows * count)` of the parent
    stream; process `index` takes the `index`-th block of `rows` in each. So the global order of
    examples, and with it every loss, is the same for any process count. `drop_remainder` drops
    a last, incomplete global batch; otherwise each process takes what it can of it.
    """

    def __init__(self, parent: grain.MapDataset, rows: int, index: int, count: int, *, drop_remainder: bool):
        super().__init__(parent)
        self._rows, self._index, self._count = rows, index, count
        full, rest = divmod(len(parent), rows * count)
        self._length = full * rows + (0 if drop_remainder else min(max(rest - index * rows, 0), rows))

    def __len__(self) -> int:
        return self._length

    def __getitem__(self, position):
        if isinstance(position, slice):
            return self.slice(position)
        block, offset = divmod(position, self._rows)
        return self._parent[(block * self._count + self._index) * self._rows + offset]

    def __str__(self) -> str:
        return f"ProcessRows(rows={self._rows}, process={self._index} of {self._count})"


def make_loader(config: PipelineConfig, tokenizer, model_config: EmolaConfig, process_index: int = 0,
                process_count: int = 1, *, training: bool = True, source=None) -> grain.IterDataset:
    """This process's `Batch`es as a grain `IterDataset`; `iter()` of it has `get_state()` /
    `set_state()` (this process's position: save one per process).

    The global stream is the records shuffled per epoch (`seed`, `seed + 1`, ... as grain's
    `shuffle().repeat()` does), cut into global batches of `batch_size`; each process reads its
    own block of every batch (`ProcessRows`), so the global order does not depend on the process
    count. Batches are made by `worker_count` worker processes (each makes whole batches) and come
    back in order.
    `training=False`: one pass in record order, the last (partial) batch kept, so processes may
    get different numbers of batches (every one a full share of its global batch but the last)."""
    if config.batch_size % process_count:
        raise ValueError(f"batch_size {config.batch_size} is not a multiple of the {process_count} processes")
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} is outside 0..{process_count - 1}")
    source = source if source is not None else make_source(config, tokenizer, model_config)
    rows = config.batch_size // process_count
    prior = (PriorFeatures.open(config.landmark_files, BadRecord, model_config.priors)
             if config.tfds_dir and model_config.prior_position != "off" else None)
    stream = grain.MapDataset.source(source)
    if training and config.shuffle:
        stream = stream.shuffle(seed=config.seed)
    stream = stream.repeat(config.num_epochs if training else 1)
    collate = _Collate(config.buckets, conversation.pad_token_id(tokenizer), model_config.vision.image_size,
                       model_config.prior_dim)
    make = _MakeExample(config, model_config, tokenizer=tokenizer if config.tfds_dir else None, prior=prior)
    # batched before the workers: each worker makes whole batches, which come back in order
    batches = ProcessRows(stream, rows, process_index, process_count, drop_remainder=training).map(
        _GrainMap(make)).batch(rows, drop_remainder=training, batch_fn=collate)
    batches = batches.to_iter_dataset(grain.ReadOptions(num_threads=config.read_threads, prefetch_buffer_size=2))
    if config.worker_count:
        if not flags.FLAGS.is_parsed():  # grain's worker processes read absl flags; outside absl.app none are parsed
            flags.FLAGS.mark_as_parsed()
        batches = batches.mp_prefetch(grain.MultiprocessingOptions(
            num_workers=config.worker_count, per_worker_buffer_size=config.worker_buffer_size))
    return batches.map(lambda columns: Batch(**columns))  # after the workers: grain moves dicts


def make_train_loader(config: PipelineConfig, tokenizer, model_config: EmolaConfig, process_index: int = 0,
                      process_count: int = 1, *, source=None):
    """Shuffled (per seed), `num_epochs` passes (None: endless), full batches only."""
    return make_loader(config, tokenizer, model_config, process_index, process_count, training=True, source=source)


def make_eval_loader(config: PipelineConfig, tokenizer, model_config: EmolaConfig, process_index: int = 0,
                     process_count: int = 1, *, source=None):
    """One pass in record order; the last batch may be short."""
    return make_loader(config, tokenizer, model_config, process_index, process_count, training=False, source=source)
