"""The distillation objective as named terms (one module per term; the contract: base.py)."""
