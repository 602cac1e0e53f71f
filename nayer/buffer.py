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
    """All images in one process. Chunks are appended; a contiguous copy is built lazily for sampling."""

    def __init__(self) -> None:
        self._chunks: list[tuple[Tensor, Tensor]] = []
        self._images: Tensor | None = None
        self._labels: Tensor | None = None
        self._order = torch.empty(0, dtype=torch.long)  # rest of the current shuffled pass

    def append(self, images: Tensor, labels: Tensor) -> None:
        check_batch(images, labels)
        self._chunks.append((images.detach().cpu().contiguous(), labels.detach().cpu().long()))
        self._images = self._labels = None

    def __len__(self) -> int:
        return sum(c[1].shape[0] for c in self._chunks)

    def tensors(self) -> tuple[Tensor, Tensor]:
        if self._images is None:
            if not self._chunks:
                raise RuntimeError("the memory buffer is empty: synthesize before training the student")
            self._images = torch.cat([c[0] for c in self._chunks])
            self._labels = torch.cat([c[1] for c in self._chunks])
        return self._images, self._labels  # type: ignore[return-value]

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
    def save_chunk(self, directory: str | Path, index: int) -> Path:
        images, labels = self._chunks[index]
        return save_torch({"images": images, "labels": labels}, Path(directory) / f"chunk-{index:06d}.pt")

    @classmethod
    def load(cls, directory: str | Path, num_chunks: int) -> "InMemoryBuffer":
        buf = cls()
        for i in range(num_chunks):
            path = Path(directory) / f"chunk-{i:06d}.pt"
            if not path.is_file():
                raise FileNotFoundError(f"buffer chunk {path} is missing; the run folder is incomplete")
            data = torch.load(path, map_location="cpu", weights_only=True)
            buf.append(data["images"], data["labels"])
        return buf

    @property
    def num_chunks(self) -> int:
        return len(self._chunks)
