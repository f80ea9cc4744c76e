"""emola-jax: EmoLA (LLaVA-1.5 + a facial prior token + LoRA) in JAX and Flax NNX."""

from emola_jax.checkpoint import load_pretrained
from emola_jax.config import EmolaConfig, LoRAConfig, RopeScaling, TextConfig, VisionConfig
from emola_jax.models import EmolaForConditionalGeneration

__all__ = [
    "EmolaConfig", "EmolaForConditionalGeneration", "LoRAConfig", "RopeScaling", "TextConfig",
    "VisionConfig", "load_pretrained",
]
