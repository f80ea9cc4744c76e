"""`Batch`es made from a seed, as the pipeline makes them: for tests, benchmarks and memory plans.

Each batch is a pure function of `(seed, index)`, so any process can make its own rows of any
batch, and the iterator's whole state is the next index.
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np

from emola_jax.config import EmolaConfig, check_ranges
from emola_jax.data.conversation import IGNORE_INDEX
from emola_jax.data.pipeline import Batch


@dataclasses.dataclass(frozen=True)
class SyntheticData:
    batch_size: int = 8  # global, per micro-batch
    seq_length: int = 128
    answer_fraction: float = 0.25  # scored tokens at the end of each row
    seed: int = 0

    def __post_init__(self):
        check_ranges(self, positive=("batch_size", "seq_length"), fraction=("answer_fraction",),
                     at_least_zero=("seed",))


def make_batch(config: SyntheticData, model: EmolaConfig, index: int) -> Batch:
    """One global batch: an image's placeholders after a BOS, random text, the last part scored."""
    rng = np.random.default_rng([config.seed, index])
    batch, seq = config.batch_size, config.seq_length
    image_tokens = model.image_seq_length
    if seq < image_tokens + 4:
        raise ValueError(f"seq_length {seq} is too short for {image_tokens} image tokens")
    vocab = min(model.text.vocab_size, model.image_token_id if model.image_token_id > 0 else model.text.vocab_size)
    ids = rng.integers(2, vocab, size=(batch, seq), dtype=np.int32)
    ids[:, 0] = 1
    ids[:, 1:1 + image_tokens] = model.image_token_id
    # right padding of up to a quarter, never into the image's placeholders
    lengths = rng.integers(max(seq * 3 // 4, image_tokens + 2), seq + 1, size=batch)
    mask = (np.arange(seq)[None, :] < lengths[:, None]).astype(np.int32)
    labels = np.where(mask.astype(bool), ids, IGNORE_INDEX).astype(np.int32)
    answer_start = (lengths * (1 - config.answer_fraction)).astype(int)
    labels[np.arange(seq)[None, :] < answer_start[:, None]] = IGNORE_INDEX
    size = model.vision.image_size
    return Batch(
        input_ids=np.where(mask.astype(bool), ids, 0).astype(np.int32),
        labels=labels,
        attention_mask=mask,
        pixel_values=rng.standard_normal((batch, size, size, 3), dtype=np.float32),
        landmarks=rng.random((batch, model.prior_dim), dtype=np.float32),
    )


class SyntheticLoader:
    """An endless iterator over this process's rows of the synthetic batches, checkpointable."""

    def __init__(self, config: SyntheticData, model: EmolaConfig, process_index: int = 0, process_count: int = 1):
        if config.batch_size % process_count:
            raise ValueError(f"batch_size {config.batch_size} does not split over {process_count} processes")
        self.config, self.model = config, model
        rows = config.batch_size // process_count
        self.rows = slice(process_index * rows, (process_index + 1) * rows)
        self.index = 0

    def __iter__(self):
        return self

    def __next__(self) -> Batch:
        batch = make_batch(self.config, self.model, self.index)
        self.index += 1
        return jax.tree.map(lambda x: x[self.rows], batch)

    def get_state(self) -> dict:
        return {"index": self.index}

    def set_state(self, state: dict) -> None:
        self.index = int(state["index"])
