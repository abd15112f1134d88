"""Settings every test shares. Area fixtures live in each folder's conftest.py; shared test
code (fixture builders, subprocess helpers) lives in tests/helpers/."""
import os

# Keep each test process to one thread (2-core CI machine), and keep every library offline.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def restore_environment():
    """Undo what a test leaves in os.environ: in-process distributed init sets MASTER_PORT,
    RANK, ... (training.distributed), which later subprocesses would inherit."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)
