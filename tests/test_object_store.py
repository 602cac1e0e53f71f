"""Run folders on object storage (`out_dir=s3://bucket/prefix`), against a local S3 server the tests start on
127.0.0.1 (moto's; the `s3` fixture): the storage layer, the buffer's manifest and shards, and a whole pipeline
run that is killed and resumed, compared with the same run on a POSIX folder."""

import json
import os
import subprocess
import sys
import time

import fsspec
import pytest
import torch

from nayer.cli_config import ConfigError, parse_config
from nayer.config import RunConfig
from nayer.run_folder import RunFolder
from orchestrator.config import PipelineConfig
from orchestrator.faults import ENV
from orchestrator.run import run
from orchestrator.shards import CorruptShardError, Manifest, read_shard, write_shards
from nayer.storage import open_storage
from helpers import ROOT, pipeline_args


def keys(url: str) -> list[str]:
    """Every object under a URL, relative to it."""
    fs, path = fsspec.core.url_to_fs(url, use_listings_cache=False)
    return sorted(key[len(path) + 1:] for key in fs.find(path))


def test_an_object_is_written_whole_or_not_at_all(s3):
    store = open_storage(f"{s3}/whole")
    store.write_whole("a.bin", lambda tmp: open(tmp, "wb").write(b"x" * 1000))
    assert store.read_bytes("a.bin") == b"x" * 1000

    def fails_half_way(tmp):
        with open(tmp, "wb") as f:
            f.write(b"y" * 500)
        raise OSError("the writer died")

    with pytest.raises(OSError, match="the writer died"):
        store.write_whole("a.bin", fails_half_way)
    with pytest.raises(OSError):
        store.write_whole("b.bin", fails_half_way)
    assert store.read_bytes("a.bin") == b"x" * 1000 and store.read_bytes("b.bin") is None  # old kept, none new
    assert keys(f"{s3}/whole") == ["a.bin"]


def test_the_buffer_on_s3_commits_verifies_and_quarantines_as_on_posix(s3):
    root = f"{s3}/buffer-test/buffer"
    images, labels = torch.randint(0, 255, (20, 3, 8, 8), dtype=torch.uint8), torch.arange(20) % 10
    entries = write_shards(root, 0, 0, images, labels, max_samples=8)
    assert [e.path for e in entries] == [f"round-00000/worker-000-00000{p}.tar" for p in range(3)]
    manifest = Manifest(root)
    assert manifest.commit(entries) == []
    loaded = Manifest.load(root)  # the manifest object is the commit point
    assert [s.path for s in loaded.shards] == [e.path for e in entries] and loaded.samples == 20
    snapshot = loaded.snapshot()
    assert loaded.location(snapshot[0]) == f"{root}/round-00000/worker-000-000000.tar"
    x, y = read_shard(loaded.store, snapshot[0])  # through fsspec, size and sha256 checked first
    assert torch.equal(x, images[:7]) and torch.equal(y, labels[:7])

    # a killed round's object and a committed one that rots: dropped and quarantined, as on a POSIX folder
    write_shards(root, 1, 0, images[:4], labels[:4], max_samples=8)
    open_storage(root).flip_byte(entries[1].path)
    with pytest.raises(CorruptShardError, match="round-00000/worker-000-000001.tar: its sha256"):
        Manifest.load(root).verify("fail")
    resumed = Manifest.load(root)
    assert len(resumed.verify("exclude")) == 1
    assert resumed.discard_uncommitted() == [f"{root}/round-00001/worker-000-000000.tar"]
    assert keys(root) == ["manifest.json", "quarantine/round-00000/worker-000-000001.tar",
                          "round-00000/worker-000-000000.tar", "round-00000/worker-000-000002.tar"]
    assert [s.path for s in Manifest.load(root).shards] == [entries[0].path, entries[2].path]
    assert open_storage(root).listing("round-*/*.tar") == [entries[0].path, entries[2].path]


def test_only_the_pipeline_writes_a_run_folder_on_an_object_store(s3):
    with pytest.raises(ConfigError, match="a run folder on an object store is the pipeline's"):
        RunFolder(parse_config(RunConfig, [f"out_dir={s3}/single", "name=x"]))


def test_a_pipeline_run_on_s3_killed_and_resumed_equals_the_posix_run(tmp_path, s3, local_ray, reference_run):
    """A full digits pipeline run with its run folder on S3: the driver is killed after round 1 (SIGKILL), the same
    command with resume=true finishes it (reading its config, checkpoint and manifest back from the store), and the
    report is written there. Everything lands in the bucket, nothing in a local folder, and the buffer and student
    are bit for bit those of the same run on a POSIX folder (the session's reference run of the schedule)."""
    url = f"{s3}/runs"
    posix = reference_run("overlapped")
    args = pipeline_args(tmp_path, name="tiny", out_dir=url, **{"cluster.staging_dir": str(tmp_path / "staging"),
                                                                "cluster.schedule": "overlapped"})
    driver = subprocess.run([sys.executable, "-m", "orchestrator.run", *args], cwd=ROOT, capture_output=True,
                            text=True, timeout=300, env={**os.environ, "RAY_ADDRESS": local_ray,
                                                         ENV: "kill_driver:round=1"})
    assert driver.returncode == -9, driver.stdout[-2000:] + driver.stderr[-2000:]
    run_url = f"{url}/tiny"
    metrics = [json.loads(line) for line in open_storage(run_url).read_bytes("metrics.jsonl").decode().splitlines()]
    assert [m["epoch"] for m in metrics] == [0, 1]  # rounds 0 and 1 checkpointed in the store before the kill
    assert "summary.json" not in keys(run_url)

    time.sleep(0.5)
    summary = run(parse_config(PipelineConfig, args + ["resume=true"]))
    assert summary["rounds_run"] == 3
    assert summary["final_top1"] == json.loads((posix / "summary.json").read_text())["final_top1"]
    stored = keys(run_url)
    for expected in ("config.yaml", "inputs.json", "metrics.jsonl", "summary.json", "report.md", "student.pt",
                     "checkpoints/driver.pt", "buffer/manifest.json", "plots/accuracy.png", "ranks/rank-000.jsonl",
                     "ranks/rank-001.jsonl", "checkpoints/synthesis/worker-001/round-00002.pt"):
        assert expected in stored, expected
    assert any(k.startswith("samples/round-") for k in stored) and any(k.startswith("tb/") for k in stored)
    assert any(k.startswith("trainer/student-00002/round-00002/student/") for k in stored)
    metrics = [json.loads(line) for line in open_storage(run_url).read_bytes("metrics.jsonl").decode().splitlines()]
    assert [m["epoch"] for m in metrics] == [0, 1, 2]
    report = open_storage(run_url).read_bytes("report.md").decode()
    assert report.startswith("# ") and "verdict" in report.lower() and "samples/round-00002.png" in report
    # files on the store == the manifest, and the same shards, bytes for bytes, as the POSIX run's
    ours = Manifest.load(f"{run_url}/buffer").shards
    theirs = Manifest.load(posix / "buffer").shards
    assert [(s.path, s.sha256) for s in ours] == [(s.path, s.sha256) for s in theirs]
    assert sorted(k[len("buffer/"):] for k in stored if k.endswith(".tar")) == sorted(s.path for s in ours)
    student = torch.load(fsspec.open(f"{run_url}/student.pt").open(), weights_only=True)
    reference = torch.load(posix / "student.pt", weights_only=True)
    assert all(torch.equal(student[k], reference[k]) for k in reference)
    # the driver worked in its staging folder; nothing was written under a local folder named after the URL
    assert (open_storage(run_url).staging_folder(str(tmp_path / "staging")) / "report.md").is_file()
    assert not (ROOT / "s3:").exists() and not (tmp_path / "s3:").exists()
