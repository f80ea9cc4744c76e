"""Flax NNX modules: the CLIP tower, the LLaMA decoder, and EmoLA which joins them."""

from emola_jax.models.clip import CLIPVisionModel
from emola_jax.models.emola import EmolaForConditionalGeneration
from emola_jax.models.llama import LlamaModel

__all__ = ["CLIPVisionModel", "EmolaForConditionalGeneration", "LlamaModel"]
