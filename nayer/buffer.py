"""The memory buffer M of Algorithm 1: every synthesized batch of the run, never evicted.

`InMemoryBuffer` holds it in one process (the single-process runner, and any reader of a finished buffer such as
nayer.quantize). Images are stored as uint8 [N, C, H, W] (floor(x * 255), the reference's PNG round trip) with
int64 labels. The distributed pipeline keeps M as WebDataset shards instead (`orchestrator.shards`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import torch
from torch import Tensor

from nayer.runtime import first_line, save_torch

CHUNK_GLOB = "chunk-*.pt"


def check_batch(images: Tensor, labels: Tensor) -> None:
    if images.dtype != torch.uint8 or images.ndim != 4:
        raise ValueError(f"buffer images must be uint8 [B, C, H, W], got {images.dtype} {tuple(images.shape)}")
    if labels.shape != (images.shape[0],):
        raise ValueError(f"buffer labels must be [B] = [{images.shape[0]}], got {tuple(labels.shape)}")


class InMemoryBuffer:
    """All images in one process, held once in a growable store (capacity doubles, so an append costs amortized
    O(batch) and sampling is a single index): no second, concatenated copy. Appended chunks are remembered as
    ranges of the store, for saving them."""

    def __init__(self) -> None:
        self._images: Tensor | None = None  # [capacity, C, H, W]; rows [0, len) are filled
        self._labels = torch.empty(0, dtype=torch.long)
        self._ends: list[int] = []  # cumulative image count after each appended chunk
        self._order = torch.empty(0, dtype=torch.long)  # rest of the current shuffled pass

    def append(self, images: Tensor, labels: Tensor) -> None:
        check_batch(images, labels)
        n, b = len(self), images.shape[0]
        if self._images is not None and images.shape[1:] != self._images.shape[1:]:
            raise ValueError(f"buffer holds images of shape {tuple(self._images.shape[1:])}, "
                             f"got a batch of {tuple(images.shape[1:])}")
        if self._images is None or n + b > self._images.shape[0]:
            capacity = max(n + b, 2 * n)
            grown = torch.empty((capacity, *images.shape[1:]), dtype=torch.uint8)
            grown_labels = torch.empty(capacity, dtype=torch.long)
            if self._images is not None:
                grown[:n], grown_labels[:n] = self._images[:n], self._labels[:n]
            self._images, self._labels = grown, grown_labels
        self._images[n:n + b] = images.detach().cpu()
        self._labels[n:n + b] = labels.detach().cpu()
        self._ends.append(n + b)

    def __len__(self) -> int:
        return self._ends[-1] if self._ends else 0

    def tensors(self) -> tuple[Tensor, Tensor]:
        """Every image and label held (views of the store, for inspection and export)."""
        if self._images is None:
            raise RuntimeError("the memory buffer is empty: synthesize before training the student")
        return self._images[:len(self)], self._labels[:len(self)]

    def batches(self, batch_size: int, num_batches: int, generator: torch.Generator) -> Iterator[tuple[Tensor, Tensor]]:
        """`num_batches` batches of uint8 images + labels, shuffled passes over the whole buffer (no repeats
        within a pass, like the reference's shuffling DataLoader; a pass continues across calls)."""
        images, labels = self.tensors()
        n = images.shape[0]
        for _ in range(num_batches):
            while self._order.numel() < batch_size:
                self._order = torch.cat([self._order, torch.randperm(n, generator=generator)])
            idx, self._order = self._order[:batch_size], self._order[batch_size:]
            yield images[idx], labels[idx]

    def reset_order(self) -> None:
        """Start a fresh pass (after the buffer grew, so new images are reachable at once)."""
        self._order = torch.empty(0, dtype=torch.long)

    # Persistence: one file per appended chunk, written atomically, so a resumed run keeps its buffer.
    @staticmethod
    def chunk_path(directory: str | Path, index: int) -> Path:
        return Path(directory) / f"chunk-{index:06d}.pt"

    def save_chunk(self, directory: str | Path, index: int) -> Path:
        start, end = (self._ends[index - 1] if index else 0), self._ends[index]
        images, labels = self.tensors()
        return save_torch({"images": images[start:end].clone(), "labels": labels[start:end].clone()},
                          self.chunk_path(directory, index))

    @classmethod
    def load(cls, directory: str | Path, num_chunks: int | None = None) -> "InMemoryBuffer":
        """The first `num_chunks` chunks saved in `directory` (None: every chunk-*.pt there, in order)."""
        if num_chunks is None:
            paths = sorted(Path(directory).glob(CHUNK_GLOB))
        else:
            paths = [cls.chunk_path(directory, i) for i in range(num_chunks)]
        buf = cls()
        for path in paths:
            buf.append(*read_chunk(path))
        return buf

    def rows(self, chunks: int) -> int:
        """Images held in the first `chunks` appended chunks."""
        return self._ends[chunks - 1] if chunks else 0

    @property
    def num_chunks(self) -> int:
        return len(self._ends)


def read_chunk(path: Path) -> tuple[Tensor, Tensor]:
    """One saved chunk, {"images": uint8 [N, C, H, W], "labels": int64 [N]}; a one-line ValueError if it is not."""
    if not path.is_file():
        raise FileNotFoundError(f"buffer chunk {path} is missing; the run folder is incomplete")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch.load raises many types for a bad file
        raise ValueError(f"cannot read buffer chunk '{path}': {first_line(exc)}") from None
    if not isinstance(data, dict) or "images" not in data or "labels" not in data:
        raise ValueError(f"buffer chunk '{path}' is not a {{'images', 'labels'}} dict of nayer.run")
    try:
        check_batch(data["images"], data["labels"])
    except ValueError as exc:
        raise ValueError(f"buffer chunk '{path}': {exc}") from None
    return data["images"], data["labels"].long()
