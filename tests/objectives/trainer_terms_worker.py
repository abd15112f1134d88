"""Worker for test_trainer_terms.py: several `python -m training` runs in one process.

Usage: trainer_terms_worker.py RUNS.json OUT.json. RUNS.json maps a run's name to its argv (what
`python -m training` would get); each is passed to `training.cli.main`, the very function
`python -m training` calls, in order, so the interpreter's imports are paid once for all runs.
Writes OUT.json: per run its exit status and what it printed on stderr.
"""
from __future__ import annotations

import contextlib
import io
import json
import sys

from training.cli import main

if __name__ == "__main__":
    runs, results = json.loads(open(sys.argv[1]).read()), {}
    for name, argv in runs.items():
        stderr = io.StringIO()
        with contextlib.redirect_stderr(stderr):
            status = main(argv)
        results[name] = {"status": status, "stderr": stderr.getvalue()}
        sys.__stderr__.write(f"{name}: exit {status}\n{stderr.getvalue()[-3000:]}\n")
    with open(sys.argv[2], "w") as out:
        json.dump(results, out)
