"""Several `python -m training` runs in one process (the interpreter's imports paid once).

Usage: python tests/helpers/clip_train_runs.py RUNS.json OUT.json (from a test: run_worker).
RUNS.json maps a run's name to its argv (what `python -m training` would get); each is passed to
`training.cli.main`, the very function `python -m training` calls, in order. Writes OUT.json: per
run its exit status and what it printed on stdout and on stderr. A run that fails after joining
a process group (e.g. a refused optim.total_steps) should come last.
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
        stdout, stderr = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            status = main(argv)
        results[name] = {"status": status, "stdout": stdout.getvalue(),
                         "stderr": stderr.getvalue()}
        sys.__stderr__.write(f"{name}: exit {status}\n{stdout.getvalue()[-2000:]}"
                             f"{stderr.getvalue()[-3000:]}\n")
    with open(sys.argv[2], "w") as out:
        json.dump(results, out)
