"""Distil small CLIP students from open_clip teachers on DeepSpeed (docs/training.md)."""
