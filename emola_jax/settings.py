"""The vocabulary of settings: every choice set once, as a `Literal` alias, and the range checks.

A config class annotates its field with the alias (`dtype: Dtype`), so that `--set` and config
files are checked against it (`config.convert`); `run.py` builds its `choices=` from the same
alias (`choices(Dtype)`), so `--help` and the configs cannot drift apart.
"""

from __future__ import annotations

import math
import numbers
import typing
from typing import Any, Literal

Dtype = Literal["float32", "bfloat16", "float16"]  # weight storage and compute dtypes every command accepts
Quantize = Literal["none", "int8", "nf4"]  # how the frozen decoder kernels are stored ("none": as they are)
PriorPosition = Literal["after", "before", "off"]  # where the prior tokens go ("off": plain LLaVA-1.5)
FeatureSelect = Literal["default", "full"]  # LLaVA's vision_feature_select_strategy
RopeType = Literal["default", "linear", "dynamic", "llama3"]  # the Hugging Face rope types LLaMA-2/3 use
Schedule = Literal["cosine", "constant"]
Remat = Literal["none", "full", "dots", "offload"]
Attention = Literal["auto", "xla", "cudnn", "blockwise", "splash"]
OnNonfinite = Literal["skip", "stop"]  # a step whose loss or gradients are not finite
OnBadRecord = Literal["error", "skip"]
Recipe = Literal["official", "insightface"]  # how 2d106det's crop and normalisation are made
EmotionTask = Literal["emotion", "rafdb"]  # FABA-Bench's emotion set, RAF-DB
AuTask = Literal["au", "bp4d", "disfa", "gft"]  # FABA-Bench's AU set, BP4D, DISFA, GFT
Task = Literal[EmotionTask, AuTask]  # what `evaluate` scores
Detector = Literal["hog", "cnn", "insightface"]  # dlib's HOG and CNN face detectors, insightface's SCRFD
KeyframeRule = Literal["both", "every", "peaks"]  # which frames of a tracked face the model is asked about
Protocol = Literal["official", "rouge-score"]  # how REGE's ROUGE is computed
ExportFormat = Literal["hf", "peft", "emola"]
AdapterFormat = Literal["safetensors", "bin"]


def choices(alias: Any) -> tuple[str, ...]:
    """The values of a `Literal` alias, in order (for `argparse`'s `choices=`)."""
    return typing.get_args(alias)


def check_choice(value: Any, alias: Any, name: str) -> None:
    """Raises ValueError naming `name` and the choices when `value` is not one of `alias`'s."""
    if value not in choices(alias):
        raise ValueError(f"{name} must be one of {', '.join(choices(alias))}, not {value!r}")


def check_ranges(config: Any, *, positive: tuple[str, ...] = (), above_zero: tuple[str, ...] = (),
                 at_least_zero: tuple[str, ...] = (), fraction: tuple[str, ...] = ()) -> None:
    """Range checks for a config dataclass's `__post_init__`, so that a config file and `--set`
    both get them: `positive` sizes and counts (>= 1), `above_zero` and `at_least_zero` numbers,
    `fraction`s in [0, 1]. A field that is None (off) is not checked."""
    rules = [(positive, lambda v: v >= 1, "at least 1"), (above_zero, lambda v: v > 0, "above 0"),
             (at_least_zero, lambda v: v >= 0, "at least 0"), (fraction, lambda v: 0 <= v <= 1, "between 0 and 1")]
    for names, ok, wanted in rules:
        for name in names:
            value = getattr(config, name)
            if value is not None and not (isinstance(value, numbers.Real) and not math.isnan(value) and ok(value)):
                raise ValueError(f"{name} must be {wanted}, not {value!r}")
