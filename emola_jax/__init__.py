"""emola-jax: EmoLA (LLaVA-1.5 + a facial prior token + LoRA) in JAX and Flax NNX."""

from emola_jax.config import EmolaConfig, LoRAConfig, RopeScaling, TextConfig, VisionConfig

__all__ = [
    "EmolaConfig", "EmolaForConditionalGeneration", "LoRAConfig", "RopeScaling", "TextConfig",
    "VisionConfig", "Predictor", "load_pretrained",
]


def __getattr__(name: str):
    """The model and its loader are imported when first used, so that reading the configs (and
    `run.py`'s command line, its `--help` and its errors) does not wait for jax."""
    if name == "load_pretrained":
        # deferred: start-up time (jax)
        from emola_jax.checkpoint import load_pretrained

        return load_pretrained
    if name == "Predictor":  # the inference engine: a checkpoint answering questions about images
        # deferred: start-up time (jax)
        from emola_jax.predictor import Predictor

        return Predictor
    if name == "EmolaForConditionalGeneration":
        # deferred: start-up time (jax)
        from emola_jax.models import EmolaForConditionalGeneration

        return EmolaForConditionalGeneration
    raise AttributeError(f"module 'emola_jax' has no attribute {name!r}")
