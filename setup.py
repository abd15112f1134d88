"""Installable packages: data_tools (the data CLI), training (trainer, inheritance,
evaluation) and launch (torchrun/SLURM). Dependencies are pinned in requirements.lock;
`make venv` installs them, then this project in editable mode without dependencies."""
from setuptools import find_packages, setup

setup(
    name="clip-distill",
    version="0.1.0",
    description="Shard image-text data, inherit weights from a CLIP teacher and distil small "
    "CLIP students (TinyCLIP affinity mimicking) on DeepSpeed, torchrun and SLURM.",
    python_requires=">=3.10",
    packages=find_packages(include=["data_tools*", "training*", "launch*"]),
    package_data={"launch": ["templates/*"]},
    install_requires=[line.split("#")[0].strip() for line in open("requirements.txt")
                      if line.split("#")[0].strip() and not line.startswith("pytest")],
    entry_points={
        "console_scripts": [
            "clip-data=data_tools.cli:main",
            "clip-train=training.cli:main",
            "clip-inherit=training.inheritance.cli:main",
            "clip-eval=training.evaluation.cli:main",
            "clip-export=training.deploy.cli:main",
            "clip-stages=training.inheritance.stages:main",
            "clip-submit=launch.submit:main",
            "clip-status=launch.status:main",
        ]
    },
)
