"""PyTorch checkpoints <-> emola-jax: one mapping table per format, read one tensor at a time."""

from converters.exporter import export, plan_export
from converters.importer import convert, load_clip_vision, plan_conversion

__all__ = ["convert", "export", "load_clip_vision", "plan_conversion", "plan_export"]
