"""Weight inheritance from a teacher: manual and learned-mask (docs/inheritance.md)."""
