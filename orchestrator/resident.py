"""A DeepSpeed rank's share of the buffer, read once.

Shares are stable: the shard with commit sequence number `seq` belongs to rank `seq % ranks` for the whole run
(`orchestrator.shards.rank_share`). A background thread (`ShareLoader`) receives every commit from the driver as
it happens, reads and verifies (size, sha256) each new shard of this rank's share once, and keeps its samples in
memory; in overlapped rounds that happens while the rank still trains the round before, so it is off the steps'
critical path. A KD round then samples fresh permutations of the resident share (`round_batches`).

A share larger than `cluster.rank_buffer_gb` is not held: the rank streams it from storage every round instead,
read and decoded ahead of the steps by a thread (`shard_batches` behind `ahead`). On a GPU, a share of up to
`cluster.rank_buffer_device_gb` is kept in device memory, so a batch is one on-device gather.
"""

from __future__ import annotations

import queue
import threading
from typing import Callable, Iterator

import torch
from torch import Tensor

from nayer.buffer import InMemoryBuffer
from nayer.storage import Storage
from orchestrator.messages import ShardEntry
from orchestrator.shards import CorruptShardError, read_shard, shard_batches

GB = 1 << 30


class ShareLoader:
    """Reads this rank's newly committed shards of `buffer` in a thread. `fetch(after_seq)` blocks until the driver
    has committed entries with a larger seq and returns them in commit order (None: the run is over)."""

    def __init__(self, buffer: Storage, fetch: Callable[[int], list[ShardEntry] | None], rank: int, world: int,
                 policy: str, host_limit_bytes: float):
        self.buffer, self.fetch, self.rank, self.world, self.policy = buffer, fetch, rank, world, policy
        self.host_limit = host_limit_bytes
        self.changed = threading.Condition()
        self.seen_seq = -1  # every entry up to this seq has been handled (loaded, another rank's, or excluded)
        self.share: list[ShardEntry] = []  # this rank's readable entries, in commit order
        self.store = InMemoryBuffer()  # their samples while the share fits in memory, one chunk per shard
        self.excluded: list[str] = []  # buffer paths of corrupt shards left out (cluster.on_corrupt_shard=exclude)
        self.corrupt: dict[int, str] = {}  # seq -> why, for corrupt shards under policy fail: a round needing one stops
        self.bytes_read = 0  # shard bytes read from storage by this rank so far
        self.streaming = False  # the share outgrew host_limit: every round streams it from storage
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._loop, name="buffer-share-loader", daemon=True)
        self.thread.start()

    def _loop(self) -> None:
        try:
            while (entries := self.fetch(self.seen_seq)) is not None:
                for entry in entries:
                    if entry.seq % self.world == self.rank:
                        self._add(entry)
                    with self.changed:
                        self.seen_seq = max(self.seen_seq, entry.seq)
                        self.changed.notify_all()
        except BaseException as exc:  # noqa: BLE001 - handed to the step loop, which raises it
            with self.changed:
                self.error = exc
                self.changed.notify_all()

    def _add(self, entry: ShardEntry) -> None:
        if not self.streaming and self.bytes_read + entry.bytes > self.host_limit:  # bytes held so far
            with self.changed:  # the share no longer fits: let go of what is held, stream from now on
                self.streaming, self.store = True, InMemoryBuffer()
            print(f"rank {self.rank}: its buffer share outgrew cluster.rank_buffer_gb={self.host_limit / GB:g}; "
                  "it streams from storage from now on", flush=True)
        if self.streaming:
            with self.changed:
                self.share.append(entry)
            return
        try:
            images, labels = read_shard(self.buffer, entry)
        except CorruptShardError as exc:  # a round that needs it stops under policy fail (`wait`)
            with self.changed:
                if self.policy == "fail":
                    self.corrupt[entry.seq] = str(exc)
                else:
                    self.excluded.append(entry.path)
            return
        with self.changed:
            self.bytes_read += entry.bytes
            self.store.append(images, labels)
            self.share.append(entry)

    def wait(self, upto_seq: int, check: bool = True) -> None:
        """Block until every entry with seq <= upto_seq is handled; raise what the thread raised, and (`check`) a
        CorruptShardError for a corrupt shard among them (policy fail)."""
        with self.changed:
            self.changed.wait_for(lambda: self.seen_seq >= upto_seq or self.error is not None
                                  or not self.thread.is_alive())
            if self.error is not None:
                raise self.error
            if self.seen_seq < upto_seq:
                raise RuntimeError(f"the buffer loader of rank {self.rank} ended before commit {upto_seq}")
            bad = sorted(seq for seq in self.corrupt if seq <= upto_seq)
            if check and bad:
                raise CorruptShardError(self.corrupt[bad[0]])


class ResidentShare:
    """The round-by-round view of a ShareLoader: the batches of KD round r, and what reading them cost."""

    def __init__(self, loader: ShareLoader, device: torch.device, device_limit_bytes: float):
        self.loader, self.device = loader, device
        self.on_device = device.type == "cuda"
        self.device_limit = device_limit_bytes
        self.device_images: Tensor | None = None  # the first rows of the store, on the device (CUDA only)

    def batches(self, upto_seq: int, batch_size: int, num_batches: int, seed: int, shuffle_buffer: int
                ) -> Iterator[tuple[Tensor, Tensor]]:
        """`num_batches` uint8 batches from this rank's share as committed through `upto_seq`: shuffled passes over
        the resident share (a fresh permutation per pass, no sample twice in a pass), or for a streamed share the
        same entries read from storage a few batches ahead of the steps."""
        loader = self.loader
        loader.wait(upto_seq)
        with loader.changed:
            held = sum(1 for e in loader.share if e.seq <= upto_seq)
            entries = loader.share[:held]
            streaming = loader.streaming
            rows = 0 if streaming else loader.store.rows(held)
            images, labels = loader.store.tensors() if rows else (None, None)
        if not entries:
            raise CorruptShardError(f"rank {loader.rank} has no readable shard of the buffer")
        if streaming:
            excluded: list[str] = []
            yield from ahead(shard_batches(loader.buffer, entries, batch_size, num_batches, seed, shuffle_buffer,
                                           loader.policy, excluded))
            with loader.changed:
                loader.bytes_read += sum(e.bytes for e in entries if e.path not in excluded)
                loader.excluded.extend(path for path in excluded if path not in loader.excluded)
            return
        images, labels = self._placed(images, rows), labels[:rows]
        generator = torch.Generator().manual_seed(seed)
        if rows < batch_size:
            raise CorruptShardError(f"rank {loader.rank} holds {rows} samples, fewer than a micro-batch of "
                                    f"{batch_size}")
        order = torch.empty(0, dtype=torch.long)
        for _ in range(num_batches):
            if order.numel() < batch_size:  # a new pass; the rest of the last one is dropped, as a partial batch
                order = torch.randperm(rows, generator=generator)
            idx, order = order[:batch_size], order[batch_size:]
            yield images[idx.to(images.device)], labels[idx]

    def _placed(self, images: Tensor, rows: int) -> Tensor:
        """The first `rows` images where batches are gathered: on the GPU when the share fits its limit there (the
        rows new since the last round are copied over once), else in host memory."""
        if not self.on_device or rows * images[0].numel() > self.device_limit:
            self.device_images = None
            return images[:rows]
        have = 0 if self.device_images is None else len(self.device_images)
        if have < rows:
            new = images[have:rows].to(self.device, non_blocking=True)
            self.device_images = new if self.device_images is None else torch.cat([self.device_images, new])
        return self.device_images[:rows]


def ahead(iterator: Iterator, depth: int = 4) -> Iterator:
    """The items of `iterator`, produced by a thread up to `depth` items ahead of the consumer."""
    items: queue.Queue = queue.Queue(maxsize=depth)
    done = object()

    def produce() -> None:
        try:
            for item in iterator:
                items.put(item)
            items.put(done)
        except BaseException as exc:  # noqa: BLE001 - re-raised in the consumer
            items.put(exc)

    threading.Thread(target=produce, name="buffer-stream", daemon=True).start()
    while (item := items.get()) is not done:
        if isinstance(item, BaseException):
            raise item
        yield item
