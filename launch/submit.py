"""`clip-submit`: render the SLURM job script of a training run and submit it with sbatch.

    clip-submit configs/tiny-distill.yaml --run-dir runs/exp1 --nodes 2 --gpus-per-node 8 \
        --cpus-per-task 64 --mem 400G --time 1-00:00:00 --partition gpu optim.lr=3e-4
    clip-submit ... --dry-run        # print the script, submit nothing

Every option is checked (and the training config validated with the overrides) before anything
is written or queued; a bad one is a one-line error naming it. The script comes from
launch/templates/job.sbatch (jinja2); its behaviour (rendezvous, logs, preemption, requeue) is
described there and in docs/launch.md.
"""
from __future__ import annotations

import argparse
import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import jinja2

TEMPLATE_DIR = Path(__file__).parent / "templates"
TEMPLATE_NAME = "job.sbatch"
SCRIPT_NAME = "job.sbatch"  # written into the run directory

# SLURM time formats: M, M:S, H:M:S, D-H, D-H:M, D-H:M:S.
_TIME_FORMATS = [
    (re.compile(r"^(\d+)$"), ("m",)),
    (re.compile(r"^(\d+):(\d+)$"), ("m", "s")),
    (re.compile(r"^(\d+):(\d+):(\d+)$"), ("h", "m", "s")),
    (re.compile(r"^(\d+)-(\d+)$"), ("d", "h")),
    (re.compile(r"^(\d+)-(\d+):(\d+)$"), ("d", "h", "m")),
    (re.compile(r"^(\d+)-(\d+):(\d+):(\d+)$"), ("d", "h", "m", "s")),
]
_SECONDS = {"d": 86400, "h": 3600, "m": 60, "s": 1}
_MEMORY = re.compile(r"^\d+[KMGT]?$")
_NAME = re.compile(r"^[A-Za-z0-9_.+:,-]+$")  # partition / account / qos / job name (lists allowed)
_CONSTRAINT = re.compile(r"^[A-Za-z0-9_.&|,\[\]*:()!-]+$")
_DIRECTIVE = re.compile(r"^--[a-z][a-z0-9-]*(=\S.*)?$")
_ENV_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
# Directives the script sets itself from options; an extra directive may not replace them.
MANAGED_DIRECTIVES = {"nodes", "ntasks-per-node", "gpus-per-node", "cpus-per-task", "mem",
                      "time", "partition", "account", "qos", "constraint", "exclusive",
                      "job-name", "output", "requeue", "signal", "open-mode"}


class SubmitError(ValueError):
    """A bad submit option; the message is one line naming it."""


@dataclass
class JobSpec:
    """A training run plus the cluster resources it asks for."""

    config: str
    run_dir: str
    overrides: list[str] = field(default_factory=list)
    nodes: int = 1
    min_nodes: int | None = None  # set: SLURM may start (or requeue) the job on min_nodes..nodes
    gpus_per_node: int = 0  # 0: CPU ranks (gloo)
    ranks_per_node: int | None = None  # default: gpus_per_node, or 1 without GPUs
    cpus_per_task: int | None = None  # CPUs of the node's one task (shared by its ranks)
    mem: str | None = None
    time: str | None = None
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    constraint: str | None = None
    exclusive: bool = False
    job_name: str | None = None
    extra_directives: list[str] = field(default_factory=list)
    env: list[str] = field(default_factory=list)  # KEY=VALUE exported before srun
    signal_lead: int = 120  # seconds before the time limit that SIGUSR1 arrives
    max_restarts: int = 3
    # After a preemption signal the job repeats it this often (seconds) until the ranks have
    # exited: a rank still starting up has no handler yet and ignores it.
    resend_every: int = 30
    script: str | None = None  # run this script instead of `-m training`
    python: str = sys.executable
    workdir: str = field(default_factory=os.getcwd)

    @property
    def nproc_per_node(self) -> int:
        return self.ranks_per_node or max(self.gpus_per_node, 1)


def parse_time(value: str) -> int | None:
    """SLURM time limit -> seconds (None for UNLIMITED); SubmitError when it is no SLURM time."""
    if value.upper() in ("UNLIMITED", "INFINITE"):
        return None
    for pattern, units in _TIME_FORMATS:
        match = pattern.match(value)
        if match:
            return sum(int(n) * _SECONDS[u] for n, u in zip(match.groups(), units))
    raise SubmitError(f"--time {value!r}: not a SLURM time (M, M:S, H:M:S, D-H, D-H:M or D-H:M:S)")


def validate(spec: JobSpec) -> None:
    """Check every option; raise SubmitError naming the first bad one."""
    if spec.min_nodes is not None and not 1 <= spec.min_nodes <= spec.nodes:
        raise SubmitError(f"--min-nodes {spec.min_nodes}: must be between 1 and --nodes "
                          f"{spec.nodes}")
    for name in ("nodes", "cpus_per_task", "ranks_per_node"):
        value = getattr(spec, name)
        if value is not None and value < 1:
            raise SubmitError(f"--{name.replace('_', '-')} {value}: must be >= 1")
    for name in ("gpus_per_node", "max_restarts"):
        if getattr(spec, name) < 0:
            raise SubmitError(f"--{name.replace('_', '-')} {getattr(spec, name)}: must be >= 0")
    if spec.mem is not None and not _MEMORY.match(spec.mem):
        raise SubmitError(f"--mem {spec.mem!r}: expected a number with an optional K/M/G/T unit")
    limit = parse_time(spec.time) if spec.time is not None else None
    if spec.signal_lead < 1:
        raise SubmitError(f"--signal-lead {spec.signal_lead}: must be >= 1 second")
    if limit is not None and spec.signal_lead >= limit:
        raise SubmitError(f"--signal-lead {spec.signal_lead}: must be shorter than --time "
                          f"{spec.time} ({limit} s)")
    if spec.resend_every < 1:
        raise SubmitError(f"--resend-every {spec.resend_every}: must be >= 1 second")
    for name in ("partition", "account", "qos", "job_name"):
        value = getattr(spec, name)
        if value is not None and not _NAME.match(value):
            raise SubmitError(f"--{name.replace('_', '-')} {value!r}: invalid characters")
    if spec.constraint is not None and not _CONSTRAINT.match(spec.constraint):
        raise SubmitError(f"--constraint {spec.constraint!r}: invalid characters")
    for directive in spec.extra_directives:
        _check_directive(directive)
    for item in spec.env:
        key, sep, _ = item.partition("=")
        if not sep or not _ENV_KEY.match(key):
            raise SubmitError(f"--env {item!r}: expected NAME=VALUE")
    for item in spec.overrides:
        if "=" not in item or item.startswith("-"):
            raise SubmitError(f"override {item!r}: expected section.key=value")
    if not os.path.isfile(spec.config):
        raise SubmitError(f"{spec.config}: config file not found")
    if spec.script is not None and not os.path.isfile(spec.script):
        raise SubmitError(f"--script {spec.script}: file not found")
    if spec.script is None:
        _validate_training_config(spec)


def _check_directive(directive: str) -> None:
    if "\n" in directive or not _DIRECTIVE.match(directive):
        raise SubmitError(f"--directive {directive!r}: expected --option or --option=value")
    name = directive[2:].split("=", 1)[0]
    if name in MANAGED_DIRECTIVES:
        raise SubmitError(f"--directive {directive!r}: set --{name} with its own option")


def _validate_training_config(spec: JobSpec) -> None:
    """Load the config with the job's overrides, as the ranks will, so errors show up now."""
    import yaml
    from training.config import ConfigError, load_config

    try:
        load_config(spec.config, [*spec.overrides, f"run_dir={spec.run_dir}"],
                    cuda_available=spec.gpus_per_node > 0)
    except ConfigError as error:
        raise SubmitError(str(error)) from None
    except yaml.YAMLError as error:  # load_config passes YAML syntax errors through
        where = getattr(error, "problem_mark", None)
        line = f" line {where.line + 1}" if where else ""
        raise SubmitError(f"{spec.config}:{line} not valid YAML "
                          f"({getattr(error, 'problem', None) or error})") from None


def directives(spec: JobSpec) -> list[str]:
    """The #SBATCH lines, in the order a reader expects them."""
    # Default job name: the run directory's name, with characters SLURM would choke on replaced.
    name = spec.job_name or re.sub(r"[^A-Za-z0-9_.+-]", "_", Path(spec.run_dir).name) or "clip-distill"
    # A node range lets a requeued job come back on fewer nodes: the trainer resumes on any
    # world size that keeps the global batch (docs/training.md, "Resuming on another size").
    nodes = f"{spec.min_nodes}-{spec.nodes}" if spec.min_nodes else str(spec.nodes)
    lines = [f"--job-name={name}", f"--nodes={nodes}", "--ntasks-per-node=1"]
    optional = [("gpus-per-node", spec.gpus_per_node or None), ("cpus-per-task", spec.cpus_per_task),
                ("mem", spec.mem), ("time", spec.time), ("partition", spec.partition),
                ("account", spec.account), ("qos", spec.qos), ("constraint", spec.constraint)]
    lines += [f"--{key}={value}" for key, value in optional if value is not None]
    if spec.exclusive:
        lines.append("--exclusive")
    log = os.path.join(os.path.abspath(spec.run_dir), "logs", "slurm-%j.out")
    lines += [f"--output={log}", "--open-mode=append",
              "--requeue", f"--signal=B:USR1@{spec.signal_lead}"]
    return lines + list(spec.extra_directives)


def render(spec: JobSpec) -> str:
    """The job script text for `spec` (validated first)."""
    validate(spec)
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(TEMPLATE_DIR), undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
        # bash's ${#array[@]} contains jinja's default comment opener "{#".
        comment_start_string="{##", comment_end_string="##}")
    env.filters["q"] = lambda value: shlex.quote(str(value))
    return env.get_template(TEMPLATE_NAME).render(
        directives=directives(spec),
        run_dir=os.path.abspath(spec.run_dir),
        config=os.path.abspath(spec.config),
        python=spec.python,
        workdir=os.path.abspath(spec.workdir),
        max_restarts=spec.max_restarts,
        nproc_per_node=spec.nproc_per_node,
        signal_lead=spec.signal_lead,
        resend_every=spec.resend_every,
        overrides=spec.overrides,
        env=[item.split("=", 1) for item in spec.env],
        program_flag=f"--script={shlex.quote(os.path.abspath(spec.script))} " if spec.script else "",
    )


def submit(spec: JobSpec) -> str:
    """Write RUN_DIR/job.sbatch, queue it, return the job id."""
    text = render(spec)
    sbatch = shutil.which("sbatch")
    if sbatch is None:
        raise SubmitError("sbatch not found on PATH (is this a SLURM login node? --dry-run prints "
                          "the script)")
    os.makedirs(os.path.join(spec.run_dir, "logs"), exist_ok=True)
    script = os.path.join(spec.run_dir, SCRIPT_NAME)
    with open(script, "w") as f:
        f.write(text)
    result = subprocess.run([sbatch, "--parsable", script], capture_output=True, text=True)
    if result.returncode != 0:
        raise SubmitError(f"sbatch {script}: {result.stderr.strip() or result.stdout.strip()}")
    return result.stdout.strip().split(";")[0]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="clip-submit", description=(
        "Render the SLURM job script of a training run and submit it (docs/launch.md)."))
    p.add_argument("config", help="training config (YAML)")
    p.add_argument("overrides", nargs="*", help="section.key=value overrides for the trainer")
    p.add_argument("--run-dir", required=True, help="run directory (checkpoints, logs, metrics)")
    p.add_argument("--nodes", type=int, default=1)
    p.add_argument("--min-nodes", type=int, default=None,
                   help="accept (and requeue onto) as few as this many nodes; the run resumes "
                        "on the node count it gets")
    p.add_argument("--gpus-per-node", type=int, default=0, help="0: CPU ranks")
    p.add_argument("--ranks-per-node", type=int, default=None,
                   help="default: --gpus-per-node, or 1 without GPUs")
    p.add_argument("--cpus-per-task", type=int, default=None, help="CPUs per node's task")
    p.add_argument("--mem", default=None, help="memory per node, e.g. 400G")
    p.add_argument("--time", default=None, help="time limit, e.g. 1-00:00:00 or 90")
    p.add_argument("--partition", default=None)
    p.add_argument("--account", default=None)
    p.add_argument("--qos", default=None)
    p.add_argument("--constraint", default=None)
    p.add_argument("--exclusive", action="store_true")
    p.add_argument("--job-name", default=None, help="default: the run directory's name")
    p.add_argument("--directive", dest="extra_directives", action="append", default=[],
                   metavar="--OPTION[=VALUE]", help="extra #SBATCH line (repeatable)")
    p.add_argument("--env", action="append", default=[], metavar="NAME=VALUE",
                   help="environment variable exported in the job (repeatable)")
    p.add_argument("--signal-lead", type=int, default=120,
                   help="seconds before the time limit to checkpoint and requeue")
    p.add_argument("--max-restarts", type=int, default=3, help="requeues after preemption")
    p.add_argument("--resend-every", type=int, default=30,
                   help="seconds between repeats of the preemption signal until the ranks exit")
    p.add_argument("--script", default=None, help="run this script instead of `-m training`")
    p.add_argument("--python", default=sys.executable, help="python on the compute nodes")
    p.add_argument("--dry-run", action="store_true", help="print the job script, submit nothing")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = vars(parser.parse_intermixed_args(argv))
    dry_run = args.pop("dry_run")
    try:
        spec = JobSpec(**args)
        if dry_run:
            sys.stdout.write(render(spec))
        else:
            job_id = submit(spec)
            print(f"submitted job {job_id}: {os.path.join(spec.run_dir, SCRIPT_NAME)}, "
                  f"logs in {os.path.join(spec.run_dir, 'logs')}")
    except SubmitError as error:
        print(f"clip-submit: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
