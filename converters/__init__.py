"""PyTorch checkpoints <-> emola-jax: one mapping table per format, read one tensor at a time."""

from converters.importer import convert, load_clip_vision, plan_conversion

__all__ = ["convert", "load_clip_vision", "plan_conversion"]
