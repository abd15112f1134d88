"""`python -m training --config ... key=value ...` (see training/cli.py)."""
import sys

from training.cli import main

sys.exit(main())
