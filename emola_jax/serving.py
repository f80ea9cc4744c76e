"""The serving engine: continuous batching over a fixed set of decoding slots (`run.py serve`).

One thread owns the model (a `Predictor`'s: LoRA folded in, weights on every local device's mesh)
and `generate.Slots`, a fixed number of rows over a ring of cache slots. Between two decode steps
it lets waiting requests join free rows (each prefilled alone, at its own length bucket) and frees
the rows of finished or cancelled ones at once; every step then decodes every row at its own
position, as JetStream and vLLM do. A request's tokens are those `generate` gives for its prompt,
image and seed alone (greedy: token for token; sampled: the same key chain), whatever else is in
flight. Requests beyond the rows wait in a bounded queue; a full queue refuses at once.
"""

from __future__ import annotations

import dataclasses
import queue
import threading
import time
from collections.abc import Iterator

import jax
import numpy as np
from flax import nnx

from emola_jax.generate import (
    GenerationConfig,
    check_inputs,
    empty_slots,
    join_slot,
    leave_slot,
    prefill_one,
    step_slots,
)
from emola_jax.predictor import Predictor, bucket, left_pad
from emola_jax.sharding import batch_sharding


class QueueFull(RuntimeError):
    """Every row is busy and the waiting queue is full: try again later."""


@dataclasses.dataclass(frozen=True)
class Request:
    """One question about one image, with its own decoding settings."""

    prompt: np.ndarray  # token ids, the image placeholders expanded (`Predictor.prompt_ids`)
    pixels: np.ndarray  # [size, size, 3] float32, CLIP-preprocessed (`Predictor.pixels`)
    landmarks: np.ndarray | None  # [prior_dim] float32; None for a model without a prior token
    max_new_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0


class Stream:
    """The new tokens of one request as the engine makes them: iterate to read them (blocking; EOS
    itself is not yielded, though `generated` counts it), `cancel()` to free its row. After the last
    token, `finish_reason` is "stop" (EOS), "length" (`max_new_tokens`) or "cancelled"."""

    def __init__(self, request: Request):
        self.request = request
        self.finish_reason: str | None = None
        self.generated = 0  # tokens made so far, EOS included
        self.submitted = time.perf_counter()
        self._items: queue.SimpleQueue = queue.SimpleQueue()
        self._cancelled = threading.Event()

    def cancel(self) -> None:
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def __iter__(self) -> Iterator[int]:
        while True:
            item = self._items.get()
            if item is None:
                return
            if isinstance(item, BaseException):
                raise RuntimeError(f"the engine stopped: {item}") from item
            yield item

    def tokens(self) -> list[int]:
        """Every new token, once the request is done."""
        return list(self)

    def _put(self, token: int) -> None:
        self._items.put(token)

    def _end(self, reason: str | BaseException) -> None:
        if isinstance(reason, BaseException):
            self._items.put(reason)
        else:
            self.finish_reason = self.finish_reason or reason  # a reader that cancelled may have said why
            self._items.put(None)


class Engine:
    """Owns the model and `rows` decoding slots over a ring of `length` cache slots (default: the
    model's context), and up to `queue_size` requests waiting beyond them. `start()` starts its
    thread; `close()` stops it, ending every open stream; `warm_up()` compiles its programs."""

    def __init__(self, predictor: Predictor, *, rows: int = 8, queue_size: int = 32, length: int | None = None):
        self.predictor = predictor
        self.config = predictor.config
        context = self.config.text.max_position_embeddings
        if length is not None and not 1 <= length <= context:
            raise ValueError(f"the cache length must be between 1 and the model's context of {context}, not {length}")
        self.length = length or context
        devices = predictor.mesh.devices.size
        self.rows = -(-rows // devices) * devices  # the slot axis split over the mesh's devices
        self.eos = predictor.generation.eos_token_id
        self.pad = predictor.generation.pad_token_id
        self.queue_size = queue_size
        self._waiting: queue.Queue[Stream] = queue.Queue()
        self._outstanding = 0  # requests queued or in a row: at most rows + queue_size
        self._lock = threading.Lock()
        self._owners: list[Stream | None] = [None] * self.rows
        self._cancelled_count = 0
        self._timing = {"admitted": 0, "queue_seconds": 0.0, "prefill_seconds": 0.0}
        self._wake = threading.Event()
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._run, name="emola-engine", daemon=True)
        model = predictor.model
        with jax.set_mesh(predictor.mesh):
            dtype = model.language_model.embed_tokens(np.zeros((1, 1), np.int32)).dtype  # the cache's, as generate's
            state = empty_slots(model, self.rows, self.length, dtype)
            self._slots = jax.device_put(state, jax.tree.map(
                lambda x: batch_sharding(predictor.mesh, x.ndim) if x.ndim else predictor.replicated, state))
        # The model split once, and plain `jax.jit` over its weights: `nnx.jit` walks the model's graph
        # on every call (measured 100-260 ms a call on a CPU, more than a small model's step). The
        # decoder's layers are sliced once, here (a second copy of the decoder's weights): sliced
        # inside each call, every weight would be copied on every step.
        graphdef, self._weights = nnx.split(model)
        layers = model.language_model.unstacked_layers()
        layer_graph, self._layers = nnx.split(layers[0])[0], [nnx.split(layer)[1] for layer in layers]

        def bound(fn):
            def call(weights, layer_weights, *args):
                sliced = [nnx.merge(layer_graph, w) for w in layer_weights]
                return fn(nnx.merge(graphdef, weights), *args, layers=sliced)
            return call

        self._prefill = jax.jit(bound(prefill_one))
        self._step = jax.jit(bound(step_slots), donate_argnums=2)
        self._join = jax.jit(lambda weights, *args: join_slot(nnx.merge(graphdef, weights), *args),
                             donate_argnums=1)
        self._leave = jax.jit(leave_slot, donate_argnums=0)

    # ------------------------------------------------------------------------------ requests

    def check(self, request: Request) -> None:
        """ValueError, in one sentence naming the setting, for a request that cannot run: settings out
        of range, a prompt without its image placeholders, a missing or non-finite prior feature, or
        a prompt and `max_new_tokens` beyond the context."""
        GenerationConfig(max_new_tokens=request.max_new_tokens, temperature=request.temperature,
                         top_p=request.top_p)  # the ranges, as generate checks them
        context = min(self.length, self.config.text.max_position_embeddings)
        if len(request.prompt) + request.max_new_tokens > context:
            raise ValueError(f"the prompt is {len(request.prompt)} tokens (with the image's "
                             f"{self.config.image_seq_length}); with max_tokens {request.max_new_tokens} that "
                             f"exceeds the model's context of {context} positions")
        landmarks = self.predictor.check_prior(request.landmarks)
        ids, mask = left_pad([request.prompt], self.pad, bucket(len(request.prompt)))
        check_inputs(self.config, ids, request.pixels[None], mask, None if landmarks is None else landmarks[None],
                     padding="left", max_new_tokens=request.max_new_tokens)

    def submit(self, request: Request) -> Stream:
        """Queues `request` (checked first, `check`); raises QueueFull when the queue is full."""
        self.check(request)
        stream = Stream(request)
        with self._lock:
            if self._outstanding >= self.rows + self.queue_size:
                raise QueueFull(f"{self.rows} requests are decoding and {self.queue_size} waiting already")
            self._outstanding += 1
        self._waiting.put(stream)
        self._wake.set()
        return stream

    @property
    def cancelled(self) -> int:
        """Requests cancelled so far (a client that went away, a stop string found)."""
        return self._cancelled_count

    @property
    def timing(self) -> dict:
        """Since the start: requests admitted to a row, the seconds they waited in the queue and the
        seconds their prefill and first token took, in all (an operator's means: deltas over deltas)."""
        return dict(self._timing)

    @property
    def busy_rows(self) -> int:
        return sum(owner is not None for owner in self._owners)

    @property
    def waiting(self) -> int:
        return self._waiting.qsize()

    def warm_up(self, prompt: np.ndarray) -> None:
        """Compiles prefill (at `prompt`'s length bucket), join, step and leave with one short request
        on a blank image, so that the first client does not wait for the compiler."""
        size = self.config.vision.image_size
        landmarks = np.zeros(self.config.prior_dim, np.float32) if self.config.prior_position != "off" else None
        self.submit(Request(prompt=prompt, pixels=np.zeros((size, size, 3), np.float32), landmarks=landmarks,
                            max_new_tokens=2)).tokens()

    # ------------------------------------------------------------------------------ the loop

    def start(self) -> Engine:
        self._thread.start()
        return self

    def close(self) -> None:
        self._closed.set()
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join()

    def _run(self) -> None:
        try:
            with jax.set_mesh(self.predictor.mesh):
                while not self._closed.is_set():
                    self._admit()
                    self._free_cancelled()
                    if not any(self._owners):
                        self._wake.wait(timeout=0.5)
                        self._wake.clear()
                        continue
                    self._slots, tokens = self._step(self._weights, self._layers, self._slots)
                    for row, token in enumerate(np.asarray(tokens)):
                        if self._owners[row] is not None:
                            self._deliver(row, int(token))
        except BaseException as err:  # every open stream learns why, none waits for ever
            for stream in [*filter(None, self._owners), *self._drain()]:
                stream._end(err)
            raise
        for stream in [*filter(None, self._owners), *self._drain()]:
            stream._end("cancelled")

    def _drain(self) -> list[Stream]:
        streams = []
        while True:
            try:
                streams.append(self._waiting.get_nowait())
            except queue.Empty:
                return streams

    def _admit(self) -> None:
        """Waiting requests join free rows, one prefill each."""
        while None in self._owners:
            try:
                stream = self._waiting.get_nowait()
            except queue.Empty:
                return
            if stream.cancelled:
                self._cancelled_count += 1
                self._release()
                stream._end("cancelled")
                continue
            request, row = stream.request, self._owners.index(None)
            began = time.perf_counter()
            ids, mask = left_pad([request.prompt], self.pad, bucket(len(request.prompt)))
            landmarks = None if request.landmarks is None else np.asarray(request.landmarks, np.float32)[None]
            inputs = jax.device_put((ids, request.pixels[None], mask, landmarks), self.predictor.replicated)
            cache, hidden, position = self._prefill(self._weights, self._layers, *inputs)
            key = jax.random.split(jax.random.key(request.seed))[1]  # as Predictor hands a seed's key to generate
            self._slots, first = self._join(self._weights, self._slots, row, cache, inputs[2], hidden, position,
                                            np.float32(request.temperature), np.float32(request.top_p), key)
            self._owners[row] = stream
            self._deliver(row, int(first))
            self._timing["admitted"] += 1
            self._timing["queue_seconds"] += began - stream.submitted
            self._timing["prefill_seconds"] += time.perf_counter() - began

    def _deliver(self, row: int, token: int) -> None:
        stream = self._owners[row]
        stream.generated += 1
        if token == self.eos:
            self._finish(row, "stop")
            return
        stream._put(token)
        if stream.generated >= stream.request.max_new_tokens:
            self._finish(row, "length")

    def _free_cancelled(self) -> None:
        for row, stream in enumerate(self._owners):
            if stream is not None and stream.cancelled:
                self._finish(row, "cancelled")

    def _finish(self, row: int, reason: str) -> None:
        self._cancelled_count += reason == "cancelled"
        self._slots = self._leave(self._slots, row)
        stream, self._owners[row] = self._owners[row], None
        self._release()
        stream._end(reason)

    def _release(self) -> None:
        with self._lock:
            self._outstanding -= 1
