"""`ray job submit` as the README shows it: a head started with `ray start --head` on loopback, the project uploaded
as the job's working directory with configs/ray/runtime_env.yaml, a tiny pipeline run that must reach SUCCEEDED."""

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from helpers import pipeline_args as tiny_args

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent  # the venv's ray and python: the job's `python` must be this one


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(check, timeout: float, what: str, interval: float = 1.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


@pytest.fixture
def ray_head():
    """`ray start --head --block` in its own process group: stopping it stops this head only (`ray stop` would
    stop every Ray on the machine). Token authentication on, as the README sets it up: head and client share a
    token (here in the environment; on a cluster `ray get-auth-token --generate` writes ~/.ray/auth_token)."""
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
           "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}
    dashboard = free_port()
    temp_dir = tempfile.mkdtemp(prefix="rj", dir="/tmp")  # short: Ray's socket paths have a length limit
    head = subprocess.Popen(
        [str(BIN / "ray"), "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={free_port()}",
         "--num-cpus=4", "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}",
         # ports of their own: the tests' session Ray on this machine holds the defaults (agent 52365, ...)
         *(f"--{name}={free_port()}" for name in ("dashboard-agent-listen-port", "dashboard-agent-grpc-port",
                                                  "metrics-export-port", "runtime-env-agent-port",
                                                  "ray-client-server-port")),
         f"--temp-dir={temp_dir}"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    address = f"http://127.0.0.1:{dashboard}"

    def jobs_api_up():
        return subprocess.run([str(BIN / "ray"), "job", "list", "--address", address], env=env,
                              capture_output=True).returncode == 0

    try:
        wait_until(jobs_api_up, 90, "the head's job API")
        refused = subprocess.run([str(BIN / "ray"), "job", "list", "--address", address], capture_output=True,
                                 env={**env, "RAY_AUTH_TOKEN": secrets.token_hex(32)})
        assert refused.returncode != 0  # the job API is not open to a client without the cluster's token
        yield address, env
    finally:
        os.killpg(head.pid, signal.SIGTERM)
        try:
            head.wait(5)
        except subprocess.TimeoutExpired:  # a graceful `ray stop` of the whole head takes ~30 s: not needed here
            pass
        try:
            os.killpg(head.pid, signal.SIGKILL)  # what is left of the head's processes
        except ProcessLookupError:
            pass
        head.wait(30)
        shutil.rmtree(temp_dir, ignore_errors=True)


def test_ray_job_submit_runs_a_tiny_pipeline_to_succeeded(tmp_path, ray_head):
    address, env = ray_head
    job_id = f"nayer-test-{os.getpid()}"
    out = tmp_path / "shared"  # an absolute path: the job's working directory is a temporary copy
    submit = [str(BIN / "ray"), "job", "submit", "--address", address, "--submission-id", job_id, "--no-wait",
              "--working-dir", ".", "--runtime-env", "configs/ray/runtime_env.yaml", "--",
              "python", "-m", "orchestrator.run", *tiny_args(tmp_path, out_dir=out, name="job", warmup=1, epochs=1)]

    def submitted():  # the job API answers before the head's job agent is up ("No available agent ... try again")
        done = subprocess.run(submit, cwd=ROOT, env=env, capture_output=True, text=True)
        assert done.returncode == 0 or "No available agent" in done.stderr, done.stderr[-2000:]
        return done.returncode == 0

    wait_until(submitted, 90, "the head's job agent", interval=2.0)

    status_of_job = [sys.executable, "-c", "import sys; from ray.job_submission import JobSubmissionClient as C; "
                     "print(C(sys.argv[1]).get_job_status(sys.argv[2]).value)", address, job_id]

    def final_status():
        status = subprocess.run(status_of_job, env=env, capture_output=True, text=True).stdout.strip()
        return status if status in ("SUCCEEDED", "FAILED", "STOPPED") else None

    # A status query is a Python process that imports Ray (seconds of CPU, on the 2 cores the job runs on): ask only
    # once the run folder has its summary, or every 15 s in case the job failed before writing one.
    asked = [time.monotonic()]

    def ended():
        if not (out / "job" / "summary.json").is_file() and time.monotonic() - asked[0] < 15:
            return None
        asked[0] = time.monotonic()
        return final_status()

    status = wait_until(ended, 420, f"job {job_id} to end")
    logs = subprocess.run([str(BIN / "ray"), "job", "logs", "--address", address, job_id], env=env,
                          capture_output=True, text=True).stdout
    assert status == "SUCCEEDED", logs[-3000:]
    summary = json.loads((out / "job" / "summary.json").read_text())
    assert summary["rounds_run"] == 2 and summary["final_top1"] is not None
    assert (out / "job" / "report.md").is_file()
    assert "job round 2/2 [kd]" in logs  # the driver's per-round line: no carriage-return bars in job logs
