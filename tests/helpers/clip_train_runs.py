"""Several `python -m training` runs in one process (the interpreter's imports paid once).

    from tests.helpers.clip_train_runs import clip_train_runs
    results = clip_train_runs({"a": ["--config", cfg, ...], "b": [...]}, tmp_path)
    results["a"]["status"], results["a"]["stdout"], results["a"]["stderr"]
    results = clip_train_runs(plan, tmp_path, nproc=2)   # one torchrun launch, rank 0's results

clip_train_runs starts this file as a worker (run_worker: the repo root, the CPU defaults; or
run_torchrun on `nproc` ranks). The worker passes each argv, in order, to `training.cli.main`, the
very function `python -m training` calls, and records its exit status and what it printed on
stdout and on stderr. A run that fails after joining a process group (e.g. a refused
optim.total_steps) should come last.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import sys
from pathlib import Path


def clip_train_runs(plan: dict[str, list[str]], root: Path, nproc: int | None = None
                    ) -> dict[str, dict]:
    """Run every argv of `plan` in one worker process (or one torchrun launch of `nproc` ranks);
    {name: {"status", "stdout", "stderr"}} (rank 0's). ROOT/runs.json and ROOT/results.json are
    the worker's input and output."""
    from tests.helpers.torchrun import run_torchrun, run_worker

    (root / "runs.json").write_text(json.dumps(plan))
    if nproc is None:
        run_worker(__file__, root / "runs.json", root / "results.json")
    else:
        run_torchrun([__file__, root / "runs.json", root / "results.json"], nproc=nproc,
                     timeout=900)
    return json.loads((root / "results.json").read_text())


def main(runs_file: str, out_file: str) -> None:
    from training.cli import main as clip_train

    results = {}
    for name, argv in json.loads(Path(runs_file).read_text()).items():
        stdout, stderr = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            status = clip_train(argv)
        results[name] = {"status": status, "stdout": stdout.getvalue(),
                         "stderr": stderr.getvalue()}
        sys.__stderr__.write(f"{name}: exit {status}\n{stdout.getvalue()[-2000:]}"
                             f"{stderr.getvalue()[-3000:]}\n")
    if os.environ.get("RANK", "0") == "0":
        Path(out_file).write_text(json.dumps(results))


if __name__ == "__main__":
    main(*sys.argv[1:])
