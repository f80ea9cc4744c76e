"""The one mapping table between this project's weights and PyTorch keys, used both ways.

Each `ParamRule` ties a model path to a *canonical* PyTorch key (transformers 5's in-memory
`LlavaForConditionalGeneration` names; `{i}` stands for the layer index) and a `Transform` with a
forward (PyTorch -> JAX) and an inverse. A `Layout` then renames canonical keys into the names a
given file format uses (llava-hf, original LLaVA, CLIP, PEFT, official EmoLA) by prefix. Import
and export read the same rules, so they cannot drift apart.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np

from emola_jax.config import EmolaConfig, PriorToken
from emola_jax.models.tree import is_stacked, param_shapes
from emola_jax.weights import Path_


@dataclasses.dataclass(frozen=True)
class Transform:
    name: str
    to_jax: Callable[[np.ndarray], np.ndarray]
    to_torch: Callable[[np.ndarray], np.ndarray]


# Written for numpy and jax arrays alike; the importer runs them under jit (XLA's tiled,
# multi-threaded transposes are many times faster than numpy's).
IDENTITY = Transform("identity", lambda x: x, lambda x: x)
TRANSPOSE = Transform("transpose", lambda x: x.T, lambda x: x.T)
# torch Conv2d weight [out, in, h, w] <-> flax HWIO [h, w, in, out]
CONV = Transform("conv_oihw_to_hwio", lambda x: x.transpose(2, 3, 1, 0), lambda x: x.transpose(3, 2, 0, 1))

# Top-level modules of the model -> canonical key prefix (a further prior's projector,
# `prior_projector_<name>`, is `model.prior_projector_<name>.`: `module_prefix`).
MODULE_PREFIXES = {
    "vision_tower": "model.vision_tower.",
    "multi_modal_projector": "model.multi_modal_projector.",
    "prior_projector": "model.prior_projector.",
    "language_model": "model.language_model.",
    "lm_head": "lm_head.",
}
# Leaf name -> (torch leaf name, transform). `None` as leaf keeps no suffix (class_embedding).
LEAVES = {
    "kernel": ("weight", TRANSPOSE),
    "bias": ("bias", IDENTITY),
    "scale": ("weight", IDENTITY),
    "embedding": ("weight", IDENTITY),
    "lora_a": ("lora_A.weight", TRANSPOSE),
    "lora_b": ("lora_B.weight", TRANSPOSE),
}
SPECIAL = {
    ("vision_tower", "embeddings", "patch_embedding"): ("embeddings.patch_embedding.weight", CONV),
    ("vision_tower", "embeddings", "class_embedding"): ("embeddings.class_embedding", IDENTITY),
}


@dataclasses.dataclass(frozen=True)
class ParamRule:
    path: Path_  # model path; stacked weights keep one entry with `num_layers` set
    key: str  # canonical PyTorch key, with "{i}" for the layer index when stacked
    transform: Transform
    shape: tuple[int, ...]  # JAX-side shape of one layer's tensor (or of the whole weight)
    num_layers: int | None = None
    is_lora: bool = False

    def keys(self) -> list[tuple[str, int | None]]:
        if self.num_layers is None:
            return [(self.key, None)]
        return [(self.key.format(i=i), i) for i in range(self.num_layers)]

    @property
    def torch_shape(self) -> tuple[int, ...]:
        return self.transform.to_torch(np.empty(self.shape, np.bool_)).shape


def module_prefix(module: str) -> str:
    """The canonical key prefix of a top-level module; KeyError for a module the table lacks."""
    if module in MODULE_PREFIXES:
        return MODULE_PREFIXES[module]
    if module.startswith("prior_projector_"):
        return f"model.{module}."
    raise KeyError(module)


def canonical_key(path: Path_) -> tuple[str, Transform]:
    module, rest = path[0], path[1:]
    prefix = module_prefix(module)
    if path in SPECIAL:
        suffix, transform = SPECIAL[path]
        return prefix + suffix, transform
    leaf, transform = LEAVES[rest[-1]]
    names = [("layers.{i}" if p == "layers" else p) for p in rest[:-1]]
    return prefix + ".".join(names + [leaf]), transform


def rules(config: EmolaConfig) -> list[ParamRule]:
    """The table for one model config, derived from the model's own parameter tree."""
    out = []
    for path, spec in param_shapes(config).items():
        key, transform = canonical_key(path)
        stacked = is_stacked(path)
        out.append(
            ParamRule(
                path=path,
                key=key,
                transform=transform,
                shape=tuple(spec.shape[1:] if stacked else spec.shape),
                num_layers=spec.shape[0] if stacked else None,
                is_lora=path[-1] in ("lora_a", "lora_b"),
            )
        )
    return out


@dataclasses.dataclass(frozen=True)
class Layout:
    """How one file format spells canonical keys: ordered (canonical prefix, file prefix) pairs."""

    name: str
    prefixes: tuple[tuple[str, str], ...]

    def to_file(self, canonical: str) -> str | None:
        for ours, theirs in self.prefixes:
            if canonical.startswith(ours):
                return theirs + canonical[len(ours):]
        return None

    def to_canonical(self, file_key: str) -> str | None:
        for ours, theirs in self.prefixes:
            if file_key.startswith(theirs):
                return ours + file_key[len(theirs):]
        return None


_TEXT_AND_HEAD = (("model.language_model.", "model.language_model."), ("lm_head.", "lm_head."))
LLAVA_HF_V5 = Layout(
    "llava-hf (transformers 5 names)",
    (("model.vision_tower.", "model.vision_tower."), ("model.multi_modal_projector.", "model.multi_modal_projector."))
    + _TEXT_AND_HEAD,
)
LLAVA_HF_V5_NESTED = Layout(
    "llava-hf (transformers 5 names, nested vision_model)",
    (("model.vision_tower.", "model.vision_tower.vision_model."),) + LLAVA_HF_V5.prefixes[1:],
)
_LEGACY_TEXT = (
    ("model.multi_modal_projector.", "multi_modal_projector."),
    ("model.language_model.", "language_model.model."),
    ("lm_head.", "language_model.lm_head."),
)
LLAVA_HF_LEGACY = Layout(
    "llava-hf (language_model.model.*, vision_tower.vision_model.*)",
    (("model.vision_tower.", "vision_tower.vision_model."),) + _LEGACY_TEXT,
)
# What transformers 5's `save_pretrained` writes for LlavaForConditionalGeneration: export writes this.
LLAVA_HF_SAVED = Layout(
    "llava-hf (language_model.model.*, vision_tower.*)",
    (("model.vision_tower.", "vision_tower."),) + _LEGACY_TEXT,
)
LLAVA_ORIGINAL = Layout(
    "LLaVA-1.5 original (model.layers.*, model.mm_projector.*)",
    (
        ("model.vision_tower.", "model.vision_tower.vision_tower.vision_model."),
        ("model.multi_modal_projector.linear_1.", "model.mm_projector.0."),
        ("model.multi_modal_projector.linear_2.", "model.mm_projector.2."),
        ("model.prior_projector.linear_1.", "model.landmark_feature_projector.0."),
        ("model.prior_projector.linear_2.", "model.landmark_feature_projector.2."),
        ("model.language_model.", "model."),
        ("lm_head.", "lm_head."),
    ),
)
CLIP = Layout("CLIP (vision_model.*)", (("model.vision_tower.", "vision_model."),))
CLIP_VISION_ONLY = Layout("CLIPVisionModel (embeddings.*, encoder.*)", (("model.vision_tower.", ""),))
# PEFT prefixes the wrapped model's keys with "base_model.model."; EmoLA wraps LLaVA's own layout.
PEFT_EMOLA = Layout("PEFT adapter on LLaVA", (("model.language_model.", "base_model.model.model."),))
# PEFT on transformers' LlavaForConditionalGeneration (module names model.language_model.layers.*).
PEFT_LLAVA_HF = Layout(
    "PEFT adapter on llava-hf", (("model.language_model.", "base_model.model.model.language_model."),
                                 ("model.multi_modal_projector.", "base_model.model.model.multi_modal_projector."))
)
# modules a PEFT export carries whole (`modules_to_save`): what EmoLA trains beside the adapters
# inside transformers' LLaVA; PEFT saves them under their module path, without its wrapper's
# `modules_to_save.default.`
PEFT_MODULES_TO_SAVE = ("multi_modal_projector",)


def prior_file_layout(prior: PriorToken) -> Layout:
    """A prior projector beside a llava-hf export: a bare mlp2x_gelu (linear_1.*, linear_2.*)."""
    name = "prior projector" if prior.official else f"{prior.name} prior projector"
    return Layout(f"{name} (linear_1.*, linear_2.*)", ((f"model.{prior.projector_name}.", ""),))


def emola_landmark_module(prior: PriorToken) -> str:
    """The module name of a prior projector in the official EmoLA layout: `landmark_feature_projector`
    for 2d106det (the official one), `landmark_feature_projector_<name>` for a further prior."""
    return "landmark_feature_projector" + ("" if prior.official else f"_{prior.name}")


def emola_landmark_layout(prior: PriorToken) -> Layout:
    """A prior projector in the official EmoLA layout (`model.<module>.0.*`, `model.<module>.2.*`)."""
    module, ours = emola_landmark_module(prior), f"model.{prior.projector_name}."
    return Layout(f"EmoLA {module}",
                  ((ours + "linear_1.", f"model.{module}.0."), (ours + "linear_2.", f"model.{module}.2.")))


PRIOR_PROJECTOR_FILE = prior_file_layout(PriorToken())
# non_lora_trainables.bin of an official EmoLA run: LLaVA's layout, PEFT-prefixed.
EMOLA_NON_LORA = Layout(
    "EmoLA non_lora_trainables",
    tuple((ours, "base_model.model." + theirs) for ours, theirs in LLAVA_ORIGINAL.prefixes),
)
EMOLA_LANDMARK = emola_landmark_layout(PriorToken())
LLAVA_HF_LAYOUTS = (LLAVA_HF_V5, LLAVA_HF_V5_NESTED, LLAVA_HF_LEGACY, LLAVA_HF_SAVED)

# Keys a source may carry that this model does not use; anything else unknown is an error.
IGNORED_KEY_PATTERNS = (
    r"(^|\.)text_model\.", r"^logit_scale$", r"^text_projection\.", r"^visual_projection\.",
    r"\.position_ids$", r"\.rotary_emb\.inv_freq$",
)
