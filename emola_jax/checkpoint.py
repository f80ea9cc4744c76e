"""Model checkpoints on disk: `config.json` + an orbax tree of weights, written atomically.

Layout of a checkpoint directory:

    config.json      the `EmolaConfig`
    params/          orbax checkpoint; scanned layers are stored one entry per layer
                     (`language_model/layers/7/self_attn/q_proj/kernel`), so that a converter can
                     write, and an exporter read, one layer at a time
    source.json      where the weights came from (format, files, original config), whether
                     the images they were trained on were padded to a square (`pad_to_square`,
                     absent when unknown), which an export to LLaVA's format must repeat, and the
                     recipe of each prior's training features (`prior_recipes`), which the
                     features it is evaluated on must share
    tokenizer/       tokenizer and processor files, when the source carried them
    quantization.json  only in a quantised checkpoint (`run.py convert --quantize`): the method
                     and block size of its decoder kernels; each layer's kernel entry then holds
                     the codes (int8, or two NF4 codes per uint8 byte along the output axis, low
                     nibble first) beside a `kernel_scale` entry (float32 `[in / block, out]`)

This module owns that layout, the quantised entries included (`quantized_entries`, `pack_codes`,
`unpack_codes`): `read_params` dequantises them for readers that want plain weights (the
exporter), `read_quantized` returns them as `qwix.QArray`s.

The writer stages everything in a sibling temporary folder and renames it into place last, so
a failure never leaves a folder that looks like a finished checkpoint. In a multi-process run
every process calls the writer with its shards of the same global arrays (orbax writes each
shard from the process that holds it); process 0 alone creates, renames and writes the small files.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Self

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import qwix
from absl import logging as absl_logging
from jax.experimental import multihost_utils
from orbax.checkpoint import v1 as ocp

from emola_jax import weights
from emola_jax.atomic import STAGING_LOCK, lock_staging, remove_dead_staging, staging_path
from emola_jax.config import EmolaConfig
from emola_jax.models.tree import (
    abstract_model,
    decoder_kernels,
    is_decoder_kernel,
    is_stacked,
    layer_path,
    param_shapes,
)
from emola_jax.progress import bar as progress_bar
from emola_jax.quantization import QTYPES, Quantization, as_array
from emola_jax.weights import Path_, path_name

CONFIG_FILE, PARAMS_DIR, SOURCE_FILE, TOKENIZER_DIR = "config.json", "params", "source.json", "tokenizer"
QUANTIZATION_FILE = "quantization.json"
SCALE_SUFFIX = "_scale"
PAD_TO_SQUARE = "pad_to_square"  # source.json: training images padded to a square (`clip_preprocess(pad=...)`)
PRIOR_RECIPES = "prior_recipes"  # source.json: {prior: recipe} of the feature stores it was trained on


def disk_shapes(config: EmolaConfig, quantization: Quantization | None = None) -> dict[Path_, jax.ShapeDtypeStruct]:
    """What the `params/` tree holds: per-layer entries for stacked weights; with `quantization`,
    codes and scales for each decoder kernel (`quantized_entries`)."""
    out = {}
    for path, spec in param_shapes(config).items():
        if is_stacked(path):
            for i in range(spec.shape[0]):
                entry = layer_path(path, i), jax.ShapeDtypeStruct(spec.shape[1:], spec.dtype)
                if quantization is not None and is_decoder_kernel(path):
                    out.update(quantized_entries(quantization, *entry))
                else:
                    out[entry[0]] = entry[1]
        else:
            out[path] = spec
    return out


def _nest(flat: dict[Path_, Any]) -> dict[str, Any]:
    tree: dict[str, Any] = {}
    for path, value in flat.items():
        node = tree
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = value
    return tree


def _flatten(tree: dict[str, Any], prefix: Path_ = ()) -> Iterator[tuple[Path_, Any]]:
    for key, value in tree.items():
        if isinstance(value, dict):
            yield from _flatten(value, prefix + (key,))
        else:
            yield prefix + (key,), value


def _writer_context() -> ocp.Context:
    context = ocp.Context()
    context.array.saving.use_compression = False  # weights barely compress; zstd only costs time
    return context


def _shared_token() -> str:
    """A random hex token, the same on every process of the run (process 0's)."""
    token = np.frombuffer(uuid.uuid4().bytes[:4], np.uint8)
    if jax.process_count() > 1:
        token = np.asarray(multihost_utils.broadcast_one_to_all(token), np.uint8)
    return token.tobytes().hex()


def _all_processes_reach(name: str) -> None:
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


class StagedDirectory:
    """A folder built in a hidden sibling (`.NAME.tmp-XXXX`) and renamed into place by `publish()`.

    Use as a context manager: an exception inside the block removes the staging folder and leaves
    `out` untouched, so a failure never leaves a folder that looks finished. A non-empty `out` is
    refused unless `overwrite`; the previous folder is then swapped out only at `publish()`.
    Every process of a multi-process run enters it; process 0 creates, renames and removes.
    """

    def __init__(self, out: str | Path, *, overwrite: bool = False):
        self.out = Path(out).absolute()
        if self.out.exists() and not self.out.is_dir():
            raise FileExistsError(f"{self.out} exists and is not a directory")
        if self.out.exists() and any(self.out.iterdir()) and not overwrite:
            raise FileExistsError(f"{self.out} exists and is not empty; pass --overwrite to replace it")
        self.staging = staging_path(self.out, _shared_token())
        self.lead = jax.process_index() == 0
        self._lock: int | None = None

    def __enter__(self) -> Self:
        if self.lead:  # process 0 holds the staging folder's lock: the others die with it
            self.out.parent.mkdir(parents=True, exist_ok=True)
            remove_dead_staging(self.out)
            self.staging.mkdir()
            self._lock = lock_staging(self.staging)
        _all_processes_reach(f"emola_jax staging {self.staging.name} created")
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is not None:
                try:
                    self._abort()
                finally:
                    if self.lead:
                        shutil.rmtree(self.staging, ignore_errors=True)
        finally:
            self._unlock()

    def _unlock(self) -> None:
        if self._lock is not None:
            os.close(self._lock)
            self._lock = None

    def _abort(self) -> None:
        """Stops background work that still writes into the staging folder (before it is removed)."""

    def publish(self) -> Path:
        """Renames the staging folder to `out` (swapping out a previous `out` last); returns `out`
        once every process sees it there."""
        _all_processes_reach(f"emola_jax staging {self.staging.name} written")
        if self.lead:
            self._rename()
        _all_processes_reach(f"emola_jax staging {self.staging.name} published")
        return self.out

    def _rename(self) -> None:
        (self.staging / STAGING_LOCK).unlink()  # the descriptor keeps the lock until the rename is done
        if self.out.exists():
            trash = self.out.parent / f".{self.out.name}.old-{uuid.uuid4().hex[:8]}"
            os.replace(self.out, trash)
            try:
                os.replace(self.staging, self.out)
            except OSError:
                os.replace(trash, self.out)  # put the previous folder back
                raise
            shutil.rmtree(trash)
        else:
            os.replace(self.staging, self.out)


class CheckpointWriter(StagedDirectory):
    """Streams weights into a new checkpoint, flushing to orbax every `flush_bytes`.

    Use as a context manager; `finish()` makes the checkpoint appear at `out` in one rename.
    An exception inside the block removes the staging folder and leaves `out` untouched.
    """

    def __init__(self, out: str | Path, *, overwrite: bool = False, flush_bytes: int = 128 << 20):
        super().__init__(out, overwrite=overwrite)
        self.flush_bytes = flush_bytes
        self._pending: dict[Path_, np.ndarray] = {}
        self._pending_bytes = 0
        self._written: set[Path_] = set()
        self._inflight = None  # the previous group's asynchronous save

    def _abort(self) -> None:
        self._wait()

    def add(self, path: Path_, array: np.ndarray) -> None:
        if path in self._written or path in self._pending:
            raise ValueError(f"weight {path_name(path)} was written twice")
        self._pending[path] = array
        self._pending_bytes += array.nbytes
        if self._pending_bytes >= self.flush_bytes:
            self._flush()

    def _wait(self) -> None:
        if self._inflight is not None:
            self._inflight.result()
            self._inflight = None

    def _flush(self) -> None:
        """Starts writing the pending group; reading the next one overlaps with the write."""
        if self._pending:
            self._wait()  # a partial save builds on the previous one: one in flight at a time
            with _writer_context():
                self._inflight = ocp.partial.save_async(self.staging / PARAMS_DIR, _nest(self._pending))
            self._written.update(self._pending)
            self._pending, self._pending_bytes = {}, 0

    def finish(self, config: EmolaConfig, source: dict[str, Any], tokenizer_files: list[Path] = (),
               quantization: Quantization | None = None) -> Path:
        self._flush()
        self._wait()
        expected = set(disk_shapes(config, quantization))
        if self._written != expected:
            missing, extra = sorted(expected - self._written), sorted(self._written - expected)
            raise ValueError(f"checkpoint incomplete: missing {missing[:5]}, unexpected {extra[:5]}")
        ocp.partial.finalize(self.staging / PARAMS_DIR)
        if self.lead:
            config.save(self.staging / CONFIG_FILE)
            if quantization is not None:
                write_quantization(self.staging, quantization)
            (self.staging / SOURCE_FILE).write_text(json.dumps(source, indent=2, default=str) + "\n")
            if tokenizer_files:
                (self.staging / TOKENIZER_DIR).mkdir()
                for f in tokenizer_files:
                    shutil.copy2(f, self.staging / TOKENIZER_DIR / f.name)
        return self.publish()


@contextlib.contextmanager
def _orbax_quiet():
    """Orbax's own warnings (absl logging) held back for the duration of the block."""
    level = absl_logging.get_verbosity()
    absl_logging.set_verbosity(absl_logging.ERROR)
    try:
        yield
    finally:
        absl_logging.set_verbosity(level)


def storage_error(what: str, err: BaseException) -> ValueError:
    """One line for a failure inside orbax or tensorstore: `what`, then the first line of the
    library's message, cut at 200 characters (theirs can run to pages: registries, whole trees)."""
    first = next((line.strip() for line in str(err).splitlines() if line.strip()), type(err).__name__)
    first = first.split(" See full TensorStore details")[0]  # followed by a method's repr, not the details
    return ValueError(f"{what}: {first if len(first) <= 200 else first[:197] + '...'}")


_SETTLE_S = 1.0  # what tensorstore's reads still in flight get to end in, after one failed


def unreadable_weights(params_dir: Path, err: BaseException) -> ValueError:
    """The one line for weights orbax could not read (a damaged or cut file). When one read fails,
    orbax closes its event loop while tensorstore's other reads go on; each then prints the
    loop's traceback from a thread of its own (no Python hook sees it). They are let end first,
    so that the line said last is this one, not a library's."""
    time.sleep(_SETTLE_S)
    return storage_error(f"could not read the weights in {params_dir} (damaged or cut short?)", err)


def read_source(path: str | Path) -> dict[str, Any]:
    """A checkpoint's `source.json` ({} when it has none); ValueError naming the file when torn."""
    file = Path(path) / SOURCE_FILE
    if not file.is_file():
        return {}
    try:
        source = json.loads(file.read_text())
    except ValueError as err:
        raise ValueError(f"{file} is torn ({err}); copy the checkpoint again") from None
    if not isinstance(source, dict):
        raise ValueError(f"{file} is not a checkpoint's source record (a JSON object)")
    return source


def load_config(path: str | Path) -> EmolaConfig:
    config_file = Path(path) / CONFIG_FILE
    if not Path(path).is_dir():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if not config_file.is_file():
        raise FileNotFoundError(f"{path} is not an emola-jax checkpoint: {CONFIG_FILE} is missing")
    if not (Path(path) / PARAMS_DIR).is_dir():
        raise FileNotFoundError(
            f"{path} is not an emola-jax checkpoint ({PARAMS_DIR}/ is missing); a PyTorch checkpoint must first "
            "be converted with `python run.py convert`"
        )
    return EmolaConfig.load(config_file)


def stored_params(path: str | Path, config: EmolaConfig) -> dict[Path_, Any]:
    """The `params/` entries (orbax metadata: shape, dtype), checked against what `config` needs.

    A quantised checkpoint's decoder kernels are listed as the float32 kernels `read_params`
    dequantises them to (their codes and scales are checked here, then hidden)."""
    params_dir = Path(path).absolute() / PARAMS_DIR
    quantization = checkpoint_quantization(path)
    expected = disk_shapes(config, quantization)
    try:
        with _orbax_quiet():  # a damaged index is said below, in one line, not also in orbax's warnings
            index = ocp.metadata(params_dir).metadata
    except Exception as err:  # orbax raises many types, some with pages of detail
        raise storage_error(f"{params_dir} is not a readable emola-jax checkpoint", err) from err
    if not isinstance(index, dict):
        raise ValueError(f"{params_dir} is not a readable emola-jax checkpoint: its weight index is damaged")
    stored = dict(_flatten(index))
    for key in sorted(set(expected) | set(stored)):
        name = path_name(key)
        if key not in stored:
            raise ValueError(f"{params_dir}: weight {name} is missing from the checkpoint")
        if key not in expected:
            raise ValueError(f"{params_dir}: weight {name} is not part of the model its config describes")
        if tuple(stored[key].shape) != tuple(expected[key].shape):
            raise ValueError(
                f"{params_dir}: weight {name} has shape {tuple(stored[key].shape)}, "
                f"the config needs {tuple(expected[key].shape)}"
            )
    if quantization is not None:
        plain = disk_shapes(config)
        stored = {k: plain[k] if is_decoder_kernel(k) else v for k, v in stored.items() if not is_scale_path(k)}
    return stored


def read_params(path: str | Path, specs: dict[Path_, jax.ShapeDtypeStruct]) -> dict[Path_, jax.Array]:
    """Only the entries named in `specs`, read with orbax's partial load: memory for those alone,
    so an exporter can walk a checkpoint far larger than memory one layer at a time. A quantised
    checkpoint's decoder kernels come back dequantised to their spec's dtype."""
    quantization = checkpoint_quantization(path)
    kernels = [k for k in specs if is_decoder_kernel(k)] if quantization is not None else []
    if kernels:
        plain = {k: s for k, s in specs.items() if not is_decoder_kernel(k)}
        read = _read_entries(path, plain) if plain else {}
        for key, q in read_quantized(path, kernels, quantization).items():
            read[key] = as_array(jax.tree.map(jnp.asarray, q), specs[key].dtype)
        return read
    return _read_entries(path, specs)


def _read_entries(path: str | Path, specs: dict[Path_, jax.ShapeDtypeStruct]) -> dict[Path_, jax.Array]:
    params_dir = Path(path).absolute() / PARAMS_DIR
    device = jax.sharding.SingleDeviceSharding(jax.local_devices(backend="cpu")[0])  # this process's own
    target = {k: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=device) for k, s in specs.items()}
    context = ocp.Context()
    context.pytree.loading.partial_load = True
    try:
        with context:
            return dict(_flatten(ocp.load(params_dir, _nest(target))))
    except Exception as err:  # orbax/tensorstore raise many types, some with pages of detail
        raise unreadable_weights(params_dir, err) from err


def load_pretrained(
    path: str | Path, dtype: str = "float32", sharding: jax.sharding.Sharding | None = None
):
    """`(model, config)` for a checkpoint written by `run.py convert`.

    Weights are cast to `dtype` as they are read (LoRA factors stay float32) and placed with
    `sharding` (default: the first device); per-layer entries are stacked for the scanned layers.
    A quantised checkpoint's decoder kernels stay quantised (`qwix.QArray`s, dequantised in the matmul).
    """
    path = Path(path).absolute()
    config = load_config(path).replace(dtype=dtype)
    params_dir = path / PARAMS_DIR
    sharding = sharding or jax.sharding.SingleDeviceSharding(jax.devices()[0])
    quantization = checkpoint_quantization(path)
    expected = {k: s for k, s in disk_shapes(config).items()
                if quantization is None or not is_decoder_kernel(k)}
    stored_params(path, config)
    target = {k: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding) for k, s in expected.items()}
    context = ocp.Context()
    context.pytree.loading.partial_load = quantization is not None  # codes and scales: read below
    try:
        with context:
            flat = dict(_flatten(ocp.load(params_dir, _nest(target))))
    except Exception as err:  # orbax/tensorstore raise many types, some with pages of detail
        raise unreadable_weights(params_dir, err) from err

    values = {}
    for path_, spec in param_shapes(config).items():
        if quantization is not None and is_decoder_kernel(path_):
            layers = list(read_quantized(path, [layer_path(path_, i) for i in range(spec.shape[0])],
                                         quantization).values())
            values[path_] = jax.device_put(jax.tree.map(lambda *x: np.stack(x), *layers), sharding)
        elif is_stacked(path_):
            layers = [flat.pop(layer_path(path_, i)) for i in range(spec.shape[0])]
            values[path_] = jnp.stack(layers) if layers else jnp.zeros(spec.shape, spec.dtype)
        else:
            values[path_] = flat.pop(path_)
    return weights.from_flat(abstract_model(config), values, source=f"the weights in {params_dir}"), config


def save_pretrained(
    model, out: str | Path, *, overwrite: bool = False, source: dict[str, Any] | None = None,
    tokenizer_files: list[Path] = (),
) -> Path:
    """Writes `model` (any `EmolaForConditionalGeneration`) as a checkpoint `load_pretrained` reads."""
    config: EmolaConfig = model.config
    with CheckpointWriter(out, overwrite=overwrite) as writer:
        for path, value in weights.flat(model).items():
            if is_stacked(path):  # a quantised kernel is written dequantised, one layer at a time
                for i in range(value.shape[0]):
                    writer.add(layer_path(path, i), as_array(value[i], config.dtype))
            else:
                writer.add(path, value)
        return writer.finish(config, source or {"format": "emola-jax"}, list(tokenizer_files))


def load_tokenizer(checkpoint: str | Path):
    """The tokenizer saved with a checkpoint (under `TOKENIZER_DIR`)."""
    # deferred: start-up time (transformers)
    from transformers import AutoTokenizer

    path = Path(checkpoint) / TOKENIZER_DIR
    if not Path(checkpoint).is_dir():
        raise FileNotFoundError(f"checkpoint {checkpoint} does not exist")
    if not path.is_dir():
        raise FileNotFoundError(f"{checkpoint} carries no tokenizer ({TOKENIZER_DIR}/ is missing)")
    try:  # LLaVA tokenises with the slow sentencepiece tokenizer; use it whenever the model file is there
        return AutoTokenizer.from_pretrained(path, use_fast=not (path / "tokenizer.model").is_file())
    except Exception as err:  # noqa: BLE001 - tokenizers and transformers raise many types for a bad file
        first = next((line.strip() for line in str(err).splitlines() if line.strip()), type(err).__name__)
        raise ValueError(f"the tokenizer in {path} cannot be read ({first[:200]}); copy it again from the "
                         "checkpoint it came from") from None


# --- quantised decoder kernels on disk --------------------------------------------------------

def scale_path(path: Path_) -> Path_:
    """The entry that holds the scales of the quantised kernel `path`."""
    return (*path[:-1], path[-1] + SCALE_SUFFIX)


def is_scale_path(path: Path_) -> bool:
    """The `kernel_scale` entry stored beside a quantised kernel's codes."""
    return path[-1] == "kernel" + SCALE_SUFFIX and is_decoder_kernel((*path[:-1], "kernel"))


def quantized_entries(quantization: Quantization, path: Path_,
                      spec: jax.ShapeDtypeStruct) -> dict[Path_, jax.ShapeDtypeStruct]:
    """The entries one layer's quantised kernel `path` (`[in, out]`) is stored as: codes and scales."""
    shape = tuple(spec.shape)
    codes = (jax.ShapeDtypeStruct(shape, jnp.int8) if quantization.method == "int8"
             else jax.ShapeDtypeStruct((*shape[:-1], shape[-1] // 2), jnp.uint8))
    return {path: codes, scale_path(path): jax.ShapeDtypeStruct(quantization.scale_shape(shape), jnp.float32)}


def pack_codes(quantization: Quantization, q: qwix.QArray) -> tuple[np.ndarray, np.ndarray]:
    """`(codes, scales)` as the checkpoint stores them (NF4: two codes per byte, low nibble first)."""
    codes = np.asarray(q.qvalue)
    if quantization.method == "nf4":
        codes = codes.astype(np.uint8)
        codes = codes[..., 0::2] | (codes[..., 1::2] << 4)
    return codes, np.asarray(q.scale, np.float32)


def unpack_codes(quantization: Quantization, codes: np.ndarray, scales: np.ndarray) -> qwix.QArray:
    """The `QArray` (numpy leaves) of codes and scales as read from a checkpoint."""
    codes = np.asarray(codes)
    if quantization.method == "nf4":
        packed = codes.astype(np.uint8)
        codes = np.stack([packed & 0xF, packed >> 4], axis=-1).reshape(*packed.shape[:-1], -1)
        codes = codes.astype(ml_dtypes.uint4)
    else:
        codes = codes.astype(np.int8)
    return qwix.QArray(codes, np.asarray(scales, np.float32), None, QTYPES[quantization.method])


def write_quantization(folder: str | Path, quantization: Quantization) -> None:
    """`folder/quantization.json`: the method and block size `checkpoint_quantization` reads back."""
    (Path(folder) / QUANTIZATION_FILE).write_text(json.dumps(dataclasses.asdict(quantization), indent=2) + "\n")


def checkpoint_quantization(checkpoint: str | Path) -> Quantization | None:
    """The quantisation a checkpoint's decoder kernels are stored in (None: unquantised)."""
    file = Path(checkpoint) / QUANTIZATION_FILE
    if not file.is_file():
        return None
    try:
        fields = json.loads(file.read_text())
        return Quantization(str(fields["method"]), int(fields["block_size"]))
    except (ValueError, KeyError, TypeError) as err:
        raise ValueError(f"{file} is not a readable quantisation record: {err}") from err


def check_base(wanted: Quantization | None, checkpoint: str | Path) -> Quantization | None:
    """The base's stored quantisation, after checking the run may use it: a quantised base is read
    as it is (same method and block size) or dequantised (`none`), never quantised a second time."""
    stored = checkpoint_quantization(checkpoint)
    if stored is not None and wanted is not None and wanted != stored:
        raise ValueError(f"base checkpoint {checkpoint} is quantised as {stored.method} with block size "
                         f"{stored.block_size}; set train.base_quantization={stored.method} and "
                         f"train.quantization_block_size={stored.block_size} (or none to dequantise it)")
    return stored


def quantize_checkpoint(src: str | Path, out: str | Path, quantization: Quantization, *, overwrite: bool = False,
                        progress: bool = False) -> Path:
    """Writes checkpoint `src` at `out` with its decoder kernels quantised, one weight entry at a
    time (host memory: one layer's kernel, its codes, and the writer's flush buffer).

    Raises ValueError when `src` is already quantised or a kernel does not fit the block size.
    """
    if checkpoint_quantization(src) is not None:
        raise ValueError(f"{src} is already quantised ({QUANTIZATION_FILE}); quantise the unquantised checkpoint")
    config = load_config(src)
    stored = stored_params(src, config)
    specs = disk_shapes(config)
    quantization.check(decoder_kernels(specs), where="--block-size")
    source = {**read_source(src), "quantized": dataclasses.asdict(quantization)}
    tokenizer = Path(src) / TOKENIZER_DIR
    with CheckpointWriter(out, overwrite=overwrite) as writer:
        for path in progress_bar(iterable=specs, desc="quantising", unit="weight", enabled=progress):
            value = np.asarray(read_params(src, {path: stored[path]})[path])
            if is_decoder_kernel(path):
                codes, scales = pack_codes(quantization, jax.device_get(quantization.quantize(jnp.asarray(value))))
                writer.add(path, codes)
                writer.add(scale_path(path), scales)
            else:
                writer.add(path, value)
        files = sorted(tokenizer.iterdir()) if tokenizer.is_dir() else []
        return writer.finish(config, source, files, quantization=quantization)


def read_quantized(path: str | Path, keys: list[Path_], quantization: Quantization) -> dict[Path_, Any]:
    """The decoder kernel entries `keys` of a quantised checkpoint as `QArray`s with numpy leaves."""
    plain = disk_shapes(load_config(path))
    specs = {}
    for key in keys:
        specs.update(quantized_entries(quantization, key, plain[key]))
    read = _read_entries(path, specs)
    return {k: unpack_codes(quantization, np.asarray(read[k]), np.asarray(read[scale_path(k)])) for k in keys}
