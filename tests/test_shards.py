"""The WebDataset buffer without Ray: shard writes, the manifest, per-rank readers, the pipeline's config."""

import queue
from pathlib import Path

import pytest
import torch
import webdataset as wds

from nayer.cli_config import ConfigError, parse_config
from nayer.storage import open_storage
from orchestrator.config import PipelineConfig, load_deepspeed_config
from orchestrator.resident import GB, ResidentShare, ShareLoader
from orchestrator.shards import CorruptShardError, Manifest, rank_samples, shard_batches, write_shards
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
        manifest.commit(entries)
    return manifest


class Commits:
    """The driver's side of a ShareLoader: commits handed over one list at a time, then the end of the run."""

    def __init__(self):
        self.queue: queue.Queue = queue.Queue()

    def commit(self, entries):
        self.queue.put(list(entries))

    def end(self):
        self.queue.put(None)

    def fetch(self, after_seq):
        return self.queue.get()


def loaded(buffer, snapshot, rank, world, limit_gb=1.0, policy="fail"):
    commits = Commits()
    loader = ShareLoader(open_storage(buffer), commits.fetch, rank, world, policy, limit_gb * GB)
    commits.commit(snapshot)
    return commits, loader, ResidentShare(loader, torch.device("cpu"), 0)


def read(share, upto_seq, batch_size, num_batches, seed=0):
    batches = list(share.batches(upto_seq, batch_size, num_batches, seed, shuffle_buffer=50))
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
    assert [e.path for e in entries] == [f"round-00007/worker-003-00000{i}.tar" for i in range(3)]
    assert [e.samples for e in entries] == [9, 8, 8]
    assert all(len(e.sha256) == 64 and e.bytes == (tmp_path / e.path).stat().st_size for e in entries)
    assert len(write_shards(tmp_path, 8, 0, x[:4], y[:4], max_samples=10, min_shards=3)) == 3
    assert not list(tmp_path.rglob("*.tmp"))


@pytest.mark.parametrize("limit_gb", [1.0, 1e-9], ids=["resident", "streamed"])
def test_two_ranks_get_equal_batches_and_never_the_same_sample_in_a_pass(tmp_path, limit_gb):
    manifest = committed_buffer(tmp_path, rounds=2, workers=2, per_worker=30, shard_samples=10)  # 12 shards
    snapshot = manifest.snapshot()
    assert rank_samples(snapshot, 2) == [60, 60] and [e.seq for e in snapshot] == list(range(12))
    shares = [loaded(tmp_path, snapshot, rank, 2, limit_gb)[2] for rank in (0, 1)]
    one_pass = 60 // 8  # 7 full batches of 8 per rank
    reads = [read(share, 11, 8, one_pass) for share in shares]
    assert [len(r) for r in reads] == [one_pass, one_pass]
    seen = [i for rank in reads for batch in rank for i in batch]
    assert len(seen) == len(set(seen)) == 2 * one_pass * 8  # no sample twice, within or across ranks
    # Longer than a pass: still exactly the requested count on both ranks, each pass a fresh permutation.
    long = [read(share, 11, 8, 20, seed=1) for share in shares]
    assert [len(r) for r in long] == [20, 20]
    first_pass = [i for batch in long[0][:one_pass] for i in batch]
    assert len(set(first_pass)) == len(first_pass)
    assert all(share.loader.streaming == (limit_gb < 1) for share in shares)


def test_a_rank_reads_each_shard_of_its_share_once(tmp_path):
    """Round after round, a resident share reads only the bytes committed to it since the last round."""
    manifest = committed_buffer(tmp_path, rounds=1, workers=2, per_worker=30, shard_samples=10)  # seq 0..5
    commits, loader, share = loaded(tmp_path, manifest.snapshot(), 0, 2)
    read(share, 5, 8, 10)
    first = sum(e.bytes for e in manifest.snapshot() if e.seq % 2 == 0)
    assert loader.bytes_read == first
    read(share, 5, 8, 10, seed=1)  # a second round on the same shards: nothing read again
    assert loader.bytes_read == first
    x, y = images(30, offset=200)
    manifest.commit(write_shards(tmp_path, 1, 0, x, y, 10))  # seq 6..8: ranks 0, 1, 0
    commits.commit(manifest.snapshot(after_seq=5))
    ids = {i for batch in read(share, 8, 8, 12) for i in batch}
    assert loader.bytes_read - first == sum(e.bytes for e in manifest.snapshot(after_seq=5) if e.seq % 2 == 0)
    assert ids & set(range(200, 210)) and ids & set(range(220, 230)) and not ids & set(range(210, 220))
    with pytest.raises(CorruptShardError, match="fewer than a micro-batch"):
        next(share.batches(8, 1000, 1, 0, 50))


@pytest.mark.parametrize("policy", ["fail", "exclude"])
def test_a_corrupt_shard_is_caught_on_first_read(tmp_path, policy):
    manifest = committed_buffer(tmp_path, rounds=1, workers=1, per_worker=40, shard_samples=10)  # seq 0..3
    bad = tmp_path / manifest.shards[2].path  # seq 2: rank 0's
    data = bytearray(bad.read_bytes())
    data[600] ^= 0xFF
    bad.write_bytes(bytes(data))
    commits, loader, share = loaded(tmp_path, manifest.snapshot(), 0, 2, policy=policy)
    if policy == "fail":
        with pytest.raises(CorruptShardError, match=f"buffer shard {bad.resolve()}: its sha256 does not match"):
            read(share, 3, 5, 2)
        return
    ids = {i for batch in read(share, 3, 5, 2) for i in batch}
    assert loader.excluded == [manifest.shards[2].path] and ids <= set(range(0, 10))  # seq 0 only; seq 2 out


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
    seen = {i for batch in read(loaded(tmp_path, snapshot, 0, 1)[2], 3, 10, 12) for i in batch}
    assert seen == committed_ids


def test_resume_drops_uncommitted_shards_and_verifies_checksums(tmp_path):
    manifest = committed_buffer(tmp_path, rounds=1, workers=2, per_worker=20)
    x, y = images(20, offset=100)
    orphan = write_shards(tmp_path, 1, 0, x, y, 10)  # written by the killed round, never committed
    (tmp_path / "round-00001" / "worker-001-000000.tar.1234.tmp").write_bytes(b"partial")
    reloaded = Manifest.load(tmp_path)
    reloaded.verify()
    dropped = reloaded.discard_uncommitted()
    assert len(dropped) == len(orphan) + 1 and not (tmp_path / "round-00001").exists()
    assert [s.path for s in reloaded.shards] == [s.path for s in manifest.shards]
    first = tmp_path / manifest.shards[0].path
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


def test_synthesis_worker_refreshes_its_student_writes_balanced_shards_and_its_own_state(tmp_path):
    """The actor class in-process: the student copy takes the weights handed over before an adversarial round; the
    worker writes its own state file per round and keeps the last committed round's; a worker (re)started later
    continues from its own file of the round it is told was last committed."""
    from nayer.models import build_model
    from orchestrator.faults import FaultPlan
    from orchestrator.workers import SynthesisTask, SynthesisWorker, WorkerFiles

    cfg = parse_config(PipelineConfig, ["data.dataset=digits", "teacher.arch=resnet20", "student.arch=resnet20",
                                        "generator.nz=32", "generator.ngf=8", "synthesis.batch_size=20",
                                        "synthesis.g_steps=1", "cluster.shard_samples=8"])
    teacher = build_model("resnet20", 10)
    files = WorkerFiles(*(open_storage(tmp_path / name) for name in ("buffer", "samples", "states")))

    def new_worker():
        return SynthesisWorker(cfg, 1, teacher.state_dict(), torch.eye(10), spec(10, 32), files, FaultPlan())

    worker = new_worker()
    student = build_model("resnet20", 10)
    torch.nn.init.constant_(student.fc.weight, 0.25)
    out = worker.synthesize(SynthesisTask(4, False, 2, 2, True, after=-1, keep_from=-1), student.state_dict())
    assert torch.equal(worker.student.fc.weight, student.fc.weight)
    assert [e.path for e in out.shards] == [f"round-00004/worker-001-00000{i}.tar" for i in range(5)]
    assert sum(e.samples for e in out.shards) == 40 and out.stats["syn_iterations"] == 2
    assert (tmp_path / "samples" / "round-00004.png").is_file()
    manifest = Manifest(tmp_path / "buffer")
    manifest.commit(out.shards)
    ((_, labels),) = list(shard_batches(manifest.store, manifest.snapshot(), 40, 1, seed=0))
    assert torch.bincount(labels, minlength=10).tolist() == [4] * 10  # class-balanced: 2 per class per iteration
    worker.synthesize(SynthesisTask(5, False, 1, 1, False, after=4, keep_from=4), None)
    worker.synthesize(SynthesisTask(6, False, 1, 1, False, after=5, keep_from=5), None)
    states = tmp_path / "states" / "worker-001"
    assert sorted(p.name for p in states.iterdir()) == ["round-00005.pt", "round-00006.pt"]  # checkpointed + newest

    restarted = new_worker()  # as Ray restarts it, or a resumed run starts it: fresh until a task says otherwise
    assert restarted.synthesizer.epoch == 0
    restarted._continue_after(5)
    assert restarted.synthesizer.epoch == 2
    saved = torch.load(states / "round-00005.pt", weights_only=True)
    for key, value in restarted.synthesizer.generator.state_dict().items():
        assert torch.equal(saved["generator"][key], value), key
    with pytest.raises(FileNotFoundError, match="no state file .*round-00003.pt"):
        restarted._continue_after(3)


def test_a_run_folder_whose_name_holds_glob_characters_touches_no_other(tmp_path):
    images, labels = torch.zeros(4, 3, 4, 4, dtype=torch.uint8), torch.zeros(4, dtype=torch.long)
    for name in ("run[1]", "run1"):
        Manifest(tmp_path / name).commit(write_shards(tmp_path / name, 0, 0, images, labels, 8))
    write_shards(tmp_path / "run1", 1, 0, images, labels, 8)  # run1's uncommitted round
    assert Manifest.load(tmp_path / "run[1]").discard_uncommitted() == []  # a pattern would have matched run1
    assert len(Manifest.load(tmp_path / "run1").discard_uncommitted()) == 1
