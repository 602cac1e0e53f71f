"""The memory buffer M as WebDataset shards: whole-or-nothing shard writes, a driver-owned manifest, verified reads.

Layout under `<run folder>/buffer/` (a POSIX folder or an object store prefix, `orchestrator.storage`):
    manifest.json                              committed shards in commit order (driver only, written whole)
    round-00012/worker-001-000000.tar          one shard: samples {key, "npy": uint8 [C, H, W], "cls": label}

A shard is written whole (a temporary name renamed when complete, or one upload); it becomes part of the buffer
only when the driver lists it in the manifest, so readers (which read manifest entries, never the folder) never see a
shard being written. Samples are raw uint8 arrays (measured faster to write and read than PNG, same size),
decoded without pickle. Every read checks the shard's size and sha256 against the manifest before a sample of
it is used; a shard that fails is excluded or fails the run (`cluster.on_corrupt_shard`).

Each committed shard gets a sequence number `seq` (commit order, never reused); the shard belongs to DeepSpeed
rank `seq % ranks` for the whole run (`rank_share`), so a rank's share only grows, and it reads each of its shards
once (`orchestrator.resident`).
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import posixpath
import random
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np
import torch
import webdataset as wds
from torch import Tensor

from orchestrator.storage import is_url, join, listing, move, read_bytes, remove, size, write_bytes, write_whole

MANIFEST = "manifest.json"
QUARANTINE = "quarantine"  # excluded corrupt shards are moved here (kept for inspection, never read)


class CorruptShardError(ValueError):
    """A committed shard that is missing or does not match its manifest entry (size, sha256, sample format)."""


def shard_name(round_index: int, worker: int, part: int) -> str:
    """Named by round and synthesis worker (never by a trainer rank): stable across restarts and cluster sizes."""
    return f"round-{round_index:05d}/worker-{worker:03d}-{part:06d}.tar"


def sha256(path: str | Path) -> str:
    """A file's sha256: streamed from a POSIX file, from the bytes of an object."""
    if is_url(path):
        return hashlib.sha256(read_bytes(path) or b"").hexdigest()
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
                 max_samples: int, min_shards: int = 1, midway: Callable[[], None] | None = None) -> list[dict]:
    """Write uint8 `images` [N, C, H, W] + `labels` [N] as at least `min_shards` shards of at most `max_samples`;
    returns their manifest entries (path relative to `root`, sample count, bytes, sha256). `midway()` is called
    half-way through the first shard, its bytes so far on disk under the temporary name (fault injection)."""
    n = len(images)
    count = max(math.ceil(n / max_samples), min(min_shards, n))
    entries = []
    for part, index in enumerate(np.array_split(np.arange(n), count)):
        rel = shard_name(round_index, worker, part)
        out: dict = {}

        def write(tmp: str, index=index, rel=rel, out=out) -> None:
            stream = _HashingFile(tmp)
            try:
                with wds.TarWriter(stream, mtime=0.0) as sink:  # fixed member times: equal images, equal sha256
                    for n_written, i in enumerate(index.tolist()):
                        if midway is not None and part == 0 and n_written == len(index) // 2:
                            stream.file.flush()
                            midway()
                        sink.write({"__key__": f"{rel[:-4].replace('/', '-')}-{i:06d}", "npy": images[i].numpy(),
                                    "cls": int(labels[i])})
            finally:
                stream.close()
            out.update(bytes=stream.size, sha256=stream.digest.hexdigest())

        write_whole(join(root, rel), write)
        entries.append({"path": rel, "samples": len(index), **out})
    return entries


class Manifest:
    """The committed shards of the buffer. Only the driver writes it; every write is whole (an atomic rename, or
    one upload)."""

    def __init__(self, root: str | Path, shards: list[dict] | None = None, excluded: list[dict] | None = None):
        self.root = str(root) if is_url(root) else str(Path(root).resolve())
        self.shards: list[dict] = list(shards or [])
        self.excluded: list[dict] = list(excluded or [])  # entries dropped as corrupt (their seq stays used)
        for seq, entry in enumerate(self.shards):  # a manifest written before shards had numbers: commit order
            entry.setdefault("seq", seq)

    @classmethod
    def load(cls, root: str | Path) -> "Manifest":
        data = json.loads(read_bytes(join(root, MANIFEST)) or b"{}")
        return cls(root, data.get("shards", []), data.get("excluded", []))

    @property
    def next_seq(self) -> int:
        return 1 + max((e["seq"] for e in self.shards + self.excluded), default=-1)

    def truncate(self, last_round: int) -> None:
        """Forget every entry of a round after `last_round` (committed by a driver that died before its own
        checkpoint recorded the round): that round is synthesized again, and its shards get the same seq."""
        self.shards = [e for e in self.shards if e["round"] <= last_round]
        self.excluded = [e for e in self.excluded if e["round"] <= last_round]

    def commit(self, round_index: int, entries: Iterable[dict], policy: str = "fail") -> list[str]:
        """Append a round's shards (already renamed into place) and publish the new manifest atomically. A shard
        whose file is missing or has another size than its writer recorded fails the run (`fail`) or is left out
        and quarantined (`exclude`); returns the messages of those left out."""
        good, excluded = [], []
        for entry in entries:
            path = join(self.root, entry["path"])
            stored = size(path)
            if stored == entry["bytes"]:
                good.append({**entry, "round": round_index, "seq": self.next_seq + len(good)})
                continue
            message = f"buffer shard {path}: " + ("the file does not exist" if stored is None else
                                                  f"{stored} bytes on disk, its writer wrote {entry['bytes']}")
            if policy == "fail":
                raise CorruptShardError(f"cannot commit {message} (cluster.on_corrupt_shard=exclude leaves such "
                                        "shards out and goes on)")
            if stored is not None:
                self._quarantine(entry["path"])
            excluded.append(message)
        self.shards.extend(good)
        self.save()
        return excluded

    def remove_temporaries(self, round_index: int) -> list[str]:
        """Delete the temporary files of killed write attempts in a round's folder (call once every writer of the
        round has returned: a restarted actor rewrote its shards under their final names). An object store has
        none: an object is uploaded whole or not at all."""
        stale = listing(self.root, posixpath.dirname(shard_name(round_index, 0, 0)) + "/*.tmp")
        for path in stale:
            remove(path)
        return stale

    def save(self) -> None:
        """The commit point: written whole (a rename, or one upload)."""
        manifest = {"shards": self.shards, "samples": self.samples, "excluded": self.excluded}
        write_bytes(join(self.root, MANIFEST), (json.dumps(manifest, indent=2) + "\n").encode())

    @property
    def samples(self) -> int:
        return sum(s["samples"] for s in self.shards)

    def snapshot(self, after_seq: int = -1) -> list[dict]:
        """The committed shards (those with a larger seq than `after_seq`) with absolute paths and checksums: what
        the ranks read."""
        return [{"url": join(self.root, s["path"]), "samples": s["samples"], "bytes": s["bytes"], "sha256": s["sha256"],
                 "seq": s["seq"], "round": s["round"]} for s in self.shards if s["seq"] > after_seq]

    def last_seq(self, upto_round: int) -> int:
        """The largest seq committed in rounds up to `upto_round` (-1: none)."""
        return max((s["seq"] for s in self.shards if s["round"] <= upto_round), default=-1)

    def round_bytes(self, round_index: int) -> int:
        return sum(s["bytes"] for s in self.shards if s["round"] == round_index)

    def discard_uncommitted(self) -> list[str]:
        """Delete shard files the manifest does not list (a round killed before its commit, temporary files);
        returns what was removed. Run on resume, before any new round writes."""
        committed = {join(self.root, s["path"]) for s in self.shards}
        stale = [p for p in listing(self.root, "round-*/*") if p not in committed]
        for path in stale:
            remove(path)
        if not is_url(self.root):  # an object store has no folders to leave empty
            for folder in Path(self.root).glob("round-*"):
                if folder.is_dir() and not any(folder.iterdir()):
                    folder.rmdir()
        return stale

    def problem(self, shard: dict) -> str | None:
        """Why a committed shard cannot be read (missing, other size, other checksum), or None."""
        path = join(self.root, shard["path"])
        return mismatch(shard, size(path), lambda: sha256(path))

    def verify(self, policy: str = "fail") -> list[str]:
        """Check every committed shard (run on resume). `fail`: raise CorruptShardError naming the first bad shard;
        `exclude`: drop bad shards from the manifest (see `exclude`). Returns the messages of the excluded ones."""
        excluded = []
        for shard in list(self.shards):
            problem = self.problem(shard)
            if problem is None:
                continue
            message = f"buffer shard {join(self.root, shard['path'])}: {problem}"
            if policy == "fail":
                raise CorruptShardError(f"{message}; the buffer is corrupt (cluster.on_corrupt_shard=exclude drops "
                                        "such shards and goes on)")
            self.exclude([shard["path"]])
            excluded.append(message)
        return excluded

    def exclude(self, paths: Iterable[str]) -> list[str]:
        """Remove shards (manifest-relative paths) from the manifest and move their files to quarantine/, where
        nothing reads them; saves the manifest. Returns the paths that were listed."""
        paths = set(paths)
        removed = [s["path"] for s in self.shards if s["path"] in paths]
        if not removed:
            return []
        self.excluded += [s for s in self.shards if s["path"] in paths]
        self.shards = [s for s in self.shards if s["path"] not in paths]
        self.save()
        for rel in removed:
            self._quarantine(rel)
        return removed

    def _quarantine(self, rel: str) -> None:
        source = join(self.root, rel)
        if size(source) is not None:
            move(source, join(self.root, QUARANTINE, rel))

    def relative(self, url: str) -> str:
        """The manifest path of a snapshot url."""
        if is_url(self.root):
            return url[len(self.root.rstrip("/")) + 1:]
        return Path(url).resolve().relative_to(self.root).as_posix()


def rank_share(entries: list[dict], rank: int, world_size: int) -> list[dict]:
    """The entries of rank `rank` of `world_size`: those whose commit sequence number is `rank` modulo the ranks."""
    return [e for e in entries if e["seq"] % world_size == rank]


def rank_samples(entries: list[dict], world_size: int) -> list[int]:
    """Samples in each rank's share."""
    return [sum(e["samples"] for e in rank_share(entries, r, world_size)) for r in range(world_size)]


def _decode(sample: dict) -> tuple[Tensor, int]:
    """A sample as written by write_shards: a uint8 .npy (never unpickled) and its label."""
    url = sample.get("__url__", "?")
    try:
        image = np.load(io.BytesIO(sample["npy"]), allow_pickle=False)
        label = int(sample["cls"])
    except (KeyError, ValueError) as exc:
        raise CorruptShardError(f"buffer shard {url}: sample {sample.get('__key__')} is not a uint8 image and a "
                                f"label: {exc}") from None
    if image.dtype != np.uint8 or image.ndim != 3:
        raise CorruptShardError(f"buffer shard {url}: sample {sample.get('__key__')} holds {image.dtype} "
                                f"{image.shape}, not a uint8 [C, H, W] image")
    return torch.from_numpy(image), label


def mismatch(entry: dict, size: int | None, digest: Callable[[], str]) -> str | None:
    """Why a shard of `size` bytes (None: missing) is not its manifest `entry`, or None. `digest()` gives the file's
    sha256; it is called only when the size matches (hashing is the expensive part)."""
    if size is None:
        return "listed in the manifest but missing"
    if size != entry["bytes"]:
        return f"{size} bytes on disk, {entry['bytes']} in the manifest (truncated?)"
    if digest() != entry["sha256"]:
        return "its sha256 does not match the manifest checksum"
    return None


def verified_streams(policy: str, excluded: list[str]) -> Callable[[Iterable[dict]], Iterator[dict]]:
    """A pipeline stage: shard entries -> opened shards, each read whole and checked against its manifest size and
    sha256 before any sample of it is used. A bad shard raises CorruptShardError (`fail`) or is skipped and its
    url appended to `excluded` (`exclude`). Memory: one shard at a time."""
    def stage(entries: Iterable[dict]) -> Iterator[dict]:
        for entry in entries:
            url = entry["url"]
            data = read_bytes(url)
            problem = mismatch(entry, None if data is None else len(data), lambda: hashlib.sha256(data).hexdigest())
            if problem is None:
                yield {"url": url, "stream": io.BytesIO(data)}
            elif policy == "fail":
                raise CorruptShardError(f"buffer shard {url}: {problem}; not trained on (cluster.on_corrupt_shard="
                                        "exclude drops such shards and goes on)")
            elif url not in excluded:
                excluded.append(url)
    return stage


def read_shard(entry: dict) -> tuple[Tensor, Tensor]:
    """All samples of one committed shard (a snapshot entry), checked against its manifest size and sha256 first:
    uint8 images [N, C, H, W] and int64 labels [N]. A corrupt shard raises CorruptShardError naming it."""
    samples = list(wds.DataPipeline(lambda: iter([entry]), verified_streams("fail", []),
                                    wds.tariterators.tar_file_expander, wds.tariterators.group_by_keys,
                                    wds.map(_decode)))
    if len(samples) != entry["samples"] or not samples:
        raise CorruptShardError(f"buffer shard {entry['url']}: {len(samples)} samples, {entry['samples']} in the "
                                "manifest")
    return _collate(samples)


def _collate(samples: list[tuple[Tensor, int]]) -> tuple[Tensor, Tensor]:
    return torch.stack([s[0] for s in samples]), torch.tensor([s[1] for s in samples], dtype=torch.int64)


def shard_batches(share: list[dict], batch_size: int, num_batches: int, seed: int,
                  shuffle_buffer: int = 2000, on_corrupt: str = "fail",
                  excluded: list[str] | None = None) -> Iterator[tuple[Tensor, Tensor]]:
    """Exactly `num_batches` uint8 batches [B, C, H, W] + labels streamed from the shards of `share` (one rank's
    entries, `rank_share`), read from storage on every pass: the reader of a share too large to hold in memory.

    Each pass is a fresh shuffled permutation (shards resampled without replacement, then a sample shuffle
    buffer), so no sample is read twice within a pass. `with_epoch` repeats passes until the batch count is reached
    (equal steps keep the DeepSpeed ranks in lock step). Shards are verified as they are opened (`verified_streams`;
    excluded urls are appended to `excluded`); a rank left without a full batch to read raises instead of falling
    out of step with the others."""
    urls = [s["url"] for s in share]
    excluded = [] if excluded is None else excluded
    pipeline = wds.DataPipeline(
        lambda: iter(share),  # the manifest entries (url, samples, bytes, sha256), once per pass
        wds.shuffle(max(len(urls), 1), initial=max(len(urls), 1), rng=random.Random(seed)),
        verified_streams(on_corrupt, excluded),
        wds.tariterators.tar_file_expander,
        wds.tariterators.group_by_keys,
        wds.shuffle(shuffle_buffer, initial=shuffle_buffer, rng=random.Random(seed + 1)),
        wds.map(_decode),
        wds.batched(batch_size, collation_fn=_collate, partial=False),
    ).with_epoch(nbatches=num_batches)
    count = 0
    for batch in pipeline:
        count += 1
        yield batch
    if count < num_batches:
        raise CorruptShardError(f"this rank read {count} of {num_batches} batches of {batch_size}: its shards are "
                                f"too few or excluded as corrupt ({len(excluded)}: {', '.join(excluded[:3])})")
