"""Faults without Ray: fault injection, full disks, corrupt and hostile shards, non-finite losses. Each checks
that nothing half-written becomes visible and that the error names what happened and where."""

import errno
import hashlib
import io
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from nayer.cli_config import ConfigError, parse_config
from nayer.config import RunConfig
from nayer.kd import StudentTrainer
from nayer.losses import NonFiniteLossError
from nayer.runtime import DiskFullError, atomic_write, save_torch
from nayer.methods.base import SynthesisParts
from nayer.methods.nayer import NayerSynthesizer
from orchestrator.faults import FaultPlan
from orchestrator.messages import ShardEntry
from orchestrator.shards import CorruptShardError, Manifest, shard_batches, write_shards
from helpers import CPU, spec

ROOT = Path(__file__).resolve().parents[1]


def test_fault_plan_kills_once_per_run_folder(tmp_path):
    script = ("import sys; from orchestrator.faults import FaultPlan; "
              "FaultPlan.parse('kill_rank:round=3,rank=1', sys.argv[1]).kill_if('kill_rank', round=3, rank=1, step=0); "
              "print('survived')")
    first = subprocess.run([sys.executable, "-c", script, str(tmp_path)], cwd=ROOT, capture_output=True, text=True)
    assert first.returncode == -9 and "SIGKILL" in first.stdout  # killed, no cleanup, like an OOM kill
    again = subprocess.run([sys.executable, "-c", script, str(tmp_path)], cwd=ROOT, capture_output=True, text=True)
    assert again.returncode == 0 and "survived" in again.stdout  # the restarted process goes on
    plan = FaultPlan.parse("kill_rank:round=3", tmp_path / "other")
    assert not plan.fires("kill_rank", round=4, rank=0, step=0)  # no match: nothing fires
    assert not plan.fires("kill_synthesis_writing", round=3, worker=0)
    assert not (tmp_path / "other").exists()  # and no marker is written


@pytest.mark.parametrize("spec, message", [
    ("kill_head:round=1", "unknown fault 'kill_head'.*choose one of: kill_synthesis_writing, kill_rank, corrupt_shard, "
     "kill_driver"),
    ("kill_rank:round=x", "bad 'round=x'.*kill_rank takes round=<int>, rank=<int>, step=<int>"),
    ("kill_synthesis_writing:rank=1", "bad 'rank=1'"),
])
def test_fault_plan_names_bad_specs(tmp_path, spec, message):
    with pytest.raises(ConfigError, match=message):
        FaultPlan.parse(spec, tmp_path)


def test_full_disk_keeps_the_previous_checkpoint_and_names_the_file(tmp_path):
    path = save_torch({"round": 1}, tmp_path / "checkpoint.pt")

    def half_then_enospc(tmp):
        Path(tmp).write_bytes(b"x" * 1000)
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(DiskFullError, match=f"disk full writing {path} .*the previous file is untouched"):
        atomic_write(path, half_then_enospc)
    assert torch.load(path, weights_only=True) == {"round": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt"]  # the partial temporary file is gone
    with pytest.raises(PermissionError):  # other OS errors stay what they are
        atomic_write(tmp_path / "x", lambda tmp: (_ for _ in ()).throw(PermissionError(errno.EACCES, "denied")))


def write_buffer(root, rounds=2, per_round=8):
    manifest = Manifest(root)
    for r in range(rounds):
        images = torch.full((per_round, 3, 4, 4), r, dtype=torch.uint8)
        manifest.commit(write_shards(root, r, 0, images, torch.arange(per_round) % 10, 4))
    return manifest


def flip_byte(path: Path, offset: int = 600) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def test_reader_never_trains_on_a_corrupt_shard(tmp_path):
    manifest = write_buffer(tmp_path)
    bad = tmp_path / manifest.shards[0].path
    flip_byte(bad)
    with pytest.raises(CorruptShardError, match=f"{bad}: its sha256 does not match the manifest checksum"):
        list(shard_batches(manifest.store, manifest.snapshot(), 4, 3, seed=0))
    excluded = []
    batches = list(shard_batches(manifest.store, manifest.snapshot(), 4, 6, seed=0, on_corrupt="exclude",
                                 excluded=excluded))
    assert excluded == [manifest.shards[0].path] and len(batches) == 6
    assert not any(torch.equal(x[0], torch.zeros(3, 4, 4, dtype=torch.uint8)) and y[0] in (0, 1, 2, 3)
                   for x, y in batches)  # the excluded shard held round 0's first 4 samples (all zeros, labels 0-3)
    truncated = tmp_path / manifest.shards[1].path
    truncated.write_bytes(truncated.read_bytes()[:700])
    with pytest.raises(CorruptShardError, match=f"{truncated}: 700 bytes on disk, .* in the manifest .truncated"):
        list(shard_batches(manifest.store, manifest.snapshot()[1:], 4, 1, seed=0))
    with pytest.raises(CorruptShardError, match="read 0 of 2 batches.*excluded as corrupt"):
        list(shard_batches(manifest.store, manifest.snapshot()[:2], 4, 2, seed=0, on_corrupt="exclude"))


def test_resume_check_excludes_or_fails_by_policy(tmp_path):
    manifest = write_buffer(tmp_path)
    bad = manifest.shards[2].path
    flip_byte(tmp_path / bad)
    (tmp_path / manifest.shards[3].path).unlink()
    with pytest.raises(CorruptShardError, match=f"{tmp_path / bad}: its sha256 .*on_corrupt_shard=exclude"):
        Manifest.load(tmp_path).verify("fail")
    reloaded = Manifest.load(tmp_path)
    messages = reloaded.verify("exclude")
    assert len(messages) == 2 and "missing" in messages[1]
    assert [s.path for s in Manifest.load(tmp_path).shards] == [s.path for s in manifest.shards[:2]]
    assert (tmp_path / "quarantine" / bad).is_file() and not (tmp_path / bad).exists()
    assert reloaded.discard_uncommitted() == []  # quarantine/ is not a round folder


def test_commit_refuses_a_shard_of_the_wrong_size_and_clears_killed_writes(tmp_path):
    manifest = Manifest(tmp_path)
    entries = write_shards(tmp_path, 0, 0, torch.zeros(8, 3, 4, 4, dtype=torch.uint8), torch.zeros(8, dtype=torch.long), 4)
    short = tmp_path / entries[1].path
    short.write_bytes(short.read_bytes()[:100])
    (tmp_path / "round-00000" / "worker-001-000000.tar.abc.tmp").write_bytes(b"half")  # a killed writer's
    with pytest.raises(CorruptShardError, match=f"cannot commit buffer shard {short}: 100 bytes on disk"):
        manifest.commit(entries)
    assert manifest.commit(entries, policy="exclude") == [f"buffer shard {short}: 100 bytes on disk, its writer "
                                                             f"wrote {entries[1].bytes}"]
    assert [s.path for s in manifest.shards] == [entries[0].path]
    assert manifest.remove_temporaries(0) == ["round-00000/worker-001-000000.tar.abc.tmp"]
    assert sorted(p.name for p in (tmp_path / "round-00000").iterdir()) == ["worker-000-000000.tar"]


def test_midway_hook_sees_a_half_written_temporary_shard_only(tmp_path):
    seen = []

    def midway():
        files = list((tmp_path / "round-00003").iterdir())
        seen.append([(f.name.endswith(".tmp"), f.stat().st_size > 0) for f in files])

    write_shards(tmp_path, 3, 1, torch.zeros(10, 3, 4, 4, dtype=torch.uint8), torch.zeros(10, dtype=torch.long), 10,
                 midway=midway)
    assert seen == [[(True, True)]]  # only a temporary name, with bytes in it, exists while the shard is written


def test_a_shard_with_a_pickled_array_is_refused_without_unpickling(tmp_path):
    payload = io.BytesIO()
    np.save(payload, np.array([{"evil": 1}], dtype=object), allow_pickle=True)
    shard = tmp_path / "round-00000" / "worker-000-000000.tar"
    shard.parent.mkdir()
    with tarfile.open(shard, "w") as tar:
        for name, data in (("s0.npy", payload.getvalue()), ("s0.cls", b"1")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    manifest = Manifest(tmp_path, [ShardEntry("round-00000/worker-000-000000.tar", samples=1, round=0, seq=0,
                                              bytes=shard.stat().st_size,
                                              sha256=hashlib.sha256(shard.read_bytes()).hexdigest())])
    with pytest.raises(CorruptShardError, match="sample s0 is not a uint8 image and a label.*allow_pickle"):
        list(shard_batches(manifest.store, manifest.snapshot(), 1, 1, seed=0))


class NaNOnCalls(nn.Module):
    """A teacher (or student) whose logits are NaN on the chosen forward calls, finite otherwise."""

    def __init__(self, calls, k=10):
        super().__init__()
        self.calls, self.n = set(calls), 0
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, k)

    def forward(self, x):
        out = self.fc(self.bn(self.conv(x)).mean((2, 3)))
        self.n += 1
        return out * float("nan") if self.n - 1 in self.calls else out


def synthesizer(teacher, policy, g_steps=3):
    cfg = parse_config(RunConfig, ["generator.nz=16", "generator.ngf=8", "synthesis.batch_size=10",
                                   f"synthesis.g_steps={g_steps}", "synthesis.g_loops=2", "synthesis.warmup_loops=2"])
    return NayerSynthesizer(SynthesisParts(teacher, NaNOnCalls([]), torch.randn(10, 8), spec(), CPU), cfg.generator,
                            cfg.synthesis, on_nonfinite=policy)


def test_nonfinite_generator_loss_stops_naming_round_iteration_and_step():
    with pytest.raises(NonFiniteLossError, match=r"generator loss is nan at round 0, iteration 1, generator step 1 "
                                                 r"\(loss=nan, bn=.*\): lower generator.lr .* on_nonfinite=skip"):
        synthesizer(NaNOnCalls([4]), "stop").synthesize(warmup=True)


def test_nonfinite_generator_steps_are_skipped_and_counted():
    # Calls 0-2: iteration 0 (step 1 NaN); calls 3-5: iteration 1, all NaN -> that iteration keeps no batch.
    result = synthesizer(NaNOnCalls([1, 3, 4, 5]), "skip").synthesize(warmup=True)
    assert result.stats["syn_nonfinite_steps"] == 4 and len(result.labels) == 10
    assert torch.isfinite(torch.tensor(result.stats["syn_loss"]))


def test_nonfinite_kd_loss_stops_or_skips_the_step():
    student = NaNOnCalls([])
    batches = [(torch.randint(0, 256, (4, 3, 8, 8), dtype=torch.uint8), None) for _ in range(4)]
    stopping = StudentTrainer(student, NaNOnCalls([2]).eval(), RunConfig().kd, 2, spec(), CPU)
    with pytest.raises(NonFiniteLossError, match="KD loss is nan at round 5, KD step 2: .*on_nonfinite=skip"):
        stopping.train_epoch(batches, 5)
    before = {k: v.detach().clone() for k, v in student.named_parameters()}
    skipping = StudentTrainer(student, NaNOnCalls([0, 1, 2, 3]).eval(), RunConfig().kd, 2, spec(), CPU,
                              on_nonfinite="skip")
    stats = skipping.train_epoch(batches, 5)
    assert stats["kd_nonfinite_steps"] == 4 and stats["kd_steps"] == 0
    for key, value in student.named_parameters():  # no optimizer step was taken on a NaN loss
        assert torch.equal(value, before[key]), key
