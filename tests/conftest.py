"""Fixtures shared by the test modules that run the pipeline on a local Ray."""

import pytest
import ray

from orchestrator.cluster import start_local_ray


@pytest.fixture(scope="module")
def local_ray():
    """One local Ray per test module, every socket on 127.0.0.1 (as the program's own local Ray)."""
    # 2 synthesis actors + 2 ranks; the phases alternate, so 4 logical CPUs on 2 cores (as orchestrator.cluster).
    start_local_ray(4, 1 << 30)
    yield
    ray.shutdown()
