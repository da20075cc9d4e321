"""One real Ray instance for the whole test run, shared by every cluster test."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def ray_instance():
    import ray

    os.chdir(ROOT)  # workers import agents.* and tests.* from the project directory
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    ctx = ray.init(num_cpus=4, include_dashboard=False, logging_level="WARNING", resources={"warden_sandbox": 1000})
    yield ctx
    ray.shutdown()


@pytest.fixture
def runs_dir(tmp_path, monkeypatch):
    """Each test's job writes its run directory (audit log, workspace) under tmp_path."""
    return tmp_path
