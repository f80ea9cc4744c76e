"""Typed, hashable model configuration.

Configs are frozen dataclasses so that NNX modules can keep them as static attributes (they end
up in the graphdef, which jit hashes). Field names follow Hugging Face's `LlavaConfig`,
`CLIPVisionConfig` and `LlamaConfig` so that a converter is mostly a copy.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Literal

PriorPosition = Literal["after", "before", "off"]
DTYPES = ("float32", "bfloat16", "float16")  # weight storage and compute dtypes every command accepts
SUPPORTED_ROPE_TYPES = ("default", "linear", "dynamic", "llama3")
# insightface 2d106det: 106 (x, y) landmarks, flattened.
LANDMARK_DIM = 212


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

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """The Hugging Face rope types that LLaMA-2 and LLaMA-3 checkpoints use."""

    rope_type: str = "default"
    factor: float = 1.0
    original_max_position_embeddings: int | None = None
    low_freq_factor: float | None = None
    high_freq_factor: float | None = None

    def __post_init__(self):
        if self.rope_type not in SUPPORTED_ROPE_TYPES:
            raise ValueError(
                f"rope type {self.rope_type!r} is not supported; supported: {SUPPORTED_ROPE_TYPES}"
            )


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

    def __post_init__(self):
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


@dataclasses.dataclass(frozen=True)
class LoRAConfig:
    """LoRA on decoder projections, as PEFT defines it (scale alpha/r, or alpha/sqrt(r)).

    `targets` follow the list form of PEFT's `target_modules` (`emola_jax/lora.py`): each names a
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
        from emola_jax.lora import check_targets  # lora.py builds on these configs

        if isinstance(self.targets, str):
            raise ValueError(f"LoRA targets must be a list of projection names, not the string {self.targets!r}")
        check_targets(self)

    @property
    def scale(self) -> float:
        return self.alpha / (self.rank**0.5 if self.use_rslora else self.rank)


@dataclasses.dataclass(frozen=True)
class EmolaConfig:
    """LLaVA-1.5 + facial prior token. `prior_position="off"` is plain LLaVA-1.5."""

    vision: VisionConfig = VisionConfig()
    text: TextConfig = TextConfig()
    vision_feature_layer: int = -2
    vision_feature_select_strategy: Literal["default", "full"] = "default"
    projector_hidden_act: str = "gelu"
    projector_bias: bool = True
    image_token_id: int = 32000
    prior_position: PriorPosition = "after"
    prior_dim: int = LANDMARK_DIM
    lora: LoRAConfig | None = None
    dtype: str = "float32"

    def __post_init__(self):
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, not {self.dtype!r}")
        if self.prior_position not in ("after", "before", "off"):
            raise ValueError(f"prior_position must be after, before or off, not {self.prior_position!r}")
        if self.vision_feature_select_strategy not in ("default", "full"):
            raise ValueError(
                "vision_feature_select_strategy must be 'default' or 'full', "
                f"not {self.vision_feature_select_strategy!r}"
            )
        if self.projector_hidden_act != "gelu":
            raise ValueError(f"projector activation {self.projector_hidden_act!r} is not supported (gelu only)")
        if not -(self.vision.num_hidden_layers + 1) <= self.vision_feature_layer <= self.vision.num_hidden_layers:
            raise ValueError(
                f"vision_feature_layer {self.vision_feature_layer} is outside the "
                f"{self.vision.num_hidden_layers + 1} hidden states of the vision tower"
            )

    @property
    def vision_layers_used(self) -> int:
        """Encoder layers that must run to reach the selected hidden state (the rest are skipped)."""
        layer = self.vision_feature_layer
        return layer if layer >= 0 else self.vision.num_hidden_layers + 1 + layer

    @property
    def num_visual_tokens(self) -> int:
        return self.vision.num_patches + (self.vision_feature_select_strategy == "full")

    @property
    def image_seq_length(self) -> int:
        """Image-token placeholders per image in `input_ids`: visual tokens plus the prior token."""
        return self.num_visual_tokens + (self.prior_position != "off")

    def replace(self, **changes: Any) -> EmolaConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EmolaConfig:
        data = dict(data)
        text = dict(data.pop("text", {}))
        text["rope_scaling"] = RopeScaling(**text.get("rope_scaling", {}))
        lora = data.pop("lora", None)
        if lora is not None:
            lora = LoRAConfig(**{**lora, "targets": tuple(lora.get("targets", LoRAConfig.targets))})
        return cls(
            vision=VisionConfig(**data.pop("vision", {})), text=TextConfig(**text), lora=lora, **data
        )

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> EmolaConfig:
        try:
            return cls.from_dict(json.loads(Path(path).read_text()))
        except (json.JSONDecodeError, TypeError) as err:
            raise ValueError(f"{path} is not a valid emola-jax config: {err}") from err


def override(config: Any, assignments: list[str]) -> Any:
    """Applies `key=value` strings (dotted keys into nested dataclasses; values parsed as JSON,
    else kept as strings). An unknown key is an error that lists the valid ones."""
    for assignment in assignments:
        key, sep, raw = assignment.partition("=")
        if not sep:
            raise ValueError(f"override {assignment!r} is not of the form key=value")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        config = _set(config, key.split("."), value, key)
    return config


def _set(node: Any, parts: list[str], value: Any, full_key: str) -> Any:
    names = [f.name for f in dataclasses.fields(node)]
    head = parts[0]
    if head not in names:
        raise ValueError(f"unknown config key {full_key!r}; valid keys here: {', '.join(names)}")
    current = getattr(node, head)
    if len(parts) > 1:
        if current is None:
            raise ValueError(f"config key {full_key!r}: {head} is off (None); set it whole in the config file")
        if not dataclasses.is_dataclass(current):
            raise ValueError(f"config key {full_key!r}: {head} has no sub-keys")
        value = _set(current, parts[1:], value, full_key)
    elif dataclasses.is_dataclass(current):
        raise ValueError(f"config key {full_key!r} is a group; set one of its fields, e.g. {full_key}.<field>")
    elif isinstance(current, tuple) and isinstance(value, list):
        value = tuple(value)
    return dataclasses.replace(node, **{head: value})
