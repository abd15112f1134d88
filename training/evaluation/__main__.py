"""`python -m training.evaluation ...` = `clip-eval ...`."""
import sys

from training.evaluation.cli import main

sys.exit(main())
