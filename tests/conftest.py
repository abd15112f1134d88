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
