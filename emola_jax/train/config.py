"""What a training run is: the model, the data, and how to train (one object per config file)."""

from __future__ import annotations

import dataclasses
from typing import Any

from emola_jax.config import EmolaConfig, LoRAConfig, PriorToken, check_priors, prior_width, upgrade_prior_dim
from emola_jax.models.tree import LORA_PATTERN, PRIOR_PROJECTOR_PATTERN, PROJECTOR_PATTERN
from emola_jax.settings import (
    Attention,
    Dtype,
    OnNonfinite,
    PriorPosition,
    Quantize,
    Remat,
    Schedule,
    check_choice,
    check_ranges,
    choices,
)
from emola_jax.sharding import MeshConfig

# (path regex, learning rate): the first pattern a weight's '/'-joined path matches decides;
# `None` freezes it; weights no pattern matches are frozen.
EMOLA_TRAINABLE: tuple[tuple[str, float | None], ...] = (
    (LORA_PATTERN, 1e-4),
    (PRIOR_PROJECTOR_PATTERN, 1e-4),
    (PROJECTOR_PATTERN, 2e-5),
)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Optimiser, schedule, parallelism, checkpoints. Defaults are EmoLA's (see the paper's setup)."""

    base: str | None = None  # converted checkpoint the run starts from and keeps frozen
    steps: int = 1000  # optimiser updates
    grad_accum_steps: int = 1  # micro-batches per update (the data config's batch is per micro-batch)
    trainable: tuple[tuple[str, float | None], ...] = EMOLA_TRAINABLE
    schedule: Schedule = "cosine"
    warmup_ratio: float = 0.03
    weight_decay: float = 0.0
    adam_b1: float = 0.9
    adam_b2: float = 0.999
    adam_eps: float = 1e-8
    max_grad_norm: float | None = 1.0
    remat: Remat = "full"
    attention: Attention = "auto"
    # QLoRA: the frozen decoder kernels stored quantised on device (emola_jax/quantization.py)
    base_quantization: Quantize = "none"
    quantization_block_size: int = 64  # inputs per scale (0: one scale per output channel)
    mesh: MeshConfig = MeshConfig()
    on_nonfinite: OnNonfinite = "skip"
    checkpoint_every: int = 500
    keep_checkpoints: int = 3
    log_every: int = 1
    seed: int = 0

    def __post_init__(self):
        check_choice(self.on_nonfinite, OnNonfinite, "train.on_nonfinite")
        check_choice(self.schedule, Schedule, "train.schedule")
        check_choice(self.remat, Remat, "train.remat")
        check_choice(self.attention, Attention, "train.attention")
        if self.base_quantization not in choices(Quantize):
            raise ValueError(f"train.base_quantization {self.base_quantization!r} is unknown; choose one of "
                             f"{', '.join(choices(Quantize))}")
        if not isinstance(self.quantization_block_size, int) or self.quantization_block_size < 0:
            raise ValueError(f"train.quantization_block_size must be a whole number at least 0 (0: one scale per "
                             f"output channel), not {self.quantization_block_size!r}")
        check_ranges(self, positive=("steps", "grad_accum_steps", "checkpoint_every", "keep_checkpoints", "log_every"),
                     fraction=("warmup_ratio",), at_least_zero=("weight_decay", "adam_eps"),
                     above_zero=("max_grad_norm",))
        for name in ("adam_b1", "adam_b2"):
            if not 0 <= getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 0 and below 1, not {getattr(self, name)!r}")
        # `--set` hands over JSON lists; keep the field hashable and uniform
        object.__setattr__(self, "trainable", tuple((str(p), lr) for p, lr in self.trainable))
        for pattern, rate in self.trainable:
            if rate is not None and not rate >= 0:
                raise ValueError(f"the learning rate of trainable pattern {pattern!r} must be at least 0 (or null: "
                                 f"frozen), not {rate!r}")


@dataclasses.dataclass(frozen=True)
class FromBase:
    """The model section of a run that starts from `train.base`: only what training adds. The
    towers, vocabulary, token ids and every other architecture field are the base's, so no
    setting here can be silently overridden by the base."""

    lora: LoRAConfig | None = LoRAConfig()
    prior_position: PriorPosition = "after"
    priors: tuple[PriorToken, ...] = (PriorToken(),)
    visual_tokens: bool = True
    dtype: Dtype = "float32"

    UPGRADE = staticmethod(upgrade_prior_dim)  # `"prior_dim": N` of older files

    def __post_init__(self):
        check_choice(self.dtype, Dtype, "dtype")
        check_priors(self)

    @property
    def prior_dim(self) -> int:
        """Width of the prior input, as `EmolaConfig.prior_dim`."""
        return prior_width(self.priors)

    @classmethod
    def of(cls, model: EmolaConfig) -> FromBase:
        """The additions a full model config makes (e.g. to train it from a base built from it)."""
        return cls(**{f.name: getattr(model, f.name) for f in dataclasses.fields(cls)})

    def apply_to(self, base: EmolaConfig) -> EmolaConfig:
        """The model to train: `base` with these additions."""
        return base.replace(**{f.name: getattr(self, f.name) for f in dataclasses.fields(self)})


def planned_model(model: EmolaConfig | FromBase) -> EmolaConfig:
    """The whole model a config describes, for plans made without its base on disk: a `FromBase`
    model goes over LLaVA-1.5-7B's architecture (`EmolaConfig`'s defaults)."""
    return model.apply_to(EmolaConfig()) if isinstance(model, FromBase) else model


@dataclasses.dataclass(frozen=True)
class Experiment:
    """A config file's `get_config()`: `model`, `data` (the input pipeline's config) and `train`.

    `model` is a whole `EmolaConfig` when the run starts from random weights, or `FromBase` (what
    training adds) when `train.base` is set; a whole `EmolaConfig` with a base must then agree
    with the base on every architecture field (`emola_jax.train.init.training_config`)."""

    model: EmolaConfig | FromBase
    train: TrainConfig = TrainConfig()
    data: Any = None
