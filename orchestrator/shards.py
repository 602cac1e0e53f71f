"""The memory buffer M as WebDataset shards: whole-or-nothing shard writes, a driver-owned manifest, verified reads.

Layout under `<run folder>/buffer/` (a POSIX folder or an object store prefix: a `nayer.storage.Storage`):
    manifest.json                              committed shards in commit order (driver only, written whole)
    round-00012/worker-001-000000.tar          one shard: samples {key, "npy": uint8 [C, H, W], "cls": label}

A shard is written whole (a temporary name renamed when complete, or one upload); it becomes part of the buffer
only when the driver lists it in the manifest, so readers (which read manifest entries, never the folder) never see a
shard being written. Samples are raw uint8 arrays (measured faster to write and read than PNG, same size),
decoded without pickle. Every read checks the shard's size and sha256 against the manifest before a sample of
it is used; a shard that fails is excluded or fails the run (`cluster.on_corrupt_shard`: `screen`).

Each committed shard gets a sequence number `seq` (commit order, never reused); the shard belongs to DeepSpeed
rank `seq % ranks` for the whole run (`rank_share`), so a rank's share only grows, and it reads each of its shards
once (`orchestrator.resident`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import math
import posixpath
import random
from typing import Callable, Iterable, Iterator

import numpy as np
import torch
import webdataset as wds
from torch import Tensor

from nayer.compat import FORMAT, check_format
from nayer.storage import Storage, as_storage
from orchestrator.messages import ShardEntry

MANIFEST = "manifest.json"
QUARANTINE = "quarantine"  # excluded corrupt shards are moved here (kept for inspection, never read)
EXCLUDE_HINT = "cluster.on_corrupt_shard=exclude drops such shards and goes on"


class CorruptShardError(ValueError):
    """A committed shard that is missing or does not match its manifest entry (size, sha256, sample format)."""


def corrupt(problem: str) -> CorruptShardError:
    """The error of a bad shard: `problem`, and how the run can go on without the shard."""
    return CorruptShardError(f"{problem}; not trained on ({EXCLUDE_HINT})")


def screen(problem: str, policy: str) -> str:
    """The one rule for a bad shard: under on_corrupt_shard=fail its error (`corrupt`); under exclude `problem`
    comes back for the caller to leave the shard out (it is never trained on)."""
    if policy == "fail":
        raise corrupt(problem)
    return problem


def shard_name(round_index: int, worker: int, part: int) -> str:
    """Named by round and synthesis worker (never by a trainer rank): stable across restarts and cluster sizes."""
    return f"round-{round_index:05d}/worker-{worker:03d}-{part:06d}.tar"


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


def write_shards(buffer: Storage | str, round_index: int, worker: int, images: Tensor, labels: Tensor,
                 max_samples: int, min_shards: int = 1, midway: Callable[[], None] | None = None) -> list[ShardEntry]:
    """Write uint8 `images` [N, C, H, W] + `labels` [N] as at least `min_shards` shards of at most `max_samples`;
    returns their entries (not yet committed). `midway()` is called half-way through the first shard, its bytes so
    far on disk under the temporary name (fault injection)."""
    buffer = as_storage(buffer)
    n = len(images)
    count = max(math.ceil(n / max_samples), min(min_shards, n))
    entries = []
    for part, index in enumerate(np.array_split(np.arange(n), count)):
        rel = shard_name(round_index, worker, part)
        written: dict = {}

        def write(tmp: str, index=index, rel=rel, written=written) -> None:
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
            written.update(bytes=stream.size, sha256=stream.digest.hexdigest())

        buffer.write_whole(rel, write)
        entries.append(ShardEntry(rel, len(index), round=round_index, **written))
    return entries


class Manifest:
    """The committed shards of the buffer. Only the driver writes it; every write is whole (an atomic rename, or
    one upload)."""

    def __init__(self, buffer: Storage | str, shards: Iterable[ShardEntry] = (), excluded: Iterable[ShardEntry] = ()):
        self.store = as_storage(buffer)
        self.shards: list[ShardEntry] = list(shards)
        self.excluded: list[ShardEntry] = list(excluded)  # entries dropped as corrupt (their seq stays used)

    @classmethod
    def load(cls, buffer: Storage | str) -> "Manifest":
        """The manifest as saved (an empty one if there is none)."""
        store = as_storage(buffer)
        data = json.loads(store.read_bytes(MANIFEST) or b"{}")
        where = store.location(MANIFEST)
        check_format(data.get("format", 0), where)  # every format so far has this shape
        try:
            shards, excluded = ([ShardEntry(**e) for e in data.get(key, [])] for key in ("shards", "excluded"))
        except TypeError as exc:
            raise ValueError(f"{where} is not a buffer manifest this code reads ({exc})") from None
        if any(e.seq < 0 for e in shards + excluded):
            raise ValueError(f"{where} lists shards without a commit number (seq): not a manifest this code reads")
        return cls(store, shards, excluded)

    def location(self, entry: ShardEntry) -> str:
        """Where a shard is, as messages name it."""
        return self.store.location(entry.path)

    @property
    def next_seq(self) -> int:
        return 1 + max((e.seq for e in self.shards + self.excluded), default=-1)

    def truncate(self, last_round: int) -> None:
        """Forget every entry of a round after `last_round` (committed by a driver that died before its own
        checkpoint recorded the round): that round is synthesized again, and its shards get the same seq."""
        self.shards = [e for e in self.shards if e.round <= last_round]
        self.excluded = [e for e in self.excluded if e.round <= last_round]

    def commit(self, entries: Iterable[ShardEntry], policy: str = "fail") -> list[str]:
        """Append a round's shards (already in place) with their commit numbers and publish the new manifest
        atomically. A shard whose file is missing or has another size than its writer recorded fails the run or is
        left out and quarantined (`screen`); returns the messages of those left out."""
        good, excluded = [], []
        for entry in entries:
            stored = self.store.size(entry.path)
            if stored == entry.bytes:
                good.append(dataclasses.replace(entry, seq=self.next_seq + len(good)))
                continue
            found = "the file does not exist" if stored is None else \
                f"{stored} bytes on disk, its writer wrote {entry.bytes}"
            message = f"buffer shard {self.location(entry)}: {found}"
            screen(f"cannot commit {message}", policy)
            excluded.append(message)
            if stored is not None:
                self._quarantine(entry.path)
        self.shards.extend(good)
        self.save()
        return excluded

    def remove_temporaries(self, round_index: int) -> list[str]:
        """Delete the temporary files of killed write attempts in a round's folder (call once every writer of the
        round has returned: a restarted actor rewrote its shards under their final names). An object store has
        none: an object is uploaded whole or not at all."""
        stale = self.store.listing(posixpath.dirname(shard_name(round_index, 0, 0)) + "/*.tmp")
        for rel in stale:
            self.store.remove(rel)
        return stale

    def save(self) -> None:
        """The commit point: written whole (a rename, or one upload)."""
        manifest = {"format": FORMAT, "shards": [e.as_dict() for e in self.shards], "samples": self.samples,
                    "excluded": [e.as_dict() for e in self.excluded]}
        self.store.write_bytes(MANIFEST, (json.dumps(manifest, indent=2) + "\n").encode())

    @property
    def samples(self) -> int:
        return sum(s.samples for s in self.shards)

    def snapshot(self, after_seq: int = -1) -> list[ShardEntry]:
        """The committed shards with a larger seq than `after_seq`: what the ranks read."""
        return [s for s in self.shards if s.seq > after_seq]

    def last_seq(self, upto_round: int) -> int:
        """The largest seq committed in rounds up to `upto_round` (-1: none)."""
        return max((s.seq for s in self.shards if s.round <= upto_round), default=-1)

    def round_bytes(self, round_index: int) -> int:
        return sum(s.bytes for s in self.shards if s.round == round_index)

    def discard_uncommitted(self) -> list[str]:
        """Delete shard files the manifest does not list (a round killed before its commit, temporary files);
        returns their locations. Run on resume, before any new round writes."""
        committed = {s.path for s in self.shards}
        stale = [rel for rel in self.store.listing("round-*/*") if rel not in committed]
        for rel in stale:
            self.store.remove(rel)
        self.store.remove_empty_folders("round-*")
        return [self.store.location(rel) for rel in stale]

    def verify(self, policy: str = "fail") -> list[str]:
        """Check every committed shard's size and sha256 (run on resume): a bad shard fails the run or is
        excluded (`screen`, `exclude`). Returns the messages of the excluded ones."""
        excluded = []
        for shard in list(self.shards):
            problem = mismatch(shard, self.store.size(shard.path), lambda: self.store.sha256(shard.path))
            if problem is not None:
                excluded.append(screen(f"buffer shard {self.location(shard)}: {problem}", policy))
                self.exclude([shard.path])
        return excluded

    def exclude(self, paths: Iterable[str]) -> list[str]:
        """Remove shards (buffer paths) from the manifest and move their files to quarantine/, where nothing reads
        them; saves the manifest. Returns the paths that were listed."""
        paths = set(paths)
        removed = [s for s in self.shards if s.path in paths]
        if not removed:
            return []
        self.excluded += removed
        self.shards = [s for s in self.shards if s.path not in paths]
        self.save()
        for shard in removed:
            self._quarantine(shard.path)
        return [s.path for s in removed]

    def _quarantine(self, rel: str) -> None:
        if self.store.exists(rel):
            self.store.move(rel, posixpath.join(QUARANTINE, rel))


def quarantined(message: str) -> str:
    """A console line's ending for a shard `exclude` left out."""
    return f"excluded {message} (moved to buffer/{QUARANTINE}/, never trained on)"


def rank_share(entries: list[ShardEntry], rank: int, world_size: int) -> list[ShardEntry]:
    """The entries of rank `rank` of `world_size`: those whose commit sequence number is `rank` modulo the ranks."""
    return [e for e in entries if e.seq % world_size == rank]


def rank_samples(entries: list[ShardEntry], world_size: int) -> list[int]:
    """Samples in each rank's share."""
    return [sum(e.samples for e in rank_share(entries, r, world_size)) for r in range(world_size)]


def _decode(sample: dict) -> tuple[Tensor, int]:
    """A sample as written by write_shards: a uint8 .npy (never unpickled) and its label."""
    url = sample.get("__url__", "?")
    try:
        image = np.load(io.BytesIO(sample["npy"]), allow_pickle=False)
        label = int(sample["cls"])
    except (KeyError, ValueError) as exc:
        raise corrupt(f"buffer shard {url}: sample {sample.get('__key__')} is not a uint8 image and a label: "
                      f"{exc}") from None
    if image.dtype != np.uint8 or image.ndim != 3:
        raise corrupt(f"buffer shard {url}: sample {sample.get('__key__')} holds {image.dtype} {image.shape}, not a "
                      "uint8 [C, H, W] image")
    return torch.from_numpy(image), label


def mismatch(entry: ShardEntry, size: int | None, digest: Callable[[], str | None]) -> str | None:
    """Why a shard of `size` bytes (None: missing) is not its manifest `entry`, or None. `digest()` gives the file's
    sha256; it is called only when the size matches (hashing is the expensive part)."""
    if size is None:
        return "listed in the manifest but missing"
    if size != entry.bytes:
        return f"{size} bytes on disk, {entry.bytes} in the manifest (truncated?)"
    if digest() != entry.sha256:
        return "its sha256 does not match the manifest checksum"
    return None


def verified_streams(buffer: Storage, policy: str, excluded: list[str]) -> Callable[[Iterable[ShardEntry]],
                                                                                    Iterator[dict]]:
    """A pipeline stage: shard entries -> opened shards, each read whole and checked against its manifest size and
    sha256 before any sample of it is used. A bad shard fails or is skipped (`screen`), its path appended to
    `excluded`. Memory: one shard at a time."""
    def stage(entries: Iterable[ShardEntry]) -> Iterator[dict]:
        for entry in entries:
            data = buffer.read_bytes(entry.path)
            problem = mismatch(entry, None if data is None else len(data), lambda: hashlib.sha256(data).hexdigest())
            if problem is None:
                yield {"url": buffer.location(entry.path), "stream": io.BytesIO(data)}
                continue
            screen(f"buffer shard {buffer.location(entry.path)}: {problem}", policy)
            if entry.path not in excluded:
                excluded.append(entry.path)
    return stage


def read_shard(buffer: Storage, entry: ShardEntry) -> tuple[Tensor, Tensor]:
    """All samples of one committed shard, checked against its manifest size and sha256 first: uint8 images
    [N, C, H, W] and int64 labels [N]. A corrupt shard raises CorruptShardError naming it."""
    samples = list(wds.DataPipeline(lambda: iter([entry]), verified_streams(buffer, "fail", []),
                                    wds.tariterators.tar_file_expander, wds.tariterators.group_by_keys,
                                    wds.map(_decode)))
    if len(samples) != entry.samples or not samples:
        raise corrupt(f"buffer shard {buffer.location(entry.path)}: {len(samples)} samples, {entry.samples} in the "
                      "manifest")
    return _collate(samples)


def _collate(samples: list[tuple[Tensor, int]]) -> tuple[Tensor, Tensor]:
    return torch.stack([s[0] for s in samples]), torch.tensor([s[1] for s in samples], dtype=torch.int64)


def shard_batches(buffer: Storage, share: list[ShardEntry], batch_size: int, num_batches: int, seed: int,
                  shuffle_buffer: int = 2000, on_corrupt: str = "fail",
                  excluded: list[str] | None = None) -> Iterator[tuple[Tensor, Tensor]]:
    """Exactly `num_batches` uint8 batches [B, C, H, W] + labels streamed from the shards of `share` (one rank's
    entries, `rank_share`), read from storage on every pass: the reader of a share too large to hold in memory.

    Each pass is a fresh shuffled permutation (shards resampled without replacement, then a sample shuffle
    buffer), so no sample is read twice within a pass. `with_epoch` repeats passes until the batch count is reached
    (equal steps keep the DeepSpeed ranks in lock step). Shards are verified as they are opened (`verified_streams`;
    excluded paths are appended to `excluded`); a rank left without a full batch to read raises instead of falling
    out of step with the others."""
    excluded = [] if excluded is None else excluded
    pipeline = wds.DataPipeline(
        lambda: iter(share),  # the manifest entries, once per pass
        wds.shuffle(max(len(share), 1), initial=max(len(share), 1), rng=random.Random(seed)),
        verified_streams(buffer, on_corrupt, excluded),
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
