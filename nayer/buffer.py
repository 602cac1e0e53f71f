"""The memory buffer M of Algorithm 1: every synthesized batch of the run, never evicted.

`MemoryBuffer` is the interface the KD loop reads through; `InMemoryBuffer` is the single-process
implementation (the distributed pipeline's WebDataset buffer implements the same interface). Images are stored
as uint8 [N, C, H, W] (floor(x * 255), the reference's PNG round trip) with int64 labels.
"""

from __future__ import annotations

import abc
from pathlib import Path
from typing import Iterator

import torch
from torch import Tensor

from nayer.runtime import save_torch


class MemoryBuffer(abc.ABC):
    @abc.abstractmethod
    def append(self, images: Tensor, labels: Tensor) -> None:
        """Add a batch: uint8 images [B, C, H, W] and int64 labels [B]."""

    @abc.abstractmethod
    def __len__(self) -> int:
        """Number of images held."""

    @abc.abstractmethod
    def batches(self, batch_size: int, num_batches: int, generator: torch.Generator) -> Iterator[tuple[Tensor, Tensor]]:
        """`num_batches` batches of uint8 images + labels, shuffled passes over the whole buffer (no repeats
        within a pass, like the reference's shuffling DataLoader)."""


def check_batch(images: Tensor, labels: Tensor) -> None:
    if images.dtype != torch.uint8 or images.ndim != 4:
        raise ValueError(f"buffer images must be uint8 [B, C, H, W], got {images.dtype} {tuple(images.shape)}")
    if labels.shape != (images.shape[0],):
        raise ValueError(f"buffer labels must be [B] = [{images.shape[0]}], got {tuple(labels.shape)}")


class InMemoryBuffer(MemoryBuffer):
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
    def load(cls, directory: str | Path, num_chunks: int) -> "InMemoryBuffer":
        buf = cls()
        for i in range(num_chunks):
            path = cls.chunk_path(directory, i)
            if not path.is_file():
                raise FileNotFoundError(f"buffer chunk {path} is missing; the run folder is incomplete")
            data = torch.load(path, map_location="cpu", weights_only=True)
            buf.append(data["images"], data["labels"])
        return buf

    @property
    def num_chunks(self) -> int:
        return len(self._ends)
