"""Typed, hashable model configuration.

Configs are frozen dataclasses so that NNX modules can keep them as static attributes (they end
up in the graphdef, which jit hashes). Field names follow Hugging Face's `LlavaConfig`,
`CLIPVisionConfig` and `LlamaConfig` so that a converter is mostly a copy.
"""

from __future__ import annotations

import dataclasses
import json
import re
import types
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal, Union

from emola_jax.settings import Dtype, FeatureSelect, PriorPosition, RopeType, check_choice, check_ranges, choices

# insightface 2d106det: 106 (x, y) landmarks, flattened.
LANDMARK_DIM = 212
DEFAULT_PRIOR = "2d106det"  # the prior official EmoLA uses; its projector keeps the official names
PRIOR_NAME = re.compile(r"[A-Za-z0-9_-]+")  # a prior's name is part of weight paths and file names


@dataclasses.dataclass(frozen=True)
class VisionConfig:
    """CLIP vision transformer (defaults: ViT-L/14 at 336 px)."""

    hidden_size: int = 1024
    intermediate_size: int = 4096
    num_hidden_layers: int = 24
    num_attention_heads: int = 16
    image_size: int = 336
    patch_size: int = 14
    num_channels: int = 3
    layer_norm_eps: float = 1e-5
    hidden_act: str = "quick_gelu"

    def __post_init__(self):
        check_ranges(self, positive=("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                                     "image_size", "patch_size", "num_channels"), above_zero=("layer_norm_eps",))

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """The Hugging Face rope types that LLaMA-2 and LLaMA-3 checkpoints use."""

    rope_type: RopeType = "default"
    factor: float = 1.0
    original_max_position_embeddings: int | None = None
    low_freq_factor: float | None = None
    high_freq_factor: float | None = None

    def __post_init__(self):
        check_ranges(self, above_zero=("factor", "low_freq_factor", "high_freq_factor"),
                     positive=("original_max_position_embeddings",))
        if self.rope_type not in choices(RopeType):
            raise ValueError(f"rope type {self.rope_type!r} is not supported; supported: "
                             f"{', '.join(choices(RopeType))}")


@dataclasses.dataclass(frozen=True)
class TextConfig:
    """LLaMA decoder (defaults: Vicuna-7B v1.5)."""

    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int = 32
    head_dim: int | None = None
    max_position_embeddings: int = 4096
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling = RopeScaling()
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    hidden_act: str = "silu"

    # a field whose None means "derived from the others": compared by its resolved value (`differences`)
    DERIVED = {"head_dim": "resolved_head_dim"}

    def __post_init__(self):
        check_ranges(self, positive=("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                                     "num_attention_heads", "num_key_value_heads", "head_dim",
                                     "max_position_embeddings"), above_zero=("rms_norm_eps", "rope_theta"))
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )
        if self.hidden_act != "silu":
            raise ValueError(f"decoder activation {self.hidden_act!r} is not supported (silu only)")

    @property
    def resolved_head_dim(self) -> int:
        return self.head_dim or self.hidden_size // self.num_attention_heads


# --- LoRA: which decoder projections carry an adapter (emola_jax/lora.py does the rest) ---------

# The decoder layer's linear projections, by their names inside a layer (transformers' LlamaDecoderLayer).
DECODER_LINEARS = (
    "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
    "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj",
)


def peft_matches(target_modules: str | Sequence[str], name: str, *, exclude_modules: str | Sequence[str] | None = None,
                 layers_to_transform: int | Sequence[int] | None = None,
                 layers_pattern: str | Sequence[str] | None = None) -> bool:
    """Whether PEFT attaches LoRA to the module called `name` (e.g. `model.layers.3.self_attn.q_proj`).

    PEFT's rules (`check_target_module_exists`): `exclude_modules` first, in the same two forms; a
    string `target_modules` is a regex that must match the whole name; a list entry matches a name
    equal to it (then every layer) or ending in `.` + it, and only for this last case
    `layers_to_transform` keeps the layers whose index follows `layers_pattern` (default: the first
    numbered segment) in the name.
    """
    if exclude_modules and _listed(exclude_modules, name):
        return False
    if isinstance(target_modules, str):
        return re.fullmatch(target_modules, name) is not None
    if name in target_modules:
        return True
    if not any(name.endswith(f".{target}") for target in target_modules):
        return False
    if layers_to_transform is None or (isinstance(layers_to_transform, list) and not layers_to_transform):
        return True
    patterns = [layers_pattern] if isinstance(layers_pattern, str) else list(layers_pattern or [])
    if patterns:
        match = next(filter(None, (re.match(rf"(?:^|.*?\.){p}\.(?P<idx>\d+)\.", name) for p in patterns)), None)
    else:
        match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", name)
    if match is None:
        return False
    index = int(match.group("idx"))
    return index == layers_to_transform if isinstance(layers_to_transform, int) else index in layers_to_transform


def _listed(names: str | Sequence[str], name: str) -> bool:
    if isinstance(names, str):
        return re.fullmatch(names, name) is not None
    return name in names or any(name.endswith(f".{n}") for n in names)


def check_targets(lora: LoRAConfig) -> None:
    """Every entry of `lora.targets` must name a decoder projection (PEFT's list form, matched
    against `self_attn.q_proj` ...); raises ValueError naming the entry otherwise."""
    for target in lora.targets:
        if not any(peft_matches([target], linear) for linear in DECODER_LINEARS):
            raise ValueError(f"LoRA target {target!r} names none of the decoder's projections "
                             f"({', '.join(DECODER_LINEARS)}); name them as PEFT does, e.g. q_proj or self_attn.q_proj")


@dataclasses.dataclass(frozen=True)
class LoRAConfig:
    """LoRA on decoder projections, as PEFT defines it (scale alpha/r, or alpha/sqrt(r)).

    `targets` follow the list form of PEFT's `target_modules` (`peft_matches`): each names a
    projection of every decoder layer by its name (`q_proj`) or its path in the layer
    (`self_attn.q_proj`).
    """

    rank: int = 128
    alpha: float = 256.0
    targets: tuple[str, ...] = (
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
    )
    use_rslora: bool = False
    dropout: float = 0.0  # PEFT's lora_dropout, on the adapter's input, in training only

    def __post_init__(self):
        if isinstance(self.targets, str):
            raise ValueError(f"LoRA targets must be a list of projection names, not the string {self.targets!r}")
        check_ranges(self, positive=("rank",), above_zero=("alpha",))
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout must be at least 0 and below 1, not {self.dropout!r}")
        check_targets(self)

    @property
    def scale(self) -> float:
        return self.alpha / (self.rank**0.5 if self.use_rslora else self.rank)


@dataclasses.dataclass(frozen=True)
class PriorToken:
    """One facial prior token: the registered prior whose feature feeds it (`name`) and that
    feature's width (`dim`). Its projector is `prior_projector` for the 2d106det prior (the
    official EmoLA weights) and `prior_projector_<name>` for any other (`projector_name`)."""

    name: str = DEFAULT_PRIOR
    dim: int = LANDMARK_DIM

    def __post_init__(self):
        if not isinstance(self.name, str) or not PRIOR_NAME.fullmatch(self.name):
            raise ValueError(f"a prior's name is letters, digits, '_' and '-' (it names weights and files), "
                             f"not {self.name!r}")
        check_ranges(self, positive=("dim",))

    @property
    def official(self) -> bool:
        """Whether this is official EmoLA's prior (`is_official`)."""
        return is_official(self.name)

    @property
    def projector_name(self) -> str:
        """The projector's attribute in the model, the first part of its weight paths."""
        return "prior_projector" if self.official else f"prior_projector_{self.name}"


def is_official(prior: str) -> bool:
    """The prior official EmoLA uses (2d106det): its projector, its exported weights, its feature
    files and messages keep the official names (`prior_projector`, `landmark_feature_projector`,
    `landmarks`); every other prior is named after itself."""
    return prior == DEFAULT_PRIOR


def prior_width(priors: tuple[PriorToken, ...]) -> int:
    """The width of several priors' features concatenated: the model's `prior_dim`."""
    return sum(p.dim for p in priors)


def check_priors(config: Any) -> None:
    """Checks shared by `EmolaConfig` and the train config's model section: a non-empty list of
    distinct priors, and something on the image side (visual tokens or a prior token)."""
    if isinstance(config.priors, (list, PriorToken)):  # a config file may give a list or one prior
        object.__setattr__(config, "priors", tuple(config.priors) if isinstance(config.priors, list)
                           else (config.priors,))
    if not isinstance(config.priors, tuple) or not all(isinstance(p, PriorToken) for p in config.priors):
        raise ValueError(f"priors must be a list of PriorToken (name, dim), not {config.priors!r}")
    if not config.priors:
        raise ValueError("priors must hold at least one prior; prior_position='off' is the model without one")
    names = [p.name for p in config.priors]
    if len(set(names)) < len(names):
        raise ValueError(f"priors must be distinct; {names} names one twice")
    if config.prior_position not in ("after", "before", "off"):
        raise ValueError(f"prior_position must be after, before or off, not {config.prior_position!r}")
    if not config.visual_tokens and config.prior_position == "off":
        raise ValueError("visual_tokens=false with prior_position='off' leaves no image-side token; keep one of them")


def upgrade_prior_dim(data: dict[str, Any]) -> dict[str, Any]:
    """A config dict as written before several priors: `"prior_dim": N` is one 2d106det prior of
    width N (`priors`); a dict that gives both is refused."""
    if "prior_dim" not in data:
        return data
    data = dict(data)
    dim = data.pop("prior_dim")
    if "priors" in data:
        raise ValueError("give priors or the older prior_dim, not both")
    data["priors"] = [{"name": DEFAULT_PRIOR, "dim": dim}]
    return data


@dataclasses.dataclass(frozen=True)
class EmolaConfig:
    """LLaVA-1.5 + facial prior tokens. `prior_position="off"` is plain LLaVA-1.5;
    `visual_tokens=False` drops the CLIP tokens (the image side is the prior tokens alone)."""

    vision: VisionConfig = VisionConfig()
    text: TextConfig = TextConfig()
    vision_feature_layer: int = -2
    vision_feature_select_strategy: FeatureSelect = "default"
    projector_hidden_act: str = "gelu"
    projector_bias: bool = True
    image_token_id: int = 32000
    prior_position: PriorPosition = "after"
    priors: tuple[PriorToken, ...] = (PriorToken(),)
    visual_tokens: bool = True
    lora: LoRAConfig | None = None
    dtype: Dtype = "float32"

    UPGRADE = staticmethod(upgrade_prior_dim)  # `build` applies it to a config dict first

    def __post_init__(self):
        check_choice(self.dtype, Dtype, "dtype")
        check_priors(self)
        check_choice(self.vision_feature_select_strategy, FeatureSelect, "vision_feature_select_strategy")
        if self.projector_hidden_act != "gelu":
            raise ValueError(f"projector activation {self.projector_hidden_act!r} is not supported (gelu only)")
        if not -(self.vision.num_hidden_layers + 1) <= self.vision_feature_layer <= self.vision.num_hidden_layers:
            raise ValueError(
                f"vision_feature_layer {self.vision_feature_layer} is outside the "
                f"{self.vision.num_hidden_layers + 1} hidden states of the vision tower"
            )

    @property
    def prior_dim(self) -> int:
        """Width of the model's prior input (`landmarks`): the priors' features concatenated in order."""
        return prior_width(self.priors)

    @property
    def num_prior_tokens(self) -> int:
        """Prior tokens per image: one per prior, none with `prior_position="off"`."""
        return 0 if self.prior_position == "off" else len(self.priors)

    @property
    def vision_layers_used(self) -> int:
        """Encoder layers that must run to reach the selected hidden state (the rest are skipped)."""
        layer = self.vision_feature_layer
        return layer if layer >= 0 else self.vision.num_hidden_layers + 1 + layer

    @property
    def num_visual_tokens(self) -> int:
        """CLIP tokens per image in the sequence (0 with `visual_tokens=False`)."""
        if not self.visual_tokens:
            return 0
        return self.vision.num_patches + (self.vision_feature_select_strategy == "full")

    @property
    def image_seq_length(self) -> int:
        """Image-token placeholders per image in `input_ids`: visual tokens plus the prior tokens."""
        return self.num_visual_tokens + self.num_prior_tokens

    def replace(self, **changes: Any) -> EmolaConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EmolaConfig:
        """The config of a `to_dict` dict, each field converted and checked by its type (`build`)."""
        return build(cls, data)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> EmolaConfig:
        try:
            return cls.from_dict(json.loads(Path(path).read_text()))
        except (json.JSONDecodeError, TypeError, ValueError) as err:
            raise ValueError(f"{path} is not a valid emola-jax config: {err}") from err


def differences(ours: Any, theirs: Any, prefix: str = "", skip: frozenset = frozenset()) -> list[str]:
    """`field: theirs there, ours here` for every leaf field of two config dataclasses that differs
    (a field a class lists in `DERIVED` by the value it resolves to, so None equals its default).
    `skip` holds dotted field names (`train.log_every`, or a whole group: `train.mesh`) left out."""
    out = []
    for field in dataclasses.fields(ours):
        if f"{prefix}{field.name}" in skip:
            continue
        derived = getattr(ours, "DERIVED", {}).get(field.name, field.name)  # e.g. head_dim None: its value
        mine, other = getattr(ours, derived), getattr(theirs, derived)
        if dataclasses.is_dataclass(mine) and type(mine) is type(other):
            out += differences(mine, other, f"{prefix}{field.name}.", skip)
        elif mine != other:
            out.append(f"{prefix}{field.name}: {other} there, {mine} here")
    return out


def override(config: Any, assignments: list[str]) -> Any:
    """Applies `key=value` strings (dotted keys into nested dataclasses). Each value is converted
    by its field's annotated type and checked by the dataclass's own checks, so a wrong value is an
    error naming its key before any work; an unknown key is an error that lists the valid ones."""
    for assignment in assignments:
        key, sep, raw = assignment.partition("=")
        if not sep:
            raise ValueError(f"override {assignment!r} is not of the form key=value")
        config = _set(config, key.split("."), raw, key)
    return config


def _set(node: Any, parts: list[str], raw: str, full_key: str) -> Any:
    names = [f.name for f in dataclasses.fields(node)]
    head = parts[0]
    if head not in names and len(parts) == 1 and hasattr(node, "UPGRADE"):  # a key of an older format
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        upgraded = node.UPGRADE({head: value})
        if head not in upgraded:
            hints = typing.get_type_hints(type(node))
            try:
                return dataclasses.replace(node, **{k: convert(v, hints[k], full_key) for k, v in upgraded.items()})
            except (ValueError, TypeError) as err:
                raise ValueError(f"config key {full_key!r}: {err}") from err
    if head not in names:
        raise ValueError(f"unknown config key {full_key!r}; valid keys here: {', '.join(names)}")
    current = getattr(node, head)
    if len(parts) > 1:
        if current is None:
            raise ValueError(f"config key {full_key!r}: {head} is off (None); set it whole in the config file")
        if not dataclasses.is_dataclass(current):
            raise ValueError(f"config key {full_key!r}: {head} has no sub-keys")
        value = _set(current, parts[1:], raw, full_key)
    elif dataclasses.is_dataclass(current):
        raise ValueError(f"config key {full_key!r} is a group; set one of its fields, e.g. {full_key}.<field>")
    else:
        value = parse_value(raw, typing.get_type_hints(type(node))[head], full_key)
    try:
        return dataclasses.replace(node, **{head: value})
    except (ValueError, TypeError) as err:  # the dataclass's own checks
        raise ValueError(f"config key {full_key!r}: {err}") from err


def parse_value(raw: str, annotation: Any, key: str) -> Any:
    """`raw` (a command-line string) as a value of type `annotation`: JSON where it reads as JSON
    (numbers, true/false, null, lists), else the text itself."""
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    return convert(value, annotation, key, raw=raw)


def convert(value: Any, annotation: Any, key: str, *, raw: str | None = None) -> Any:
    """`value` (as JSON gives it) checked and converted to type `annotation`: int, float, bool,
    str, Literal choices, tuples, dataclasses (from dicts), unions such as `X | None`, and Any
    (kept as it is). `raw`, the text `value` was read from, stands for a str field whatever it
    reads as. A value of another type is a ValueError naming `key`."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    shown = raw if raw is not None else json.dumps(value) if _jsonable(value) else repr(value)
    if annotation is Any:
        return value
    if origin in (Union, types.UnionType):
        options = [a for a in args if a is not type(None)]
        if len(options) < len(args) and (value is None or raw is not None and raw.strip() in ("none", "None")):
            return None
        errors = []
        for option in sorted(options, key=lambda a: a is str):  # a string is the last reading
            try:
                return convert(value, option, key, raw=raw)
            except ValueError as err:
                errors.append(err)
        if len(options) == 1:
            raise errors[0]
        raise ValueError(f"config key {key!r}: {shown} is none of {_type_name(annotation)}")
    if origin is Literal:
        if value not in args:
            choices = ", ".join(str(a) for a in args)
            raise ValueError(f"config key {key!r} must be one of {choices}, not {shown}")
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"config key {key!r} takes a list ({_type_name(annotation)}), not {shown}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(convert(v, args[0], f"{key}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise ValueError(f"config key {key!r} takes a list of {len(args)} items, not {shown}")
        return tuple(convert(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args, strict=True)))
    if dataclasses.is_dataclass(annotation):
        if isinstance(value, annotation):
            return value
        if not isinstance(value, dict):
            raise ValueError(f"config key {key!r} is a group of {annotation.__name__} fields, not {shown}")
        return build(annotation, value, key)
    if annotation is bool:
        value = {"True": True, "False": False}.get(value, value) if isinstance(value, str) else value
        if not isinstance(value, bool):
            raise ValueError(f"config key {key!r} takes true or false, not {shown}")
        return value
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"config key {key!r} takes an integer, not {shown}")
        return value
    if annotation is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"config key {key!r} takes a number, not {shown}")
        return float(value)
    if annotation is str:
        if raw is not None and not isinstance(value, str):
            return raw
        if not isinstance(value, str):
            raise ValueError(f"config key {key!r} takes a string, not {shown}")
        return value
    if isinstance(annotation, type) and not isinstance(value, annotation):
        raise ValueError(f"config key {key!r} takes a {annotation.__name__}, not {shown}")
    return value


def build(cls: type, data: dict[str, Any], key: str = "") -> Any:
    """A `cls` dataclass from a dict of JSON values, each field converted by its type (`convert`)."""
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}
    if hasattr(cls, "UPGRADE"):  # keys of an older format, rewritten
        try:
            data = cls.UPGRADE(data)
        except ValueError as err:
            raise ValueError(f"config {key or cls.__name__}: {err}") from err
    unknown = sorted(set(data) - fields)
    if unknown:
        raise ValueError(f"unknown config key {key + '.' if key else ''}{unknown[0]}; "
                         f"valid keys here: {', '.join(sorted(fields))}")
    values = {name: convert(value, hints[name], f"{key}.{name}" if key else name) for name, value in data.items()}
    try:
        return cls(**values)
    except (ValueError, TypeError) as err:
        raise ValueError(f"config {key or cls.__name__}: {err}") from err


def _jsonable(value: Any) -> bool:
    try:
        json.dumps(value)
    except (TypeError, ValueError):
        return False
    return True


def _type_name(annotation: Any) -> str:
    return str(annotation).replace("typing.", "")
