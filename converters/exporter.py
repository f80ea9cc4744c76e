"""emola-jax checkpoints -> PyTorch checkpoints, one layer at a time: the importer's table, reversed.

Three targets, each a folder:

    hf     a transformers `LlavaForConditionalGeneration` directory (LoRA merged in float32), with
           each prior's projector beside it: `prior_projector.safetensors` (2d106det),
           `prior_projector_<name>.safetensors` (any other prior; `prior_file`)
    peft   a PEFT LoRA adapter for that `LlavaForConditionalGeneration` (the base: `hf --no-merge`)
    emola  the official EmoLA run layout: PEFT adapter, `non_lora_trainables.bin` (mm_projector),
           `landmark_feature_projector.bin` (2d106det; `landmark_feature_projector_<name>.bin` for
           any other prior, which the official code does not read), LLaVA's `config.json` (with
           the priors in order, `face_priors`); loaded over the base LLaVA-1.5

Every output tensor is planned before anything is read: its file, its key (a `tables.Layout`
applied to the rule's canonical key), dtype and shape, so safetensors headers are written first.
The checkpoint's per-layer orbax entries are then read one group at a time (orbax partial load,
the next group read while this one is written), mapped through each rule's `to_torch`, and
streamed out. The folder is staged and renamed into place at the end.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import shutil
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from converters import hf_config, tables
from converters.writers import SafetensorsWriter, nbytes, parse_size, plan_shards, save_torch, shard_names
from emola_jax.atomic import check_apart
from emola_jax.checkpoint import (
    PAD_TO_SQUARE,
    TOKENIZER_DIR,
    StagedDirectory,
    load_config,
    read_params,
    read_source,
    stored_params,
)
from emola_jax.config import EmolaConfig, PriorToken
from emola_jax.lora import fold, target_regex, to_peft_config
from emola_jax.models.tree import LAYER_AXIS_PARENT, layer_path
from emola_jax.progress import bar as progress_bar
from emola_jax.settings import AdapterFormat, Dtype, ExportFormat, check_choice
from emola_jax.weights import Path_

PRIOR_PROJECTOR_FILE = "prior_projector.safetensors"  # the 2d106det prior's (`prior_file`)
ADAPTER_CONFIG = "adapter_config.json"
NON_LORA_FILE = "non_lora_trainables.bin"
LANDMARK_FILE = "landmark_feature_projector.bin"  # the 2d106det prior's (`landmark_file`)
_WEIGHTS = "<model weights>"  # placeholder file name until the shards are planned
_PT = {"format": "pt"}  # transformers refuses safetensors files without it


@dataclasses.dataclass(frozen=True)
class Item:
    """One output tensor: its file and key, the rule (and layer) it comes from, and its dtype.

    `lora` names the adapter rules folded into this kernel (`hf` export of a LoRA checkpoint).
    """

    file: str
    key: str
    rule: tables.ParamRule
    layer: int | None
    dtype: np.dtype
    lora: tuple[tables.ParamRule, tables.ParamRule] | None = None

    @property
    def shape(self) -> tuple[int, ...]:
        return self.rule.torch_shape

    @property
    def entries(self) -> list[Path_]:
        """The stored (per-layer) checkpoint entries this tensor is computed from."""
        rules = [self.rule, *(self.lora or ())]
        return [r.path if self.layer is None else layer_path(r.path, self.layer) for r in rules]


def _canonical(rule: tables.ParamRule, layer: int | None) -> str:
    return rule.key if layer is None else rule.key.format(i=layer)


def _walk(rules: list[tables.ParamRule]) -> Iterator[tuple[tables.ParamRule, int | None]]:
    """The rules in table order, each stack of layers walked layer by layer (all of layer 0, then 1...)."""
    seen: set[Path_] = set()
    for rule in rules:
        if rule.num_layers is None:
            yield rule, None
            continue
        stack = rule.path[: rule.path.index(LAYER_AXIS_PARENT) + 1]
        if stack in seen:
            continue
        seen.add(stack)
        members = [r for r in rules if r.num_layers is not None and r.path[: len(stack)] == stack]
        for i in range(rule.num_layers):
            for member in members:
                yield member, i


def _item(file: str, layout: tables.Layout, rule: tables.ParamRule, layer: int | None, dtype: np.dtype,
          lora: tuple[tables.ParamRule, tables.ParamRule] | None = None) -> Item:
    key = layout.to_file(_canonical(rule, layer))
    if key is None:  # a table/layout mismatch, never user input
        raise KeyError(f"layout {layout.name!r} has no name for {_canonical(rule, layer)!r}")
    return Item(file, key, rule, layer, np.dtype(dtype), lora)


def prior_file(prior: PriorToken) -> str:
    """The file of a prior's projector beside an `hf` export: `prior_projector.safetensors` for
    2d106det, `prior_projector_<name>.safetensors` for another prior."""
    return f"{prior.projector_name}.safetensors"


def landmark_file(prior: PriorToken) -> str:
    """The file of a prior's projector in an `emola` export: `landmark_feature_projector.bin` for
    2d106det (the official file), `landmark_feature_projector_<name>.bin` for another prior."""
    return f"{tables.emola_landmark_module(prior)}.bin"


def _priors(config: EmolaConfig) -> dict[str, PriorToken]:
    """The model's prior projectors by module name (none with `prior_position="off"`)."""
    return {} if config.prior_position == "off" else {p.projector_name: p for p in config.priors}


def _plan_hf(config: EmolaConfig, dtype: np.dtype, merge: bool, max_shard_bytes: int) -> list[Item]:
    rules = tables.rules(config)
    adapters = {r.path: r for r in rules if r.is_lora}
    priors = _priors(config)
    items = []
    for rule, layer in _walk(rules):
        if rule.is_lora:
            continue
        lora = None
        if merge and rule.path[-1] == "kernel" and rule.path[:-1] + ("lora_a",) in adapters:
            lora = (adapters[rule.path[:-1] + ("lora_a",)], adapters[rule.path[:-1] + ("lora_b",)])
        if rule.path[0] in priors:
            prior = priors[rule.path[0]]
            items.append(_item(prior_file(prior), tables.prior_file_layout(prior), rule, layer, dtype))
        else:
            items.append(_item(_WEIGHTS, tables.LLAVA_HF_SAVED, rule, layer, dtype, lora))
    weights = [item for item in items if item.file == _WEIGHTS]
    shards = plan_shards([(item.key, item.dtype, item.shape) for item in weights], max_shard_bytes)
    names = {key: name for name, shard in zip(shard_names(len(shards)), shards, strict=True) for key, _, _ in shard}
    return [dataclasses.replace(item, file=names[item.key]) if item.file == _WEIGHTS else item for item in items]


def _adapter_file(adapter_format: str) -> str:
    check_choice(adapter_format, AdapterFormat, "adapter format")
    return f"adapter_model.{adapter_format}"


def _plan_peft(config: EmolaConfig, dtype: np.dtype, adapter_format: str) -> list[Item]:
    """The LoRA factors (float32) and the multi-modal projector (`modules_to_save`, in `dtype`) in
    the adapter file; each prior's projector beside it, as in an `hf` export: together they are
    everything a run trains, so the adapter over the llava-hf model the run started from computes
    the trained model, not only its LoRA part."""
    file = _adapter_file(adapter_format)
    priors = _priors(config)
    items = []
    for rule, layer in _walk(tables.rules(config)):
        if rule.is_lora:
            items.append(_item(file, tables.PEFT_LLAVA_HF, rule, layer, np.float32))
        elif rule.path[0] in tables.PEFT_MODULES_TO_SAVE:
            items.append(_item(file, tables.PEFT_LLAVA_HF, rule, layer, dtype))
        elif rule.path[0] in priors:
            prior = priors[rule.path[0]]
            items.append(_item(prior_file(prior), tables.prior_file_layout(prior), rule, layer, dtype))
    return items


def _plan_emola(config: EmolaConfig, dtype: np.dtype, adapter_format: str) -> list[Item]:
    adapter = _adapter_file(adapter_format)
    priors = _priors(config)
    items = []
    for rule, layer in _walk(tables.rules(config)):
        if rule.is_lora:
            items.append(_item(adapter, tables.PEFT_EMOLA, rule, layer, np.float32))
        elif rule.path[0] == "multi_modal_projector":
            items.append(_item(NON_LORA_FILE, tables.EMOLA_NON_LORA, rule, layer, dtype))
        elif rule.path[0] in priors:
            prior = priors[rule.path[0]]
            items.append(_item(landmark_file(prior), tables.emola_landmark_layout(prior), rule, layer, dtype))
    return items


def _groups(items: list[Item], stored: dict[Path_, Any], budget: int) -> list[list[Item]]:
    """Consecutive items read together: whole layers (or single weights), merged while under `budget` bytes."""

    def unit(item: Item) -> tuple:
        if item.layer is None:
            return (item.rule.path,)
        return (item.rule.path[: item.rule.path.index(LAYER_AXIS_PARENT)], item.layer)

    units: list[list[Item]] = []
    for item in items:
        if units and unit(units[-1][-1]) == unit(item):
            units[-1].append(item)
        else:
            units.append([item])
    groups: list[list[Item]] = []
    size = 0
    for members in units:
        unit_bytes = sum(nbytes(stored[e].dtype, stored[e].shape) for m in members for e in m.entries)
        if groups and size + unit_bytes <= budget:
            groups[-1].extend(members)
            size += unit_bytes
        else:
            groups.append(list(members))
            size = unit_bytes
    return groups


@functools.partial(jax.jit, static_argnums=(1, 2))
def _to_file_layout(array: jax.Array, transform: tables.Transform, dtype: np.dtype) -> jax.Array:
    return transform.to_torch(array).astype(dtype)


@functools.partial(jax.jit, static_argnums=(4, 5))
def _merged(kernel: jax.Array, lora_a: jax.Array, lora_b: jax.Array, scale: jax.Array,
            transform: tables.Transform, dtype: np.dtype) -> jax.Array:
    """The LoRA fold (PEFT's merge_and_unload), in the file's layout and dtype."""
    return transform.to_torch(fold(kernel, lora_a, lora_b, scale)).astype(dtype)


class _Files:
    """The output files of one export: safetensors streamed in plan order, `.bin` files kept and saved at the end."""

    def __init__(self, folder: Path, items: list[Item], metadata: dict[str, dict[str, str]]):
        self.folder = folder
        by_file: dict[str, list[Item]] = {}
        for item in items:
            by_file.setdefault(item.file, []).append(item)
        self.streams: dict[str, SafetensorsWriter] = {}
        self.held: dict[str, dict[str, np.ndarray]] = {}
        for name, members in by_file.items():
            if name.endswith(".safetensors"):
                entries = [(m.key, m.dtype, m.shape) for m in members]
                self.streams[name] = SafetensorsWriter(folder / name, entries, metadata.get(name, _PT))
            else:
                self.held[name] = {}

    def write(self, item: Item, array: np.ndarray) -> None:
        if item.file in self.streams:
            self.streams[item.file].write(item.key, array)
        else:
            self.held[item.file][item.key] = np.array(array)

    def close(self) -> None:
        for stream in self.streams.values():
            stream.close()
        for name, tensors in self.held.items():
            save_torch(self.folder / name, tensors)

    def abort(self) -> None:
        for stream in self.streams.values():
            stream.abort()


def _stream(ckpt: Path, items: list[Item], stored: dict[Path_, Any], files: _Files, scale: float,
            budget: int, progress: bool) -> None:
    """Reads the checkpoint group by group (the next group while this one is written) into `files`."""
    groups = _groups(items, stored, budget)

    def read(group: list[Item]) -> dict[Path_, jax.Array]:
        wanted = {e: stored[e] for item in group for e in item.entries}
        return read_params(ckpt, wanted)

    with ThreadPoolExecutor(1) as reader, progress_bar(total=len(items), desc="exporting", unit="tensor",
                                                       enabled=progress) as bar:
        upcoming = reader.submit(read, groups[0])
        for g, group in enumerate(groups):
            arrays = upcoming.result()
            if g + 1 < len(groups):
                upcoming = reader.submit(read, groups[g + 1])
            for item in group:
                if item.lora is None:
                    out = _to_file_layout(arrays[item.entries[0]], item.rule.transform, item.dtype)
                else:
                    kernel, lora_a, lora_b = (arrays[e] for e in item.entries)
                    out = _merged(kernel, lora_a, lora_b, jnp.float32(scale), item.rule.transform, item.dtype)
                files.write(item, np.asarray(out))
                del out
                bar.update()
            del arrays


# ---------------------------------------------------------------------------------------------


def _check_paths(ckpt: Path, out: Path) -> None:
    check_apart("OUT", out, {"the checkpoint": ckpt})


def plan_export(
    ckpt: str | Path, fmt: str, *, dtype: str | None = None, merge: bool = True,
    max_shard_size: str | int = "5GB", adapter_format: str = "safetensors",
) -> tuple[EmolaConfig, list[Item]]:
    """`(config, items)`: every tensor the export writes, before anything is read."""
    ckpt = Path(ckpt)
    config = load_config(ckpt)
    check_choice(fmt, ExportFormat, "format")
    dtype = dtype or config.dtype
    check_choice(dtype, Dtype, "dtype")
    if fmt in ("peft", "emola") and config.lora is None:
        raise ValueError(f"{ckpt} has no LoRA adapter (its config's lora is null): export it with --format hf")
    if not config.visual_tokens:
        raise ValueError(f"{ckpt} has visual_tokens false (prior tokens only), which neither transformers' LLaVA nor "
                         "the official EmoLA code can run; it has no PyTorch export")
    if fmt == "emola":
        if config.prior_position != "after":
            raise ValueError(
                f"{ckpt} has prior_position {config.prior_position!r}; the official EmoLA code places the prior "
                "token after the visual tokens only (export it with --format hf)"
            )
        if not config.projector_bias:
            raise ValueError(f"{ckpt}: LLaVA's mm_projector has biases; this checkpoint's projector has none")
    if fmt == "hf":
        items = _plan_hf(config, np.dtype(dtype), merge, parse_size(max_shard_size))
    elif fmt == "peft":
        items = _plan_peft(config, dtype, adapter_format)
    else:
        items = _plan_emola(config, np.dtype(dtype), adapter_format)
    return config.replace(dtype=dtype), items


def export(
    ckpt: str | Path,
    out: str | Path,
    *,
    fmt: str = "hf",
    dtype: str | None = None,
    merge: bool = True,
    max_shard_size: str | int = "5GB",
    adapter_format: str = "safetensors",
    overwrite: bool = False,
    progress: bool = True,
    read_bytes: int = 256 << 20,
) -> Path:
    """Writes checkpoint `ckpt` as a PyTorch folder at `out` (format `hf`, `peft` or `emola`); returns `out`.

    `dtype` (default: the checkpoint's) applies to every weight but LoRA factors, which stay float32.
    `merge=False` writes an `hf` export's base weights without the LoRA update (the base of a `peft` export).
    """
    ckpt, out = Path(ckpt), Path(out)
    config, items = plan_export(ckpt, fmt, dtype=dtype, merge=merge, max_shard_size=max_shard_size,
                                adapter_format=adapter_format)
    _check_paths(ckpt, out)
    stored = stored_params(ckpt, config)
    source = read_source(ckpt)
    scale = config.lora.scale if config.lora is not None else 0.0
    priors = json.dumps([dataclasses.asdict(p) for p in config.priors])
    metadata = {prior_file(p): {**_PT, "prior_position": config.prior_position, "prior_name": p.name,
                                "prior_dim": str(p.dim), "prior_index": str(i), "priors": priors}
                for i, p in enumerate(config.priors)}
    with StagedDirectory(out, overwrite=overwrite) as staged:
        files = _Files(staged.staging, items, metadata)
        try:
            _stream(ckpt, items, stored, files, scale, read_bytes, progress)
            files.close()
        except BaseException:
            files.abort()
            raise
        _write_configs(staged.staging, ckpt, fmt, config, items, source)
        return staged.publish()


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n")


def _write_configs(folder: Path, ckpt: Path, fmt: str, config: EmolaConfig, items: list[Item],
                   source: dict[str, Any]) -> None:
    if fmt == "hf":
        hf_config.to_transformers(hf_config.llava_to_hf(config, config.dtype)).to_json_file(folder / "config.json")
        side = {prior_file(p) for p in config.priors}
        shards = sorted({i.file for i in items if i.file not in side})
        if len(shards) > 1:
            weights = [i for i in items if i.file not in side]
            _write_json(folder / "model.safetensors.index.json", {
                "metadata": {"total_size": sum(nbytes(i.dtype, i.shape) for i in weights)},
                "weight_map": {i.key: i.file for i in weights},
            })
        tokenizer = ckpt / TOKENIZER_DIR
        if tokenizer.is_dir():
            for f in sorted(tokenizer.iterdir()):
                if f.is_file():
                    shutil.copy2(f, folder / f.name)
    elif fmt == "peft":
        base = source.get("src") if source.get("format") == "llava-hf" else None
        _write_json(folder / ADAPTER_CONFIG, to_peft_config(
            config.lora, target_modules=target_regex(config.lora, r"(.*\.)?language_model\.layers"),
            task_type=None, base=base, modules_to_save=list(tables.PEFT_MODULES_TO_SAVE)))
    else:
        _write_json(folder / ADAPTER_CONFIG, to_peft_config(
            config.lora, target_modules=list(config.lora.targets), task_type="CAUSAL_LM", base=source.get("base")))
        _write_json(folder / "config.json", hf_config.run_to_hf(
            config, config.dtype, pad_to_square=source.get(PAD_TO_SQUARE)))
