"""The inference engine: a checkpoint loaded once, placed on every device, answering questions about
images in batches. Evaluation, `run.py generate`, photo analysis and the ablations all answer
through a `Predictor`; it knows nothing of records, files of answers or faces.

The weights are replicated over a `data` mesh of every device of every process (`sharding.make_mesh`)
with LoRA folded in once, as LLaVA's loader does before inference (`merge_and_unload`): each decode
step then reads every projection once, without the adapter's two extra matmuls. A batch is either
the same on every process (`answer_batch`) or split over processes by rows (`answer_split`).
Prompt lengths are rounded up to a bucket, so that a handful of shapes compile, not one per batch.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path

import jax
import numpy as np
from jax.experimental import multihost_utils
from PIL import Image

from emola_jax.checkpoint import load_pretrained, load_tokenizer
from emola_jax.data import conversation, image
from emola_jax.data.priors import open_extractors
from emola_jax.generate import GenerationConfig, generate, generate_shared
from emola_jax.lora import merge_lora
from emola_jax.sharding import MeshConfig, batch_sharding, make_mesh, slice_count

Answer = tuple[str, bool]  # the text, and whether it ended with EOS (False: cut at max_new_tokens)


def bucket(length: int, multiple: int = 64) -> int:
    """Prompt lengths are rounded up to a multiple: one compile per bucket, not per batch."""
    return -(-length // multiple) * multiple


def left_pad(rows: Sequence[np.ndarray], pad_id: int, length: int) -> tuple[np.ndarray, np.ndarray]:
    """`(ids, mask)`, each `[len(rows), length]` int32, every row's tokens at the right end."""
    ids = np.full((len(rows), length), pad_id, np.int32)
    mask = np.zeros((len(rows), length), np.int32)
    for i, row in enumerate(rows):
        ids[i, length - len(row):] = row
        mask[i, length - len(row):] = 1
    return ids, mask


def _fill(x: np.ndarray | None, rows: int | None) -> np.ndarray | None:
    """`x` `[n, ...]` padded with copies of its first row up to `rows` (None: as it is)."""
    if x is None or rows is None:
        return x
    if rows < len(x):
        raise ValueError(f"{len(x)} images do not fit a batch of {rows} rows")
    return np.concatenate([x, np.repeat(x[:1], rows - len(x), 0)])


def _common_prefix(prompts: Sequence[np.ndarray]) -> int:
    """How many leading tokens every prompt shares, leaving each at least its last token."""
    shortest = min(len(p) for p in prompts) - 1
    differs = np.flatnonzero([len({int(p[i]) for p in prompts}) > 1 for i in range(shortest)])
    return int(differs[0]) if differs.size else shortest


class Predictor:
    """Holds the model, its tokenizer, the decoding settings and the mesh.

    `generation`: the decoding settings (default: greedy, up to 512 new tokens, the tokenizer's EOS
    and padding). `fit_context`: `generation.max_new_tokens` is a ceiling, lowered by `check_room`
    to the positions the context leaves after a prompt (as transformers' `generate` stops at the
    model's length); False: a prompt that leaves too little room is refused (evaluation, whose
    metrics depend on the answer length). `seed`: where the chain of sampling keys starts (the first
    call samples with `jax.random.split(jax.random.key(seed))[1]`).
    """

    def __init__(self, checkpoint: str | Path, *, dtype: str = "float32", generation: GenerationConfig | None = None,
                 fit_context: bool = True, seed: int = 0):
        devices = jax.devices()
        self.mesh = make_mesh(MeshConfig(dcn_data=slice_count(devices)), devices)
        self.replicated = jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec())
        model, self.config = load_pretrained(checkpoint, dtype=dtype, sharding=self.replicated)
        self.model = merge_lora(model)
        self.tokenizer = load_tokenizer(checkpoint)
        self.generation = generation or GenerationConfig(eos_token_id=self.tokenizer.eos_token_id,
                                                         pad_token_id=conversation.pad_token_id(self.tokenizer))
        self.fit_context = fit_context
        self.key = jax.random.key(seed)  # each call draws with the next key of this chain

    @property
    def uses_prior(self) -> bool:
        """Whether each image needs its prior feature (`[prior_dim]`, the model's priors in order)."""
        return self.config.prior_position != "off"

    def prompt_ids(self, question: str) -> np.ndarray:
        """The template's prompt for `question`, tokenised with the image placeholders expanded."""
        prompt = conversation.generation_prompt(question)
        return conversation.tokenize_with_image(self.tokenizer, prompt, self.config.image_token_id,
                                                self.config.image_seq_length)

    def pixels(self, image_path: str | Path) -> np.ndarray:
        """One image as the model takes it: `[size, size, 3]` float32 (CLIP's preprocessing)."""
        return image.clip_preprocess(image.load_image(image_path), self.config.vision.image_size)

    def check_room(self, question: str) -> np.ndarray:
        """The prompt's token ids; ValueError when the prompt and `max_new_tokens` exceed the context
        (with `fit_context`, `max_new_tokens` is lowered to the room left, while there is any: call
        it for every question first, so that they share the smallest and one compile)."""
        row = self.prompt_ids(question)
        context = self.config.text.max_position_embeddings
        room = context - len(row)
        if self.fit_context and 1 <= room < self.generation.max_new_tokens:
            self.generation = dataclasses.replace(self.generation, max_new_tokens=room)
        if len(row) + self.generation.max_new_tokens > context:
            raise ValueError(f"the prompt is {len(row)} tokens (with the image's {self.config.image_seq_length}); with "
                             f"--max-new-tokens {self.generation.max_new_tokens} that exceeds the model's context of "
                             f"{context} positions")
        return row

    def check_prior(self, feature: np.ndarray | None) -> np.ndarray | None:
        """`feature` as a `[prior_dim]` float32 row, or None for a model without a prior token;
        ValueError when it is missing, of another width, or not finite."""
        if not self.uses_prior:
            return None
        if feature is None:
            raise ValueError("this model uses a facial prior token: give --prior-npy FILE.npy or --onnx MODEL.onnx")
        if np.size(feature) != self.config.prior_dim:
            raise ValueError(f"the prior feature has {np.size(feature)} values; this model's priors "
                             f"({', '.join(p.name for p in self.config.priors)}) take {self.config.prior_dim}")
        if not np.isfinite(feature).all():
            raise ValueError(f"the prior feature holds {int((~np.isfinite(feature)).sum())} values that are NaN or "
                             "infinite; a landmark feature is finite")
        return np.asarray(feature, np.float32).reshape(-1)

    def answer(self, image_path: str | Path, question: str, feature: np.ndarray | None) -> str:
        """One answer to `question` about the image at `image_path` (`run.py generate`)."""
        feature = self.check_prior(feature)
        landmarks = None if feature is None else feature[None]
        return self.answer_batch(question, self.pixels(image_path)[None], landmarks)[0][0]

    def answer_batch(self, question: str, pixels: np.ndarray, landmarks: np.ndarray | None,
                     rows: int | None = None) -> list[Answer]:
        """The answer to `question` about each of `n` images; every process gives the same inputs
        and gets the same answers.

        `pixels` `[n, size, size, 3]` as `pixels` gives them; `landmarks` `[n, prior_dim]` (None
        for a model without a prior token). `rows` pads the batch with copies of its first image up
        to that many rows, so that batches of up to `rows` images share one compile."""
        count = len(pixels)
        row = self.check_room(question)
        pixels, landmarks = _fill(pixels, rows), _fill(landmarks, rows)
        ids, mask = left_pad([row] * len(pixels), self.generation.pad_token_id, bucket(len(row)))
        tokens = self._generate(*jax.device_put((ids, mask, pixels, landmarks), self.replicated))
        return [self.decode(tokens_row) for tokens_row in np.asarray(tokens)[:count]]

    def answer_questions(self, questions: Sequence[str], pixels: np.ndarray, landmarks: np.ndarray | None,
                         rows: int | None = None) -> list[list[Answer]]:
        """Answers `[question][image]` to each of `questions` about each of `n` images, with the
        image side (CLIP, projector, prior tokens) and the prompt prefix the questions share run once
        per image (`generate.generate_shared`): the same answers as `answer_batch` per question
        (greedy), for about one prefill instead of one per question, and all questions decoded in
        one loop. Inputs and `rows` as `answer_batch`'s; every process gives the same inputs."""
        prompts = [self.check_room(question) for question in questions]
        count = len(pixels)
        shared = _common_prefix(prompts)
        suffixes, suffix_mask = left_pad([p[shared:] for p in prompts], self.generation.pad_token_id,
                                         bucket(max(len(p) for p in prompts) - shared, 16))
        pixels, landmarks = _fill(pixels, rows), _fill(landmarks, rows)
        prefix = np.repeat(prompts[0][None, :shared], len(pixels), axis=0).astype(np.int32)
        self.key, key = jax.random.split(self.key)
        inputs = jax.device_put((prefix, pixels, landmarks, suffixes, suffix_mask), self.replicated)
        with jax.set_mesh(self.mesh):
            tokens = np.asarray(generate_shared(self.model, *inputs, key, self.generation))
        return [[self.decode(row) for row in question_tokens[:count]] for question_tokens in tokens]

    def answer_split(self, prompts: Sequence[np.ndarray], pixels: np.ndarray,
                     landmarks: np.ndarray | None) -> list[Answer]:
        """Answers for a global batch whose rows are split over the processes, in order, on every process.

        `prompts`: every row's prompt ids (the same list on every process: it decides the bucket),
        `len(prompts)` a multiple of the device count; `pixels` `[rows / processes, size, size, 3]`
        and `landmarks` `[rows / processes, prior_dim]` (or None): this process's share, process
        p holding rows `p * share` onwards."""
        share = len(prompts) // jax.process_count()
        mine = prompts[jax.process_index() * share:(jax.process_index() + 1) * share]
        ids, mask = left_pad(mine, self.generation.pad_token_id, bucket(max(len(p) for p in prompts)))
        place = lambda x: None if x is None else jax.make_array_from_process_local_data(  # noqa: E731
            batch_sharding(self.mesh, x.ndim), x)
        tokens = self._generate(place(ids), place(mask), place(pixels), place(landmarks))
        tokens = np.asarray(multihost_utils.process_allgather(tokens, tiled=True))
        return [self.decode(row) for row in tokens]

    def _generate(self, ids: jax.Array, mask: jax.Array, pixels: jax.Array | None,
                  landmarks: jax.Array | None) -> jax.Array:
        self.key, key = jax.random.split(self.key)
        with jax.set_mesh(self.mesh):  # kernels under shard_map (splash attention) read the mesh here
            return generate(self.model, ids, pixels, mask, landmarks, key, self.generation)

    def decode(self, row: np.ndarray) -> Answer:
        """The answer text of one row of new tokens, and whether it ended with EOS."""
        stop = np.flatnonzero(row == self.generation.eos_token_id)
        row = row[: stop[0]] if stop.size else row
        return self.tokenizer.decode(row.tolist(), skip_special_tokens=True).strip(), bool(stop.size)


class ImageInputs:
    """What the model takes of decoded images (RGB uint8 `[H, W, 3]`, each a whole face: an aligned
    crop, or a photo given as a face): CLIP's pixels, and each of the model's priors computed on the
    whole image, concatenated in the config's order (2d106det with the official recipe and the
    landmark graph `onnx`, the dlib priors with dlib), as `run.py generate` computes them from a file."""

    def __init__(self, config, onnx: str | Path | None = None):
        self.config = config
        self.priors = config.priors if config.prior_position != "off" else ()
        self.extractors = open_extractors(self.priors, onnx) if self.priors else []

    def features(self, images: Sequence[np.ndarray], names: Sequence[str]) -> np.ndarray | None:
        """`[n, prior_dim]` float32 (None for a model without a prior token); ValueError naming the
        image (`names[i]`) whose feature cannot be computed or is not finite."""
        if not self.extractors:
            return None
        bgr = [np.ascontiguousarray(rgb[..., ::-1]) for rgb in images]
        return np.concatenate([e.features(bgr, names=list(names)) for e in self.extractors], axis=1)

    def pixels(self, images: Sequence[np.ndarray]) -> np.ndarray:
        """`[n, size, size, 3]` float32: CLIP's preprocessing, without LLaVA's padding to a square."""
        return np.stack([image.clip_preprocess(Image.fromarray(rgb), self.config.vision.image_size) for rgb in images])
