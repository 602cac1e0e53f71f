"""The WebDataset buffer without Ray: shard writes, the manifest, per-rank readers, the pipeline's config."""

import json
from pathlib import Path

import pytest
import torch
import webdataset as wds

from nayer.cli_config import ConfigError, parse_config
from orchestrator.config import PipelineConfig, load_deepspeed_config
from orchestrator.shards import Manifest, rank_samples, shard_batches, write_shards
from orchestrator.workers import split_iterations
from helpers import spec

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def images(n, offset=0):
    """n distinct 3x4x4 images whose label is their id (so a reader's output names the samples it read)."""
    x = torch.arange(offset, offset + n).view(n, 1, 1, 1).expand(n, 3, 4, 4).to(torch.uint8).clone()
    return x, torch.arange(offset, offset + n)


def committed_buffer(root, rounds=2, workers=2, per_worker=30, shard_samples=10):
    manifest = Manifest(root)
    offset = 0
    for r in range(rounds):
        entries = []
        for w in range(workers):
            x, y = images(per_worker, offset)
            offset += per_worker
            entries += write_shards(root, r, w, x, y, shard_samples)
        manifest.commit(r, entries)
    return manifest


def read_rank(monkeypatch, snapshot, rank, world, batch_size, num_batches, seed=0):
    monkeypatch.setenv("RANK", str(rank))
    monkeypatch.setenv("WORLD_SIZE", str(world))
    batches = list(shard_batches(snapshot, batch_size, num_batches, seed, shuffle_buffer=50))
    for x, y in batches:  # the pixels still carry the id the label claims: decode kept samples intact
        assert torch.equal(x[:, 0, 0, 0].long(), y % 256)
    return [y.tolist() for _, y in batches]


def test_split_iterations_covers_the_round():
    assert split_iterations(2, 2) == [1, 1]
    assert split_iterations(5, 2) == [3, 2]
    assert split_iterations(1, 3) == [1, 0, 0]


def test_shards_named_by_round_and_worker_with_counts_and_checksums(tmp_path):
    x, y = images(25)
    entries = write_shards(tmp_path, 7, 3, x, y, max_samples=10)
    assert [e["path"] for e in entries] == [f"round-00007/worker-003-00000{i}.tar" for i in range(3)]
    assert [e["samples"] for e in entries] == [9, 8, 8]
    assert all(len(e["sha256"]) == 64 and e["bytes"] == (tmp_path / e["path"]).stat().st_size for e in entries)
    assert len(write_shards(tmp_path, 8, 0, x[:4], y[:4], max_samples=10, min_shards=3)) == 3
    assert not list(tmp_path.rglob("*.tmp"))


def test_two_ranks_get_equal_batches_and_never_the_same_sample_in_a_pass(tmp_path, monkeypatch):
    manifest = committed_buffer(tmp_path, rounds=2, workers=2, per_worker=30, shard_samples=10)  # 12 shards
    snapshot = manifest.snapshot()
    assert rank_samples(snapshot, 2) == [60, 60]
    one_pass = 60 // 8  # 7 full batches of 8 per rank
    reads = [read_rank(monkeypatch, snapshot, rank, 2, 8, one_pass) for rank in (0, 1)]
    assert [len(r) for r in reads] == [one_pass, one_pass]
    seen = [i for rank in reads for batch in rank for i in batch]
    assert len(seen) == len(set(seen)) == 2 * one_pass * 8  # no sample twice, within or across ranks
    # Longer than a pass: still exactly the requested count on both ranks, each pass a fresh permutation.
    long = [read_rank(monkeypatch, snapshot, rank, 2, 8, 20) for rank in (0, 1)]
    assert [len(r) for r in long] == [20, 20]
    first_pass = [i for batch in long[0][:one_pass] for i in batch]
    assert len(set(first_pass)) == len(first_pass)


def test_readers_never_see_a_shard_that_is_not_committed(tmp_path, monkeypatch):
    manifest = committed_buffer(tmp_path, rounds=1, workers=2, per_worker=20)
    committed_ids = set(range(40))
    # A later round's shard renamed into place but not yet committed, and a write that dies half-way.
    x, y = images(20, offset=100)
    write_shards(tmp_path, 1, 0, x, y, 10)
    original = wds.TarWriter.write
    calls = {"n": 0}

    def dying_write(self, obj):
        calls["n"] += 1
        if calls["n"] > 5:
            raise OSError("disk full")
        return original(self, obj)

    monkeypatch.setattr(wds.TarWriter, "write", dying_write)
    with pytest.raises(OSError):
        write_shards(tmp_path, 1, 1, x, y, 10)
    monkeypatch.setattr(wds.TarWriter, "write", original)
    assert not (tmp_path / "round-00001" / "worker-001-000000.tar").exists()  # never under its final name
    assert not list(tmp_path.rglob("*.tmp"))  # the half-written temporary is removed
    snapshot = Manifest.load(tmp_path).snapshot()
    assert len(snapshot) == len(manifest.shards) == 4
    seen = {i for batch in read_rank(monkeypatch, snapshot, 0, 1, 10, 12) for i in batch}
    assert seen == committed_ids


def test_resume_drops_uncommitted_shards_and_verifies_checksums(tmp_path):
    manifest = committed_buffer(tmp_path, rounds=1, workers=2, per_worker=20)
    x, y = images(20, offset=100)
    orphan = write_shards(tmp_path, 1, 0, x, y, 10)  # written by the killed round, never committed
    (tmp_path / "round-00001" / "worker-001-000000.tar.1234.tmp").write_bytes(b"partial")
    reloaded = Manifest(tmp_path, json.loads((tmp_path / "manifest.json").read_text())["shards"])
    reloaded.verify()
    dropped = reloaded.discard_uncommitted()
    assert len(dropped) == len(orphan) + 1 and not (tmp_path / "round-00001").exists()
    assert [s["path"] for s in reloaded.shards] == [s["path"] for s in manifest.shards]
    first = tmp_path / manifest.shards[0]["path"]
    data = bytearray(first.read_bytes())
    data[600] ^= 0xFF  # one flipped byte inside the first sample
    first.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=f"{first}.*checksum"):
        reloaded.verify()


def test_pipeline_config_errors_name_the_bad_value(tmp_path):
    with pytest.raises(ConfigError, match="did you mean 'cluster.synth_workers'"):
        parse_config(PipelineConfig, ["cluster.synth_worker=2"])
    with pytest.raises(ConfigError, match="kd.batch_size=100 must be divisible by cluster.trainer_workers=3"):
        parse_config(PipelineConfig, ["kd.batch_size=100", "cluster.trainer_workers=3"])
    with pytest.raises(ConfigError, match="cluster.synth_workers must be >= 1, got 0"):
        parse_config(PipelineConfig, ["cluster.synth_workers=0"])
    cfg = parse_config(PipelineConfig, [f"config={CONFIGS / 'digits.yaml'}", "cluster.deepspeed=nowhere.json"])
    with pytest.raises(ConfigError, match="cluster.deepspeed='nowhere.json': no such file"):
        load_deepspeed_config(cfg)
    bad = tmp_path / "ds.json"
    bad.write_text('{"zero_optimization": {"stage": 3}}')
    cfg.cluster.deepspeed = str(bad)
    with pytest.raises(ConfigError, match="stage=3 is not supported; choose 0, 1 or 2"):
        load_deepspeed_config(cfg)


@pytest.mark.parametrize("name", ["zero0", "zero1", "zero2", "zero2_bf16"])
def test_shipped_deepspeed_configs_get_the_run_batch_sizes(name):
    cfg = parse_config(PipelineConfig, [f"config={CONFIGS / 'digits.yaml'}",
                                        f"cluster.deepspeed={CONFIGS / 'deepspeed' / (name + '.json')}"])
    ds = load_deepspeed_config(cfg)
    assert ds["train_batch_size"] == cfg.kd.batch_size
    assert ds["train_micro_batch_size_per_gpu"] * cfg.cluster.trainer_workers == cfg.kd.batch_size


def test_synthesis_worker_refreshes_its_student_and_writes_balanced_shards(tmp_path):
    """The actor class in-process: the student copy takes the weights handed over before an adversarial round; an
    actor (re)started next to a driver checkpoint continues from the synthesizer state it holds."""
    from nayer.models import build_model
    from orchestrator.faults import FaultPlan
    from orchestrator.workers import SynthesisWorker

    cfg = parse_config(PipelineConfig, ["data.dataset=digits", "teacher.arch=resnet20", "student.arch=resnet20",
                                        "generator.nz=32", "generator.ngf=8", "synthesis.batch_size=20",
                                        "synthesis.g_steps=1", "cluster.shard_samples=8"])
    teacher = build_model("resnet20", 10)
    driver_checkpoint = tmp_path / "checkpoints" / "driver.pt"

    def new_worker():
        return SynthesisWorker(cfg, 1, teacher.state_dict(), torch.eye(10), spec(10, 32), str(tmp_path / "buffer"), str(tmp_path / "samples"), str(driver_checkpoint),
                               FaultPlan())

    worker = new_worker()  # no driver checkpoint yet: a fresh synthesizer
    student = build_model("resnet20", 10)
    torch.nn.init.constant_(student.fc.weight, 0.25)
    out = worker.synthesize(4, warmup=False, iterations=2, student_state=student.state_dict(), min_shards=2, grid=True)
    assert torch.equal(worker.student.fc.weight, student.fc.weight)
    assert [e["path"] for e in out["shards"]] == [f"round-00004/worker-001-00000{i}.tar" for i in range(5)]
    assert sum(e["samples"] for e in out["shards"]) == 40 and out["stats"]["syn_iterations"] == 2
    assert (tmp_path / "samples" / "round-00004.png").is_file()
    ((_, labels),) = list(shard_batches(Manifest(tmp_path / "buffer", out["shards"]).snapshot(), 40, 1, seed=0))
    assert torch.bincount(labels, minlength=10).tolist() == [4] * 10  # class-balanced: 2 per class per iteration

    driver_checkpoint.parent.mkdir()
    torch.save({"synthesizers": [{}, worker.state_dict()]}, driver_checkpoint)
    restarted = new_worker()
    assert restarted.synthesizer.epoch == worker.synthesizer.epoch == 1
    for key, value in worker.synthesizer.generator.state_dict().items():
        assert torch.equal(restarted.synthesizer.generator.state_dict()[key], value), key
