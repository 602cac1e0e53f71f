"""Faults in a real pipeline run on a local Ray: killed synthesis actors, a killed DeepSpeed rank, a killed driver,
corrupt shards, a full disk and non-finite losses. Every run is compared with an uninterrupted run of the same
seed; what must be bit-identical is (see the README's fault table for why)."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from nayer.cli_config import parse_config
from nayer.losses import NonFiniteLossError
from nayer.runtime import DiskFullError, RunError
from orchestrator.config import PipelineConfig
from orchestrator.faults import ENV
from orchestrator.run import run
from orchestrator.shards import CorruptShardError, Manifest
from helpers import pipeline_args as tiny_args, records

ROOT = Path(__file__).resolve().parents[1]


def shard_digests(folder: Path) -> list[tuple[str, int, str]]:
    return [(s["path"], s["samples"], s["sha256"]) for s in Manifest.load(folder / "buffer").shards]


def assert_same_student(folder: Path, reference: Path) -> None:
    """The final student, bit for bit."""
    ours, theirs = (torch.load(f / "student.pt", weights_only=True) for f in (folder, reference))
    assert ours.keys() == theirs.keys()
    for key, value in ours.items():
        assert torch.equal(value, theirs[key]), key


def assert_buffer_consistent(folder: Path) -> None:
    """Files on disk == the manifest (nothing half-written, nothing duplicated, no temporary file left)."""
    buffer = folder / "buffer"
    listed = [s["path"] for s in Manifest.load(buffer).shards]
    assert len(listed) == len(set(listed))
    assert sorted(p.relative_to(buffer).as_posix() for p in buffer.glob("round-*/*")) == sorted(listed)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, local_ray):
    """The uninterrupted run every fault run is compared with: 1 warm-up + 2 KD rounds."""
    base = tmp_path_factory.mktemp("reference")
    run(parse_config(PipelineConfig, tiny_args(base, name="ref")))
    return base / "runs" / "ref"


@pytest.fixture
def faults(monkeypatch):
    def inject(spec: str) -> None:
        monkeypatch.setenv(ENV, spec)
    return inject


def test_killed_actor_and_killed_rank_are_restarted_and_the_result_is_unchanged(tmp_path, reference, faults):
    """Two faults in one run: a synthesis actor SIGKILLed half-way through its first shard of round 1, and DeepSpeed
    rank 1 SIGKILLed before step 1 of round 2. Ray restarts the actor, which reloads the last checkpoint and
    retries its round; Ray Train restarts the ranks from round 1's checkpoint and they redo round 2."""
    faults("kill_synthesis_writing:round=1,worker=0;kill_rank:round=2,rank=1,step=1")
    summary = run(parse_config(PipelineConfig, tiny_args(tmp_path, **{"cluster.synth_max_restarts": 1,
                                                                      "cluster.trainer_max_failures": 1})))
    folder = tmp_path / "runs" / "tiny"
    assert (folder / "faults" / "0-kill_synthesis_writing.fired").is_file()  # it did die, half-way into a shard
    assert (folder / "faults" / "1-kill_rank.fired").is_file()
    assert summary["rounds_run"] == 3 and summary["buffer_images"] == 120
    assert_buffer_consistent(folder)
    # The restarted actor's round is reseeded: the same images, byte for byte; the ranks' round 2 uses its own seeds.
    assert shard_digests(folder) == shard_digests(reference)
    log = records(folder)
    assert [r["epoch"] for r in log] == [0, 1, 2] and log[2]["kd_steps_per_rank"] == [3, 3]
    assert [r["top1"] for r in log[1:]] == [r["top1"] for r in records(reference)[1:]]
    assert_same_student(folder, reference)


def test_synthesis_actor_killed_without_restarts_stops_the_run_resumably(tmp_path, reference, faults):
    faults("kill_synthesis_writing:round=1,worker=1")
    with pytest.raises(RunError, match="synthesis worker 1 died .*cluster.synth_max_restarts=N"):
        run(parse_config(PipelineConfig, tiny_args(tmp_path)))
    folder = tmp_path / "runs" / "tiny"
    assert torch.load(folder / "checkpoints" / "driver.pt", weights_only=True)["round"] == 0
    assert {s["round"] for s in Manifest.load(folder / "buffer").shards} == {0}  # round 1's shards never committed
    summary = run(parse_config(PipelineConfig, tiny_args(tmp_path, **{"cluster.synth_max_restarts": 1})
                               + ["resume=true"]))  # a restart policy may change on resume
    assert summary["rounds_run"] == 3
    assert_buffer_consistent(folder)
    assert shard_digests(folder) == shard_digests(reference)


def test_killed_deepspeed_rank_without_restarts_stops_with_a_clear_error(tmp_path, faults):
    faults("kill_rank:round=1,rank=0,step=0")
    with pytest.raises(RunError, match=r"the DeepSpeed ranks stopped \(.*\); cluster.trainer_max_failures=N"):
        run(parse_config(PipelineConfig, tiny_args(tmp_path)))


def test_driver_killed_mid_round_resumes_from_the_last_committed_round(tmp_path, reference, local_ray):
    """The driver process dies (SIGKILL) on a cluster that lives on: Ray ends its actors and ranks with it."""
    folder = tmp_path / "runs" / "tiny"
    env = {**os.environ, "RAY_ADDRESS": local_ray}
    driver = subprocess.Popen([sys.executable, "-m", "orchestrator.run", *tiny_args(tmp_path)], cwd=ROOT, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    deadline = time.monotonic() + 240
    # Round 1 (the first KD round) checkpointed, round 2's synthesis under way: kill the driver there.
    while not (folder / "buffer" / "round-00002").is_dir():
        assert driver.poll() is None and time.monotonic() < deadline, driver.communicate()[0][-3000:]
        time.sleep(0.05)
    os.kill(driver.pid, signal.SIGKILL)
    driver.wait(30)
    # Killed in round 2's synthesis or KD: its shards may be written, even committed to the manifest, but the
    # driver checkpoint (round 1) does not list them.
    on_disk = json.loads((folder / "buffer" / "manifest.json").read_text())["shards"]
    assert {s["round"] for s in on_disk} <= {0, 1, 2} and len(records(folder)) == 2
    assert torch.load(folder / "checkpoints" / "driver.pt", weights_only=True)["round"] == 1
    before = [s for s in on_disk if s["round"] <= 1]

    summary = run(parse_config(PipelineConfig, tiny_args(tmp_path) + ["resume=true"]))
    assert summary["rounds_run"] == 3 and [r["epoch"] for r in records(folder)] == [0, 1, 2]
    after = Manifest.load(folder / "buffer").shards
    assert after[:len(before)] == before  # committed shards untouched
    assert_buffer_consistent(folder)
    assert shard_digests(folder) == shard_digests(reference)
    assert records(folder)[2]["top1"] == records(reference)[2]["top1"]
    assert_same_student(folder, reference)


def corrupt_after_round(round_index: int, folder: Path):
    """on_round callback: after `round_index`, flip a byte in the first committed shard."""
    def on_round(record: dict) -> None:
        if record["epoch"] == round_index:
            path = folder / "buffer" / Manifest.load(folder / "buffer").shards[0]["path"]
            data = bytearray(path.read_bytes())
            data[600] ^= 0xFF
            path.write_bytes(bytes(data))
    return on_round


def test_corrupt_shard_is_never_trained_on_fail_then_exclude_on_resume(tmp_path, local_ray):
    folder = tmp_path / "runs" / "tiny"
    bad = Path("round-00000") / "worker-000-000000.tar"
    with pytest.raises(CorruptShardError, match=f"buffer shard {folder.resolve() / 'buffer' / bad}: its sha256 does not match"):
        run(parse_config(PipelineConfig, tiny_args(tmp_path)), on_round=corrupt_after_round(1, folder))
    with pytest.raises(CorruptShardError, match=f"{folder / 'buffer' / bad}: its sha256"):  # the resume check
        run(parse_config(PipelineConfig, tiny_args(tmp_path) + ["resume=true"]))
    summary = run(parse_config(PipelineConfig, tiny_args(tmp_path, **{"cluster.on_corrupt_shard": "exclude"})
                               + ["resume=true"]))
    assert summary["rounds_run"] == 3 and summary["buffer_images"] == 120 - 7  # 20 split 7/7/6: a 7 went
    assert (folder / "buffer" / "quarantine" / bad).is_file()
    assert bad.as_posix() not in [s["path"] for s in Manifest.load(folder / "buffer").shards]


def test_corrupt_shard_found_by_the_ranks_is_excluded(tmp_path, local_ray):
    folder = tmp_path / "runs" / "tiny"
    summary = run(parse_config(PipelineConfig, tiny_args(tmp_path, **{"cluster.on_corrupt_shard": "exclude"})),
                  on_round=corrupt_after_round(1, folder))
    log = records(folder)
    assert summary["rounds_run"] == 3 and log[2]["excluded_shards"] == 1 and log[2]["buffer"] == 120 - 7
    assert (folder / "buffer" / "quarantine" / "round-00000" / "worker-000-000000.tar").is_file()


def test_full_disk_stops_the_run_with_the_previous_checkpoint_intact(tmp_path, local_ray):
    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=48m", "tmpfs", str(disk)], capture_output=True).returncode:
        pytest.skip("mounting a tmpfs needs root (CAP_SYS_ADMIN); test_faults.py covers the writer with a patch")
    try:
        folder = disk / "runs" / "tiny"
        ballast = disk / "ballast"

        def fill_disk(record: dict) -> None:
            if record["epoch"] == 1:
                with open(ballast, "wb") as f:
                    try:
                        while True:
                            f.write(b"\0" * (1 << 16))
                            f.flush()
                    except OSError:
                        pass

        args = tiny_args(disk, **{"lte.cache_dir": str(tmp_path / "lte")})
        with pytest.raises(DiskFullError, match=f"disk full writing {folder.resolve()}/buffer/round-00002/"):
            run(parse_config(PipelineConfig, args), on_round=fill_disk)
        assert torch.load(folder / "checkpoints" / "driver.pt", weights_only=True)["round"] == 1
        assert not list((folder / "buffer").rglob("*.tmp"))
        ballast.unlink()
        summary = run(parse_config(PipelineConfig, args + ["resume=true"]))
        assert summary["rounds_run"] == 3
        assert_buffer_consistent(folder)
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


def test_nonfinite_losses_stop_naming_the_step_or_are_skipped_on_every_rank(tmp_path, local_ray):
    with pytest.raises(NonFiniteLossError, match="generator loss is inf at round 0, iteration 0, generator step 0"):
        run(parse_config(PipelineConfig, tiny_args(tmp_path, name="g", **{"synthesis.a_bn": 1e39})))
    diverging = {"kd.lr": 1e30, "kd.momentum": 0.0, "kd.weight_decay": 0.0}
    with pytest.raises(NonFiniteLossError, match=r"KD loss is (nan|inf) at round \d, KD step \d on rank \d"):
        run(parse_config(PipelineConfig, tiny_args(tmp_path, name="kd", **diverging)))
    summary = run(parse_config(PipelineConfig, tiny_args(tmp_path, name="skip", on_nonfinite="skip", **diverging)))
    log = records(tmp_path / "runs" / "skip")
    assert summary["rounds_run"] == 3 and sum(r["kd_nonfinite_steps"] for r in log[1:]) > 0
    for r in log[1:]:  # skipped together: every rank took the same number of steps
        assert len(set(r["kd_steps_per_rank"])) == 1
