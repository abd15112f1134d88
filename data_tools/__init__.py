"""The data CLI: turn image-text sources into verified WebDataset shard sets (docs/data.md)."""
__version__ = "0.1.0"
