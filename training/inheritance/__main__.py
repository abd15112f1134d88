"""`python -m training.inheritance ...`: the clip-inherit CLI (training/inheritance/cli.py)."""
import sys

from training.inheritance.cli import main

sys.exit(main())
