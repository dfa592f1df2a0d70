"""Shared pytest fixtures: repository root on sys.path, the real-data location, small helpers."""
import os
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

# Real data lives beside the project (../shared/data); DINO_DATA_ROOT overrides it.
DATA_ROOT = Path(os.environ.get("DINO_DATA_ROOT", REPO_ROOT.parent / "shared" / "data"))


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: long-running tests, run with `pytest -m slow`")


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO_ROOT


@pytest.fixture(scope="session")
def cifar10_root() -> Path:
    root = DATA_ROOT / "cifar10"
    if not (root / "train").is_dir():
        pytest.skip(f"real data not found at {root} (set DINO_DATA_ROOT or place ../shared/data beside the repo)")
    return root
