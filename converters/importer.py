"""PyTorch checkpoints -> emola-jax checkpoints, one tensor at a time.

Every key of every source is accounted for before any data is read: a key the model needs and
no file has, a key no rule claims, and a tensor whose shape does not match the config are all
errors that name the key and the file. Only then are tensors streamed through the mapping
table into a `CheckpointWriter`, which publishes the checkpoint with a single rename at the end.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from converters import formats, hf_config, tables
from converters.readers import TensorStore, weight_files
from emola_jax import weights
from emola_jax.atomic import check_apart
from emola_jax.checkpoint import PAD_TO_SQUARE, CheckpointWriter
from emola_jax.config import DEFAULT_PRIOR, EmolaConfig, PriorToken, VisionConfig
from emola_jax.models.clip import CLIPVisionModel
from emola_jax.models.tree import is_stacked, layer_path
from emola_jax.progress import bar as progress_bar
from emola_jax.settings import Dtype, check_choice

_IGNORED = re.compile("|".join(tables.IGNORED_KEY_PATTERNS))


@dataclasses.dataclass
class Source:
    """A set of files and the layouts that name their keys (tried in order)."""

    label: str
    store: TensorStore
    layouts: tuple[tables.Layout, ...]

    def to_canonical(self, key: str) -> str | None:
        for layout in self.layouts:
            canonical = layout.to_canonical(key)
            if canonical is not None:
                return canonical
        return None


@dataclasses.dataclass(frozen=True)
class Assignment:
    rule: tables.ParamRule
    layer: int | None
    source: Source
    key: str

    @property
    def path(self):
        return self.rule.path if self.layer is None else layer_path(self.rule.path, self.layer)


def resolve(config: EmolaConfig, sources: list[Source]) -> list[Assignment]:
    """Matches every weight of the model to one file key; later sources override earlier ones."""
    wanted = {key: (rule, layer) for rule in tables.rules(config) for key, layer in rule.keys()}
    tied_head = "lm_head.weight" if config.text.tie_word_embeddings else None
    found: dict[str, tuple[Source, str]] = {}
    for source in sources:
        for key in source.store.keys():
            canonical = source.to_canonical(key)
            if canonical in wanted:
                found[canonical] = (source, key)
            elif canonical != tied_head and not _IGNORED.search(key):
                raise KeyError(
                    f"unknown key {key!r} in {source.store.file_of(key)}: no weight of this model "
                    f"({source.label}) maps to it"
                )
    missing = [k for k in wanted if k not in found]
    if missing:
        files = ", ".join(str(p) for s in sources for p in s.store.paths)
        raise KeyError(f"weight {missing[0]!r} (and {len(missing) - 1} more) is missing from {files}")
    plan = []
    for canonical, (rule, layer) in wanted.items():
        source, key = found[canonical]
        shape = source.store.shape(key)
        if tuple(shape) != rule.torch_shape:
            raise ValueError(
                f"tensor {key!r} in {source.store.file_of(key)} has shape {tuple(shape)}, "
                f"the config needs {rule.torch_shape}"
            )
        plan.append(Assignment(rule, layer, source, key))
    return plan


def _clip_source(clip: Path | None, needed_by: Path) -> tuple[Source, VisionConfig]:
    if clip is None:
        raise ValueError(f"{needed_by} does not carry the vision tower: pass the CLIP directory with --clip")
    store = TensorStore(weight_files(clip))
    layout = tables.CLIP if "vision_model.embeddings.class_embedding" in store else tables.CLIP_VISION_ONLY
    vision = hf_config.clip_from_hf(formats.read_json(clip / "config.json"))
    return Source(f"CLIP vision tower from {clip}", store, (layout,)), vision


def _llava_hf_source(src: Path) -> Source:
    store = TensorStore(weight_files(src))
    for layout in tables.LLAVA_HF_LAYOUTS:
        if layout.to_file("model.language_model.embed_tokens.weight") in store and (
            layout.to_file("model.vision_tower.embeddings.class_embedding") in store
        ):
            return Source(f"{layout.name} from {src}", store, (layout,))
    raise KeyError(f"{src}: the weights follow none of the known llava-hf key layouts")


def _base(src: Path, clip: Path | None, dtype: str) -> tuple[EmolaConfig, list[Source]]:
    kind = formats.detect(src)
    if kind == "llava-hf":
        return formats.llava_hf_config(src, dtype), [_llava_hf_source(src)]
    if kind == "llava":
        clip_source, vision = _clip_source(clip, src)
        config = formats.llava_original_config(src / "config.json", vision, dtype)
        base = Source(f"LLaVA-1.5 from {src}", TensorStore(weight_files(src)), (tables.LLAVA_ORIGINAL,))
        return config, [base, clip_source]
    raise ValueError(f"{src} is an EmoLA run directory, not a base model; pass it as SRC with --base")


def _adapter_files(run: Path) -> list[Path]:
    for name in ("adapter_model.safetensors", "adapter_model.bin"):
        if (run / name).is_file():
            return [run / name]
    raise FileNotFoundError(f"{run} has adapter_config.json but no adapter_model.safetensors or adapter_model.bin")


def _emola(run: Path, base: Path | None, clip: Path | None, dtype: str) -> tuple[EmolaConfig, list[Source]]:
    """An official EmoLA run: base LLaVA + non_lora_trainables + PEFT adapter + landmark projector."""
    if base is None:
        raise ValueError(f"{run} is an EmoLA run directory: pass its base LLaVA-1.5 checkpoint with --base")
    base_config, sources = _base(base, clip, dtype)
    run_config = formats.read_json(run / "config.json")
    if "mm_projector_type" in run_config:  # the run's own config governs, as the official loader does
        base_config = formats.llava_original_config(run / "config.json", base_config.vision, dtype).replace(
            image_token_id=base_config.image_token_id
        )
    sources.append(
        Source(
            f"EmoLA non_lora_trainables from {run}",
            TensorStore([run / "non_lora_trainables.bin"]),
            (tables.EMOLA_NON_LORA, tables.LLAVA_ORIGINAL),
        )
    )
    landmark_file = run / "landmark_feature_projector.bin"
    if landmark_file.is_file():
        # The official loader keeps whatever follows "landmark_feature_projector.", whatever precedes it.
        landmark = TensorStore([landmark_file])
        marker = "landmark_feature_projector."
        prefixes = sorted({k[: k.index(marker)] for k in landmark.keys() if marker in k})
        layouts = tuple(
            tables.Layout(
                f"landmark projector ({p or 'no prefix'})",
                tuple((ours, p + theirs.removeprefix("model.")) for ours, theirs in tables.EMOLA_LANDMARK.prefixes),
            )
            for p in prefixes
        )
        sources.append(Source(f"EmoLA landmark projector from {run}", landmark, layouts))
    priors = hf_config.priors_from_hf(run_config, where=str(run / "config.json"))
    for prior in priors or ():  # further priors: exported beside the official file (`exporter.landmark_file`)
        if not prior.official:
            file = run / f"{tables.emola_landmark_module(prior)}.bin"
            if not file.is_file():
                raise FileNotFoundError(f"{run / 'config.json'} lists the prior {prior.name!r} but {file} is missing")
            sources.append(Source(f"EmoLA {prior.name} prior projector from {run}", TensorStore([file]),
                                  (tables.emola_landmark_layout(prior),)))
    sources.append(Source(f"PEFT LoRA adapter from {run}", TensorStore(_adapter_files(run)), (tables.PEFT_EMOLA,)))
    priors = priors or (PriorToken(DEFAULT_PRIOR, _prior_dim(sources)),)
    lora = formats.lora_config_from_peft(run / "adapter_config.json", base_config.text.num_hidden_layers)
    config = base_config.replace(prior_position="after", priors=priors, lora=lora)
    return config, sources


def _prior_dim(sources: list[Source]) -> int:
    for source in reversed(sources):
        for key in source.store.keys():
            if source.to_canonical(key) == "model.prior_projector.linear_1.weight":
                return int(source.store.shape(key)[1])
    raise KeyError("the EmoLA run has no landmark_feature_projector weights (landmark_feature_projector.bin)")


def _local(src, clip, base) -> tuple[Path, Path | None, Path | None]:
    """The three sources as local folders (hub ids looked up in the Hugging Face cache)."""
    return (formats.local_directory(src), clip and formats.local_directory(clip, "--clip"),
            base and formats.local_directory(base, "--base"))


def plan_conversion(
    src: str | Path, *, clip: str | Path | None = None, base: str | Path | None = None, dtype: str = "float32"
) -> tuple[EmolaConfig, list[Assignment], dict]:
    src, clip, base = _local(src, clip, base)
    check_choice(dtype, Dtype, "dtype")
    kind = formats.detect(src)
    if kind == "emola":
        config, sources = _emola(src, base, clip, dtype)
    else:
        config, sources = _base(src, clip, dtype)
    plan = resolve(config, sources)
    provenance = {
        "format": kind,
        "src": str(src.resolve()),
        "base": str(base.resolve()) if base else None,
        "clip": str(clip.resolve()) if clip else None,
        "files": [str(p) for s in sources for p in s.store.paths],
        "layouts": [layout.name for s in sources for layout in s.layouts],
    }
    # an original LLaVA / EmoLA run says how its training images were preprocessed (llava-hf does not)
    pad = hf_config.pad_from_hf(formats.read_json(src / "config.json"))
    if pad is not None:
        provenance[PAD_TO_SQUARE] = pad
    return config, plan, provenance


def convert(
    src: str | Path,
    out: str | Path,
    *,
    clip: str | Path | None = None,
    base: str | Path | None = None,
    dtype: str = "float32",
    overwrite: bool = False,
    progress: bool = True,
) -> Path:
    """Writes an emola-jax checkpoint for `src` at `out`; returns `out`. `src`, `clip` and `base` are
    folders or hub ids in the local Hugging Face cache (`formats.local_directory`)."""
    src, clip, base = _local(src, clip, base)
    check_apart("OUT", out, {"the source": src, "--clip": clip, "--base": base})
    config, plan, provenance = plan_conversion(src, clip=clip, base=base, dtype=dtype)
    tokenizer = formats.tokenizer_files(src, base)
    with CheckpointWriter(out, overwrite=overwrite) as writer, ThreadPoolExecutor(1) as reader:
        # Read tensor k+1 (file I/O) while tensor k is transposed and cast (XLA), and an earlier
        # group is written (orbax): one tensor of look-ahead keeps the memory bounded.
        upcoming = reader.submit(plan[0].source.store.read, plan[0].key)
        for i, item in enumerate(progress_bar(iterable=plan, desc="converting", unit="tensor", enabled=progress)):
            array = upcoming.result()
            if i + 1 < len(plan):
                upcoming = reader.submit(plan[i + 1].source.store.read, plan[i + 1].key)
            target = jnp.float32 if item.rule.is_lora else jnp.dtype(config.dtype)
            writer.add(item.path, _to_model_layout(array, item.rule.transform, target))
            del array
        return writer.finish(config, provenance, tokenizer)


@functools.partial(jax.jit, static_argnums=(1, 2))
def _to_model_layout(array: jax.Array, transform: tables.Transform, dtype: jnp.dtype) -> jax.Array:
    return transform.to_jax(array).astype(dtype)


def load_clip_vision(clip: str | Path, dtype: str = "float32") -> tuple[CLIPVisionModel, VisionConfig]:
    """A CLIP vision tower straight from a transformers CLIP directory or cached hub id (small: read
    in memory)."""
    clip = formats.local_directory(clip, "CLIP")
    source, vision = _clip_source(clip, clip)
    model = weights.abstract(lambda rngs: CLIPVisionModel(vision, dtype=jnp.dtype(dtype), rngs=rngs))
    layout = source.layouts[0]
    values = {}
    for path, spec in weights.flat(model).items():
        key, transform = tables.canonical_key(("vision_tower",) + path)
        if is_stacked(path):
            value = np.stack([_read(source, layout.to_file(key.format(i=i)), transform) for i in range(spec.shape[0])])
        else:
            value = _read(source, layout.to_file(key), transform)
        values[path] = jax.device_put(value.astype(jnp.dtype(dtype)))
    return weights.from_flat(model, values, source=f"the CLIP weights in {clip}"), vision


def _read(source: Source, key: str, transform: tables.Transform) -> np.ndarray:
    if key not in source.store:
        raise KeyError(f"weight {key!r} is missing from {', '.join(map(str, source.store.paths))}")
    return np.asarray(transform.to_jax(source.store.read(key)))
