"""Zero-shot, retrieval, model cost and run reports (docs/evaluation.md)."""
