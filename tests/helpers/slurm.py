"""A real two-node SLURM cluster on this host, for tests (Debian's slurmctld, slurmd, munge).

Usage (tests/launch/conftest.py wraps it in a session fixture):
    cluster = SlurmCluster.start(base_dir)     # installs the packages when missing (root, apt)
    job = cluster.sbatch(script_path)
    info = cluster.wait_for_end(job, timeout=300)   # {'JobState': 'COMPLETED', ...}
    cluster.stop()                             # every daemon and job step, by pid

Everything lives under `base_dir`: munge key and socket, slurm.conf, state, spool, logs. The
daemons run in the foreground (-D / -F) as our children, so teardown knows their pids; clients
find the cluster through SLURM_CONF (`cluster.env`). Settings are those known to work here
(../shared/notes/environment.md): proctrack/linuxproc, task/none, no accounting, a 2 s scheduler
interval and cred_expire=10 so a requeued job reruns after ~12 s instead of ~2 minutes.
`sbatch --wait` polls slowly (2, 10, 42, 74 s), so `wait_for_end` polls `scontrol show job`.
"""
from __future__ import annotations

import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ["slurmctld", "slurmd", "slurm-client", "munge"]
NODES = ("n1", "n2")
END_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY",
              "BOOT_FAIL", "DEADLINE", "PREEMPTED"}
HOSTS_LINE = "127.0.0.1 " + " ".join(NODES) + "  # tests/helpers/slurm.py\n"


class SlurmError(RuntimeError):
    """The cluster could not be brought up or a command failed; the message says why."""


def ensure_installed() -> None:
    """Install the Debian packages when a daemon is missing (CI starts from a bare machine)."""
    if all(shutil.which(name) for name in ("slurmctld", "slurmd", "sbatch", "munged")):
        return
    if os.geteuid() != 0:
        raise SlurmError(f"SLURM is not installed and installing {PACKAGES} needs root")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    for cmd in (["apt-get", "update", "-q"],
                ["apt-get", "install", "-y", "-q", "--no-install-recommends", *PACKAGES]):
        result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
        if result.returncode != 0:
            raise SlurmError(f"{' '.join(cmd)} failed ({result.returncode}): "
                             f"{result.stderr.strip()[-2000:]}")


def _free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def _ensure_node_names_resolve() -> bool:
    """slurmd looks its node name up; add an /etc/hosts line when n1/n2 do not resolve."""
    try:
        for name in NODES:
            socket.gethostbyname(name)
        return False
    except OSError:
        with open("/etc/hosts", "a") as f:
            f.write(HOSTS_LINE)
        return True


def _remove_hosts_line() -> None:
    with open("/etc/hosts") as f:
        lines = f.readlines()
    with open("/etc/hosts", "w") as f:
        f.writelines(line for line in lines if line != HOSTS_LINE)


class SlurmCluster:
    """munged + slurmctld + one slurmd per node, all children of this process."""

    def __init__(self, base: Path):
        self.base = base
        self.conf = base / "slurm.conf"
        self.env = dict(os.environ, SLURM_CONF=str(self.conf))
        self.daemons: dict[str, subprocess.Popen] = {}
        self._added_hosts_line = False

    # ----------------------------------------------------------------------------- bring-up
    @classmethod
    def start(cls, base: str | os.PathLike, timeout: float = 90) -> "SlurmCluster":
        ensure_installed()
        cluster = cls(Path(base))
        try:
            cluster._write_files()
            cluster._added_hosts_line = _ensure_node_names_resolve()
            cluster._start_daemons()
            cluster._wait_nodes_idle(timeout)
        except BaseException:
            cluster.stop()
            raise
        return cluster

    def _write_files(self) -> None:
        base = self.base
        for sub in ("munge", "state", "log", *(f"spool/{n}" for n in NODES)):
            (base / sub).mkdir(parents=True, exist_ok=True)
        # munged runs as the munge user and insists on private, munge-owned key and dirs.
        munge = pwd.getpwnam("munge")
        os.chmod(base, 0o755)
        (base / "munge" / "munge.key").write_bytes(os.urandom(1024))
        for path in (base / "munge", base / "munge" / "munge.key"):
            os.chown(path, munge.pw_uid, munge.pw_gid)
        os.chmod(base / "munge", 0o755)  # the socket must be reachable by all
        os.chmod(base / "munge" / "munge.key", 0o400)
        ctld_port, *node_ports = _free_ports(1 + len(NODES))
        host = socket.gethostname().split(".")[0]
        nodes = "\n".join(
            f"NodeName={name} NodeHostname={host} NodeAddr=127.0.0.1 Port={port} CPUs=2 "
            f"State=UNKNOWN" for name, port in zip(NODES, node_ports))
        self.conf.write_text(f"""\
ClusterName=testcluster
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={base}/munge/munge.socket,cred_expire=10
StateSaveLocation={base}/state
SlurmdSpoolDir={base}/spool/%n
SlurmctldPidFile={base}/slurmctld.pid
SlurmdPidFile={base}/spool/%n/slurmd.pid
SlurmctldLogFile={base}/log/slurmctld.log
SlurmdLogFile={base}/log/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2
CommunicationParameters=NoInAddrAny
MpiDefault=none
ReturnToService=2
JobRequeue=1
KillWait=30
MinJobAge=600
InactiveLimit=0
SlurmctldTimeout=30
SlurmdTimeout=60
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
{nodes}
PartitionName=test Nodes={",".join(NODES)} Default=YES MaxTime=INFINITE State=UP
""")

    def _spawn(self, name: str, cmd: list[str], user: str | None = None) -> None:
        log = open(self.base / "log" / f"{name}.console", "w")
        self.daemons[name] = subprocess.Popen(cmd, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                              stdin=subprocess.DEVNULL, start_new_session=True,
                                              user=user, group=user)
        log.close()

    def _start_daemons(self) -> None:
        m = self.base / "munge"
        self._spawn("munged", ["munged", "-F", f"--socket={m}/munge.socket", f"--key-file={m}/munge.key",
                               f"--pid-file={m}/munged.pid", f"--log-file={m}/munged.log",
                               f"--seed-file={m}/munged.seed"], user="munge")
        self._wait(lambda: (m / "munge.socket").exists(), 20, "munged socket")
        self._spawn("slurmctld", ["slurmctld", "-D", "-i", "-f", str(self.conf)])
        for node in NODES:
            self._spawn(f"slurmd-{node}", ["slurmd", "-D", "-N", node, "-f", str(self.conf)])

    def _wait(self, ready, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for name, proc in self.daemons.items():
                if proc.poll() is not None:
                    raise SlurmError(f"{name} exited {proc.returncode} while waiting for {what}: "
                                     f"{self._log_tail(name)}")
            if ready():
                return
            time.sleep(0.5)
        raise SlurmError(f"timed out after {timeout:.0f} s waiting for {what}; "
                         f"slurmctld log: {self._log_tail('slurmctld')}")

    def _wait_nodes_idle(self, timeout: float) -> None:
        def idle() -> bool:
            out = self.run(["sinfo", "-h", "-N", "-o", "%N %t"], check=False).stdout.split()
            states = dict(zip(out[::2], out[1::2]))
            return all(states.get(n) == "idle" for n in NODES)
        self._wait(idle, timeout, f"nodes {NODES} idle")

    def _log_tail(self, name: str, chars: int = 1500) -> str:
        texts = []
        for path in (self.base / "log" / f"{name}.console", self.base / "log" / f"{name}.log"):
            if path.exists():
                texts.append(path.read_text(errors="replace")[-chars:])
        return " | ".join(texts) or "(no log)"

    # ----------------------------------------------------------------------------- jobs
    def run(self, cmd: list[str], check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess:
        result = subprocess.run(cmd, env=self.env, capture_output=True, text=True, timeout=timeout)
        if check and result.returncode != 0:
            raise SlurmError(f"{' '.join(cmd)} exited {result.returncode}: {result.stderr.strip()}")
        return result

    def sbatch(self, script: str | os.PathLike, *args: str, env: dict | None = None) -> str:
        result = subprocess.run(["sbatch", "--parsable", *args, str(script)], capture_output=True,
                                text=True, timeout=60, env={**self.env, **(env or {})})
        if result.returncode != 0:
            raise SlurmError(f"sbatch {script} exited {result.returncode}: {result.stderr.strip()}")
        return result.stdout.strip().split(";")[0]

    def job(self, job_id: str) -> dict[str, str]:
        """`scontrol show job -o` as a dict (JobState, RunTime, Restarts, NodeList, ExitCode...)."""
        out = self.run(["scontrol", "show", "job", "-o", str(job_id)]).stdout.strip()
        fields = {}
        for token in out.split():
            key, sep, value = token.partition("=")
            if sep:
                fields[key] = value
        return fields

    def wait_until(self, job_id: str, predicate, timeout: float, what: str) -> dict[str, str]:
        """Poll the job every 0.25 s until predicate(info) holds; SlurmError on timeout."""
        deadline = time.monotonic() + timeout
        info = self.job(job_id)
        while not predicate(info):
            if time.monotonic() > deadline:
                raise SlurmError(f"job {job_id}: timed out after {timeout:.0f} s waiting for "
                                 f"{what}; last state {info.get('JobState')} "
                                 f"reason {info.get('Reason')}")
            time.sleep(0.25)
            info = self.job(job_id)
        return info

    def wait_for_end(self, job_id: str, timeout: float = 300) -> dict[str, str]:
        return self.wait_until(job_id, lambda i: i.get("JobState") in END_STATES, timeout,
                               "the job to end")

    def clip_submit(self, *args: str, env: dict | None = None) -> str:
        """Run `clip-submit ARGS` (launch/submit.py) against this cluster; return the job id."""
        result = subprocess.run([sys.executable, "-m", "launch.submit", *args], capture_output=True,
                                text=True, timeout=120, env={**self.env, **(env or {})},
                                cwd=REPO_ROOT)
        if result.returncode != 0:
            raise SlurmError(f"clip-submit exited {result.returncode}: {result.stderr.strip()}")
        return result.stdout.split()[2].rstrip(":")  # "submitted job 12: ..."

    def rank_pids(self, job_id: str, rank: int) -> list[int]:
        """Pids of the process(es) running global rank `rank` of the job (torchrun sets RANK)."""
        wanted = {f"SLURM_JOB_ID={job_id}".encode(), f"RANK={rank}".encode()}
        pids = []
        for pid in _job_pids(str(self.conf)):
            try:
                env = set(Path(f"/proc/{pid}/environ").read_bytes().split(b"\0"))
            except OSError:
                continue
            if wanted <= env:
                pids.append(pid)
        return pids

    def cancel_all(self) -> None:
        self.run(["scancel", "--full", "--quiet", "--partition=test"], check=False)

    # ----------------------------------------------------------------------------- teardown
    def stop(self) -> None:
        """Cancel every job, then stop each daemon (and any job step left behind) by its pid."""
        if "slurmctld" in self.daemons and self.daemons["slurmctld"].poll() is None:
            try:
                self.cancel_all()
                time.sleep(1)
            except (OSError, subprocess.SubprocessError):
                pass
        for name in reversed(list(self.daemons)):  # slurmds first, munged last
            _terminate(self.daemons[name])
        for pid in _job_pids(str(self.conf)):  # ranks of a job still running (slurmstepd is gone)
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if self._added_hosts_line:
            _remove_hosts_line()
            self._added_hosts_line = False


def _terminate(proc: subprocess.Popen, grace: float = 10) -> None:
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)


def _job_pids(conf: str) -> list[int]:
    """Processes of this cluster's jobs: slurmd gives every job process SLURM_CONF=<our conf>."""
    marker = f"SLURM_CONF={conf}".encode() + b"\0"
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) != os.getpid():
            try:
                if marker in Path(f"/proc/{entry}/environ").read_bytes():
                    pids.append(int(entry))
            except OSError:
                pass
    return pids
