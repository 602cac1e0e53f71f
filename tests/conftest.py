"""Fixtures shared by the test modules (helpers that are not fixtures live in helpers.py)."""

import os
import sys
from pathlib import Path

import pytest
import ray

from orchestrator.cluster import start_local_ray
from helpers import free_port, start_s3_server


# The venv's tools first, as in an activated venv (README) and as the `ray job submit` test needs them: DeepSpeed's
# JIT-built comm op is cached by ninja, and the venv's ninja (1.13) and the system's (1.11) do not read each other's
# build log, so mixing them rebuilds the op (~40 s) at every switch.
os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"

# Ray Train's controller polls its workers this often (default 2 s): a test run notices finished or failed ranks
# sooner. Read by the driver and passed on to the controller by Ray Train itself.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")


# The object store tests' S3-compatible server (moto's, started by the `s3` fixture on 127.0.0.1): its address and
# test credentials are in the environment from the start, so the session's local Ray and every worker it starts
# have them, as a cluster's nodes have their store's. Set, not defaulted: the tests never reach a real store.
S3_ENDPOINT = f"http://127.0.0.1:{free_port()}"
os.environ.update(AWS_ENDPOINT_URL=S3_ENDPOINT, AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing",
                  AWS_DEFAULT_REGION="us-east-1")


@pytest.fixture(scope="session")
def s3() -> str:
    """A bucket on a local S3 server that the tests start themselves (moto[server], 127.0.0.1 only); its URL."""
    server = start_s3_server(int(S3_ENDPOINT.rsplit(":", 1)[1]), "nayer-tests")
    yield "s3://nayer-tests"
    server.terminate()
    server.wait(10)


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


@pytest.fixture(scope="session")
def reference_run(tmp_path_factory, local_ray):
    """`reference_run(schedule)`: the folder of the uninterrupted tiny pipeline run (helpers.pipeline_args) of that
    schedule, run once per session. The fault drills and the object store run are compared with it bit for bit."""
    from nayer.cli_config import parse_config
    from orchestrator.config import PipelineConfig
    from orchestrator.run import run
    from helpers import pipeline_args

    folders: dict[str, Path] = {}

    def reference(schedule: str) -> Path:
        if schedule not in folders:
            base = tmp_path_factory.mktemp(f"reference-{schedule}")
            run(parse_config(PipelineConfig, pipeline_args(base, name="ref", **{"cluster.schedule": schedule})))
            folders[schedule] = base / "runs" / "ref"
        return folders[schedule]

    return reference
