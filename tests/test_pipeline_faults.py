"""Faults in a real pipeline run on a local Ray, in both schedules (alternating: Algorithm 1 exactly; overlapped:
round r+1 synthesized while round r trains): killed synthesis actors, a killed DeepSpeed rank, a killed driver,
corrupt shards, a full disk and non-finite losses. Every run that goes on is compared with an uninterrupted run of
the same seed and schedule; what must be bit-identical is (see the README's fault table for why). Most drills are in
the slow tier (see SCHEDULES).

1 warm-up round + 2 KD rounds. Overlapped, round 1 is synthesized alone (nothing to train yet), then round 2 is
synthesized while round 1 trains, then round 2 trains alone. The faults are placed so that in the overlapped
schedule they hit the concurrent step: an actor killed in round 2 dies while the ranks train round 1, a rank killed
in round 1 dies while the actors synthesize round 2.
"""

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
from orchestrator.state import DriverState
from helpers import ROOT, pipeline_args, records

# Both schedules run every drill in the slow tier (`make test-all`). The fast tier (`make test`) keeps the overlapped
# schedule's comparison and its two-fault restart drill: the other pipeline tests run alternating already (on 2 cores
# `auto` resolves to it), and the overlapped schedule is the one with concurrent steps to break.
SCHEDULES = [pytest.param("alternating", marks=pytest.mark.slow), "overlapped"]


@pytest.fixture(scope="module", params=SCHEDULES)
def schedule(request) -> str:
    return request.param


def args(tmp_path, schedule, **extra):
    return pipeline_args(tmp_path, **{"cluster.schedule": schedule, **extra})


def done_round(folder: Path) -> int:
    """The last round the driver checkpointed."""
    return DriverState.load(folder / "checkpoints" / "driver.pt").done


def shard_digests(folder: Path) -> list[tuple[str, int, str]]:
    return [(s.path, s.samples, s.sha256) for s in Manifest.load(folder / "buffer").shards]


def assert_same_student(folder: Path, reference: Path) -> None:
    """The final student, bit for bit."""
    ours, theirs = (torch.load(f / "student.pt", weights_only=True) for f in (folder, reference))
    assert ours.keys() == theirs.keys()
    for key, value in ours.items():
        assert torch.equal(value, theirs[key]), key


def assert_buffer_consistent(folder: Path) -> None:
    """Files on disk == the manifest (nothing half-written, nothing duplicated, no temporary file left)."""
    buffer = folder / "buffer"
    listed = [s.path for s in Manifest.load(buffer).shards]
    assert len(listed) == len(set(listed))
    assert sorted(p.relative_to(buffer).as_posix() for p in buffer.glob("round-*/*")) == sorted(listed)


@pytest.fixture
def reference(reference_run, schedule) -> Path:
    """The uninterrupted run every fault run of this schedule is compared with (conftest.reference_run)."""
    return reference_run(schedule)


@pytest.fixture
def faults(monkeypatch):
    def inject(spec: str) -> None:
        monkeypatch.setenv(ENV, spec)
    return inject


def test_the_schedules_differ_only_where_they_should(reference, schedule):
    log = records(reference)
    assert [r["schedule"] for r in log] == [schedule] * 3
    # The adversarial term of round 2 used the student after round 1 (alternating) or round 0: none (overlapped).
    assert [r["adv_student_round"] for r in log] == [None, -1, 1 if schedule == "alternating" else -1]
    assert [r["step_synthesis_round"] for r in log] == ([0, 1, 2] if schedule == "alternating" else [0, 2, None])


def test_killed_actor_and_killed_rank_are_restarted_and_the_result_is_unchanged(tmp_path, reference, schedule, faults):
    """Two faults in one run: a synthesis actor SIGKILLed half-way through its first shard of round 2, and DeepSpeed
    rank 1 SIGKILLed before step 1 of round 1. Ray restarts the actor, which reloads its own state file of the last
    committed round and retries the round; Ray Train restarts the ranks from their last checkpoint."""
    faults("kill_synthesis_writing:round=2,worker=0;kill_rank:round=1,rank=1,step=1")
    summary = run(parse_config(PipelineConfig, args(tmp_path, schedule, **{"cluster.synth_max_restarts": 1,
                                                                         "cluster.trainer_max_failures": 1})))
    folder = tmp_path / "runs" / "tiny"
    assert (folder / "faults" / "0-kill_synthesis_writing.fired").is_file()  # it did die, half-way into a shard
    assert (folder / "faults" / "1-kill_rank.fired").is_file()
    assert summary["rounds_run"] == 3 and summary["buffer_images"] == 120
    assert_buffer_consistent(folder)
    # The restarted actor's round is reseeded: the same images, byte for byte; the ranks' round uses its own seeds.
    assert shard_digests(folder) == shard_digests(reference)
    log = records(folder)
    assert [r["epoch"] for r in log] == [0, 1, 2] and log[1]["kd_steps_per_rank"] == [3, 3]
    assert [r["top1"] for r in log[1:]] == [r["top1"] for r in records(reference)[1:]]
    assert_same_student(folder, reference)


@pytest.mark.slow
def test_synthesis_actor_killed_without_restarts_stops_the_run_resumably(tmp_path, reference, schedule, faults):
    faults("kill_synthesis_writing:round=2,worker=1")
    with pytest.raises(RunError, match="synthesis worker 1 died .*cluster.synth_max_restarts=N"):
        run(parse_config(PipelineConfig, args(tmp_path, schedule)))
    folder = tmp_path / "runs" / "tiny"
    # Alternating, round 1 was checkpointed before round 2 began; overlapped, round 2 was made during round 1.
    assert done_round(folder) == (1 if schedule == "alternating" else 0)
    summary = run(parse_config(PipelineConfig, args(tmp_path, schedule, **{"cluster.synth_max_restarts": 1})
                               + ["resume=true"]))  # a restart policy may change on resume
    assert summary["rounds_run"] == 3
    assert_buffer_consistent(folder)
    assert shard_digests(folder) == shard_digests(reference)
    assert_same_student(folder, reference)


@pytest.mark.slow
def test_killed_deepspeed_rank_without_restarts_stops_with_a_clear_error(tmp_path, schedule, faults):
    faults("kill_rank:round=1,rank=0,step=0")
    with pytest.raises(RunError, match=r"the DeepSpeed ranks stopped \(.*\); cluster.trainer_max_failures=N"):
        run(parse_config(PipelineConfig, args(tmp_path, schedule)))


@pytest.mark.slow
def test_driver_killed_mid_round_resumes_from_the_last_committed_round(tmp_path, reference, schedule, local_ray):
    """The driver process dies (SIGKILL) on a cluster that lives on: Ray ends its actors and ranks with it."""
    folder = tmp_path / "runs" / "tiny"
    env = {**os.environ, "RAY_ADDRESS": local_ray}
    driver = subprocess.Popen([sys.executable, "-m", "orchestrator.run", *args(tmp_path, schedule)], cwd=ROOT,
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              start_new_session=True)
    deadline = time.monotonic() + 240
    # Round 2's synthesis under way (overlapped: while round 1 trains): kill the driver there.
    while not (folder / "buffer" / "round-00002").is_dir():
        assert driver.poll() is None and time.monotonic() < deadline, driver.communicate()[0][-3000:]
        time.sleep(0.05)
    os.kill(driver.pid, signal.SIGKILL)
    driver.wait(30)
    # Round 2's shards may be written, even committed to the manifest, but the driver checkpoint does not list them
    # (overlapped: round 1 may have ended just before the kill, with round 2 committed and checkpointed).
    done = done_round(folder)
    assert done in ((1,) if schedule == "alternating" else (0, 1)) and len(records(folder)) == done + 1
    synthesized = DriverState.load(folder / "checkpoints" / "driver.pt").synthesized
    before = [s for s in Manifest.load(folder / "buffer").shards if s.round <= synthesized]

    summary = run(parse_config(PipelineConfig, args(tmp_path, schedule) + ["resume=true"]))
    assert summary["rounds_run"] == 3 and [r["epoch"] for r in records(folder)] == [0, 1, 2]
    assert Manifest.load(folder / "buffer").shards[:len(before)] == before  # committed shards untouched
    assert_buffer_consistent(folder)
    assert shard_digests(folder) == shard_digests(reference)
    assert records(folder)[2]["top1"] == records(reference)[2]["top1"]
    assert_same_student(folder, reference)


@pytest.mark.slow
def test_a_shard_corrupted_on_storage_is_caught_at_its_first_read(tmp_path, schedule, faults):
    """A byte of worker 0's first shard of round 2 flips after its write: the rank that owns it finds the sha256
    wrong when it reads it, before any sample of it is used. `fail` stops the run naming it; on resume with
    `exclude`, the shard goes to quarantine and the run completes without it."""
    faults("corrupt_shard:round=2,worker=0")
    folder = tmp_path / "runs" / "tiny"
    bad = folder.resolve() / "buffer" / "round-00002" / "worker-000-000000.tar"
    with pytest.raises(CorruptShardError, match=f"buffer shard {bad}: its sha256 does not match"):
        run(parse_config(PipelineConfig, args(tmp_path, schedule)))
    assert done_round(folder) == 1
    summary = run(parse_config(PipelineConfig, args(tmp_path, schedule, **{"cluster.on_corrupt_shard": "exclude"})
                               + ["resume=true"]))
    assert summary["rounds_run"] == 3
    if schedule == "alternating":  # round 2 was never checkpointed: it is synthesized again (the fault fired once)
        assert summary["buffer_images"] == 120 and not (folder / "buffer" / "quarantine").exists()
    else:  # round 2 was committed and checkpointed a step before its first read: the resume's check excludes it
        assert summary["buffer_images"] == 120 - 7 and (folder / "buffer" / "quarantine" / bad.relative_to(
            folder.resolve() / "buffer")).is_file()
    assert_buffer_consistent(folder)


@pytest.mark.slow
def test_a_corrupt_shard_found_by_a_rank_is_excluded_and_the_run_goes_on(tmp_path, schedule, faults):
    faults("corrupt_shard:round=2,worker=0")
    folder = tmp_path / "runs" / "tiny"
    summary = run(parse_config(PipelineConfig, args(tmp_path, schedule, **{"cluster.on_corrupt_shard": "exclude"})))
    assert summary["rounds_run"] == 3 and summary["buffer_images"] == 120 - 7  # 20 split 7/7/6: a 7 went
    assert sum(r["excluded_shards"] for r in records(folder)) == 1
    assert (folder / "buffer" / "quarantine" / "round-00002" / "worker-000-000000.tar").is_file()
    assert "round-00002/worker-000-000000.tar" not in [s.path for s in Manifest.load(folder / "buffer").shards]


@pytest.mark.slow
def test_a_shard_read_once_then_corrupted_is_caught_on_resume(tmp_path, schedule):
    """Each rank reads a shard once and keeps its samples, so bit rot after that read harms nothing in the run; a
    resumed run reads every shard again, checks it, and fails or excludes it."""
    folder = tmp_path / "runs" / "tiny"

    def flip_first_shard(record: dict) -> None:
        if record["epoch"] == 1:
            path = folder / "buffer" / Manifest.load(folder / "buffer").shards[0].path
            data = bytearray(path.read_bytes())
            data[600] ^= 0xFF
            path.write_bytes(bytes(data))

    assert run(parse_config(PipelineConfig, args(tmp_path, schedule, epochs=3)),
               on_round=flip_first_shard)["rounds_run"] == 4  # never read again after round 1
    bad = Path("round-00000") / "worker-000-000000.tar"
    more = args(tmp_path, schedule, epochs=3) + ["resume=true"]
    with pytest.raises(CorruptShardError, match=f"{folder / 'buffer' / bad}: its sha256"):
        run(parse_config(PipelineConfig, more))
    summary = run(parse_config(PipelineConfig, more + ["cluster.on_corrupt_shard=exclude"]))
    assert summary["rounds_run"] == 4 and summary["buffer_images"] == 160 - 7
    assert (folder / "buffer" / "quarantine" / bad).is_file()
    # no round was left to run: the exclusion is in the summary, and the verdict counts it
    assert summary["excluded_on_resume"] == 1 and "1 excluded shards on resume" in summary["verdict"]


@pytest.mark.slow
def test_full_disk_stops_the_run_with_the_previous_checkpoint_intact(tmp_path, schedule, local_ray):
    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=48m", "tmpfs", str(disk)], capture_output=True).returncode:
        pytest.skip("mounting a tmpfs needs root (CAP_SYS_ADMIN); test_faults.py covers the writer with a patch")
    # The disk fills after a round; the next shard written is round 2's (alternating) or round 1's (overlapped:
    # round 2's shards were written during round 1, so fill it after the warm-up round).
    fill_after, failing = (1, 2) if schedule == "alternating" else (0, 1)
    try:
        folder = disk / "runs" / "tiny"
        ballast = disk / "ballast"

        def fill_disk(record: dict) -> None:
            if record["epoch"] == fill_after:
                with open(ballast, "wb", buffering=0) as f:  # unbuffered: closing it writes nothing more
                    try:
                        while True:
                            f.write(b"\0" * (1 << 16))
                            f.flush()
                    except OSError:
                        pass

        run_args = args(disk, schedule, **{"lte.cache_dir": str(tmp_path / "lte")})
        with pytest.raises(DiskFullError, match=f"disk full writing {folder.resolve()}/buffer/round-{failing:05d}/"):
            run(parse_config(PipelineConfig, run_args), on_round=fill_disk)
        assert done_round(folder) == fill_after
        assert not list((folder / "buffer").rglob("*.tmp"))
        ballast.unlink()
        summary = run(parse_config(PipelineConfig, run_args + ["resume=true"]))
        assert summary["rounds_run"] == 3
        assert_buffer_consistent(folder)
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


@pytest.mark.slow
def test_nonfinite_losses_stop_naming_the_step_or_are_skipped_on_every_rank(tmp_path, schedule, local_ray):
    # the round's iteration: each actor's first is its share's start (whichever actor raises first names its own)
    with pytest.raises(NonFiniteLossError, match=r"generator loss is inf at round 0, iteration [01], generator step 0"):
        run(parse_config(PipelineConfig, args(tmp_path, schedule, name="g", **{"synthesis.a_bn": 1e39})))
    diverging = {"kd.lr": 1e30, "kd.momentum": 0.0, "kd.weight_decay": 0.0}
    with pytest.raises(NonFiniteLossError, match=r"KD loss is (nan|inf) at round \d, KD step \d on rank \d"):
        run(parse_config(PipelineConfig, args(tmp_path, schedule, name="kd", **diverging)))
    summary = run(parse_config(PipelineConfig, args(tmp_path, schedule, name="skip", on_nonfinite="skip",
                                                    **diverging)))
    log = records(tmp_path / "runs" / "skip")
    assert summary["rounds_run"] == 3 and sum(r["kd_nonfinite_steps"] for r in log[1:]) > 0
    for r in log[1:]:  # skipped together: every rank took the same number of steps
        assert len(set(r["kd_steps_per_rank"])) == 1
