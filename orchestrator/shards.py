"""The memory buffer M as WebDataset shards: atomic shard writes, a driver-owned manifest, per-rank readers.

Layout under `runs/<name>/buffer/`:
    manifest.json                              committed shards in commit order (driver only, atomic rename)
    round-00012/worker-001-000000.tar          one shard: samples {key, "npy": uint8 [C, H, W], "cls": label}

A shard is written under a temporary name and renamed when complete; it becomes part of the buffer only when
the driver lists it in the manifest, so readers (which read a manifest snapshot, never the folder) never see a
shard being written. Samples are raw uint8 arrays (measured faster to write and read than PNG, same size).
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import random
from pathlib import Path
from typing import Iterable

import numpy as np
import torch
import webdataset as wds
from torch import Tensor

from nayer.runtime import atomic_write, save_json

MANIFEST = "manifest.json"


def shard_name(round_index: int, worker: int, part: int) -> str:
    """Named by round and synthesis worker (never by a trainer rank): stable across restarts and cluster sizes."""
    return f"round-{round_index:05d}/worker-{worker:03d}-{part:06d}.tar"


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class _HashingFile(io.RawIOBase):
    """A write-only file that feeds a sha256 as it goes: a shard's checksum without reading it back."""

    def __init__(self, path: str):
        self.file, self.digest, self.size = open(path, "wb"), hashlib.sha256(), 0

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        self.digest.update(data)
        self.size += len(data)
        return self.file.write(data)

    def close(self) -> None:
        if not self.closed:
            self.file.close()
        super().close()


def write_shards(root: str | Path, round_index: int, worker: int, images: Tensor, labels: Tensor,
                 max_samples: int, min_shards: int = 1) -> list[dict]:
    """Write uint8 `images` [N, C, H, W] + `labels` [N] as at least `min_shards` shards of at most `max_samples`;
    returns their manifest entries (path relative to `root`, sample count, bytes, sha256)."""
    root = Path(root)
    n = len(images)
    count = max(math.ceil(n / max_samples), min(min_shards, n))
    entries = []
    for part, index in enumerate(np.array_split(np.arange(n), count)):
        rel = shard_name(round_index, worker, part)
        out: dict = {}

        def write(tmp: str, index=index, rel=rel, out=out) -> None:
            stream = _HashingFile(tmp)
            try:
                with wds.TarWriter(stream) as sink:
                    for i in index.tolist():
                        sink.write({"__key__": f"{rel[:-4].replace('/', '-')}-{i:06d}", "npy": images[i].numpy(),
                                    "cls": int(labels[i])})
            finally:
                stream.close()
            out.update(bytes=stream.size, sha256=stream.digest.hexdigest())

        atomic_write(root / rel, write)
        entries.append({"path": rel, "samples": len(index), **out})
    return entries


class Manifest:
    """The committed shards of the buffer. Only the driver writes it; every write is an atomic rename."""

    def __init__(self, root: str | Path, shards: list[dict] | None = None):
        self.root = Path(root)
        self.shards: list[dict] = list(shards or [])

    @classmethod
    def load(cls, root: str | Path) -> "Manifest":
        path = Path(root) / MANIFEST
        return cls(root, json.loads(path.read_text())["shards"] if path.is_file() else [])

    def commit(self, round_index: int, entries: Iterable[dict]) -> None:
        """Append a round's shards (already renamed into place) and publish the new manifest atomically."""
        for entry in entries:
            if not (self.root / entry["path"]).is_file():
                raise FileNotFoundError(f"cannot commit shard {entry['path']}: not found under {self.root}")
            self.shards.append({**entry, "round": round_index})
        self.save()

    def save(self) -> None:
        save_json({"shards": self.shards, "samples": self.samples}, self.root / MANIFEST)

    @property
    def samples(self) -> int:
        return sum(s["samples"] for s in self.shards)

    def snapshot(self) -> list[dict]:
        """The committed shards with absolute paths: what the trainer ranks of one round read."""
        root = self.root.resolve()
        return [{"url": str(root / s["path"]), "samples": s["samples"]} for s in self.shards]

    def discard_uncommitted(self) -> list[Path]:
        """Delete shard files the manifest does not list (a round killed before its commit, temporary files);
        returns what was removed. Run on resume, before any new round writes."""
        committed = {self.root / s["path"] for s in self.shards}
        stale = [p for p in self.root.glob("round-*/*") if p not in committed]
        for path in stale:
            path.unlink()
        for folder in self.root.glob("round-*"):
            if folder.is_dir() and not any(folder.iterdir()):
                folder.rmdir()
        return stale

    def verify(self) -> None:
        """Every committed shard is present with its recorded size and checksum (run on resume)."""
        for s in self.shards:
            path = self.root / s["path"]
            if not path.is_file():
                raise FileNotFoundError(f"buffer shard {path} is listed in {self.root / MANIFEST} but missing")
            if path.stat().st_size != s["bytes"] or sha256(path) != s["sha256"]:
                raise ValueError(f"buffer shard {path} does not match its manifest checksum: the buffer is corrupt")


def rank_samples(snapshot: list[dict], world_size: int) -> list[int]:
    """Samples each rank reads per pass under `wds.split_by_node` (rank r takes shards r, r + M, ...)."""
    return [sum(s["samples"] for s in snapshot[r::world_size]) for r in range(world_size)]


def _decode(sample: dict) -> tuple[Tensor, int]:
    return torch.from_numpy(np.load(io.BytesIO(sample["npy"]))), int(sample["cls"])


def _collate(samples: list[tuple[Tensor, int]]) -> tuple[Tensor, Tensor]:
    return torch.stack([s[0] for s in samples]), torch.tensor([s[1] for s in samples], dtype=torch.int64)


def shard_batches(snapshot: list[dict], batch_size: int, num_batches: int, seed: int,
                  shuffle_buffer: int = 2000) -> wds.DataPipeline:
    """Exactly `num_batches` uint8 batches [B, C, H, W] + labels for this rank, from a manifest snapshot.

    `split_by_node` gives each rank a disjoint set of shards; each pass over them is a fresh shuffled permutation
    (shards resampled without replacement, then a sample shuffle buffer), so no sample is read twice within a
    pass and no two ranks read the same sample in a pass. `with_epoch` repeats passes until every rank has
    yielded the same batch count (equal steps keep the DeepSpeed ranks in lock step)."""
    urls = [s["url"] for s in snapshot]
    return wds.DataPipeline(
        wds.SimpleShardList(urls),
        wds.split_by_node,
        wds.shuffle(max(len(urls), 1), initial=max(len(urls), 1), rng=random.Random(seed)),
        wds.tarfile_to_samples(),
        wds.shuffle(shuffle_buffer, initial=shuffle_buffer, rng=random.Random(seed + 1)),
        wds.map(_decode),
        wds.batched(batch_size, collation_fn=_collate, partial=False),
    ).with_epoch(nbatches=num_batches)
