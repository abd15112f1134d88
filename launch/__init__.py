"""torchrun and SLURM launchers (docs/launch.md)."""
