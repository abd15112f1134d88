"""The torchrun command builder (launch/torchrun.py): flags for one node and for N nodes."""
import os
import shlex
import subprocess
import sys

import pytest

from launch.torchrun import LaunchError, TorchrunPlan, build_parser, plan_from_args, torchrun_command


def test_one_node_is_standalone():
    cmd = torchrun_command(TorchrunPlan(nproc_per_node=4), ["-m", "training", "--config", "c.yaml"],
                           python="py")
    assert cmd[:3] == ["py", "-m", "torch.distributed.run"]
    assert "--standalone" in cmd and "--nproc-per-node=4" in cmd and "--max-restarts=0" in cmd
    assert not any(a.startswith("--rdzv") for a in cmd)
    assert cmd[-4:] == ["-m", "training", "--config", "c.yaml"]


def test_n_nodes_use_c10d_rendezvous():
    plan = TorchrunPlan(nproc_per_node=8, nnodes=4, master_addr="node0", master_port=29411,
                        run_id="job7", log_dir="/runs/x/logs/ranks")
    cmd = torchrun_command(plan, ["-m", "training"], python="py")
    for flag in ("--nnodes=4", "--rdzv-backend=c10d", "--rdzv-endpoint=node0:29411",
                 "--rdzv-id=job7", "--log-dir=/runs/x/logs/ranks", "--tee=3"):
        assert flag in cmd
    assert "--standalone" not in cmd and not any(a.startswith("--node-rank") for a in cmd)


def parse(argv, env):
    return plan_from_args(build_parser().parse_args(argv), env)


def test_arguments_win_over_environment_which_wins_over_defaults():
    env = {"SLURM_NNODES": "3", "MASTER_ADDR": "envhost", "MASTER_PORT": "1111", "SLURM_JOB_ID": "42"}
    plan = parse(["--master-port", "2222"], env)
    assert (plan.nnodes, plan.master_addr, plan.master_port, plan.run_id) == (3, "envhost", 2222, "42")
    assert parse([], {}) == TorchrunPlan()


@pytest.mark.parametrize("argv, env, message", [
    (["--nnodes", "2"], {}, "needs a master address"),
    (["--nnodes", "two"], {}, "nnodes must be an integer, got 'two'"),
    (["--nproc-per-node", "0"], {}, "nproc_per_node must be >= 1"),
    (["--master-port", "70000", "--master-addr", "h"], {}, "master_port must be in 1..65535"),
    ([], {"NNODES": "2"}, "needs a master address"),
])
def test_bad_settings_are_one_line_errors(argv, env, message):
    with pytest.raises(LaunchError, match=message):
        parse(argv, env)


# What a launcher or an earlier in-process test may have left in this process's environment;
# the CLI reads them as defaults, so the subprocesses below run without them.
LAUNCH_VARIABLES = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK",
                    "LOCAL_WORLD_SIZE", "GROUP_RANK", "NNODES", "NODE_RANK", "RUN_ID",
                    "NPROC_PER_NODE")


def clean_env() -> dict:
    return {k: v for k, v in os.environ.items()
            if k not in LAUNCH_VARIABLES and not k.startswith("SLURM_")}


def test_cli_prints_the_command_and_rejects_bad_input():
    ok = subprocess.run([sys.executable, "-m", "launch.torchrun", "--print", "--nnodes", "2",
                         "--master-addr", "h0", "--run-id", "r", "--", "--config", "c.yaml", "a=b"],
                        capture_output=True, text=True, check=True, env=clean_env())
    argv = shlex.split(ok.stdout)
    assert "--rdzv-endpoint=h0:29500" in argv and argv[-5:] == ["-m", "training", "--config", "c.yaml", "a=b"]
    bad = subprocess.run([sys.executable, "-m", "launch.torchrun", "--nnodes", "2"],
                         capture_output=True, text=True, env=clean_env())
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert bad.stderr.strip().splitlines() == [
        "launch.torchrun: error: nnodes=2 needs a master address (--master-addr or MASTER_ADDR)"]
