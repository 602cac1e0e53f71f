"""Fixtures shared by the test modules (helpers that are not fixtures live in helpers.py)."""

import os
import sys
from pathlib import Path

import pytest
import ray

from orchestrator.cluster import start_local_ray


# The venv's tools first, as in an activated venv (README) and as the `ray job submit` test needs them: DeepSpeed's
# JIT-built comm op is cached by ninja, and the venv's ninja (1.13) and the system's (1.11) do not read each other's
# build log, so mixing them rebuilds the op (~40 s) at every switch.
os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"

# Ray Train's controller polls its workers this often (default 2 s): a test run notices finished or failed ranks
# sooner. Read by the driver and passed on to the controller by Ray Train itself.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")


@pytest.fixture(scope="session")
def local_ray() -> str:
    """One local Ray for every test that runs the pipeline, every socket on 127.0.0.1 (as the program's own local
    Ray). Started once: a start costs seconds and a few hundred MB. In-process runs use it as it is; a driver in a
    subprocess attaches to it through RAY_ADDRESS (the value yielded), as a driver on a SLURM allocation does."""
    # 2 synthesis actors + 2 ranks; on 2 cores, as the program's own local Ray declares them (orchestrator.cluster).
    if not ray.is_initialized():
        start_local_ray(4, 1 << 30)
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()
