"""Launch-test fixtures: one real SLURM cluster for the session (tests/helpers/slurm.py).

A test that needs the cluster FAILS when it cannot be brought up (the error says why): these
tests must run in CI, which installs nothing beforehand.
"""
import shutil
import tempfile

import pytest

from tests.helpers.slurm import SlurmCluster


@pytest.fixture(scope="session")
def slurm_cluster():
    base = tempfile.mkdtemp(prefix="clip-slurm-")  # not under pytest's 0700 tmp: munged reads it
    cluster = SlurmCluster.start(base)
    try:
        yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(base, ignore_errors=True)
