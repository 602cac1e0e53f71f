"""Sharded evaluation on the DeepSpeed ranks: each rank evaluates its own slice of the labeled set (images rank,
rank + M, ...) on its device, and the per-class counts are all-reduced."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import ray
import torch
import torch.distributed as dist

from nayer.data import LabeledImages
from nayer.eval_cache import read_manifest
from nayer.evaluate import accuracy, accuracy_counts, predict
from nayer.runtime import RunError
from nayer.specs import Compute, ImageSpec


@dataclass(frozen=True)
class EvalSource:
    """Where the ranks read their slices of the labeled set: the memory-mapped file of an image folder's decoded
    images (`data.eval_cache`: each rank maps it and copies only its own images, after checking it is the file the
    driver read), else the whole set, once, through the object store (`ref`)."""

    mapped: str | None = None  # x.npy of the evaluation cache
    labels: np.ndarray | None = None
    classes: Any = None
    files: list | None = None  # the cache manifest's files when the driver read it
    ref: Any = None  # ObjectRef of the LabeledImages

    @classmethod
    def of(cls, data: LabeledImages | None) -> "EvalSource | None":
        if data is None:
            return None
        if isinstance(data.x, np.memmap):
            manifest = read_manifest(Path(data.x.filename).parent)
            return cls(mapped=data.x.filename, labels=data.y, classes=data.classes,
                       files=manifest["files"] if manifest else None)
        return cls(ref=ray.put(data))

    def part(self, rank: int, world: int) -> LabeledImages:
        """This rank's slice, in its own memory: a copy, since the object store's and the map's arrays are
        read-only (torch warns on them)."""
        if self.mapped is not None:
            # the entry a rank maps (at start, and again after a restart) must be the one the driver checked
            manifest = read_manifest(Path(self.mapped).parent)
            x, y, classes = np.load(self.mapped, mmap_mode="r"), self.labels, self.classes
            if manifest is None or manifest["files"] != self.files or len(x) != len(y):
                raise RunError(f"the evaluation cache {Path(self.mapped).parent} changed after the driver read it "
                               "(another run rewrote it, or the image folder changed): start the run again")
        else:
            full = ray.get(self.ref)
            x, y, classes = full.x, full.y, full.classes
        return LabeledImages(np.array(x[rank::world]), y[rank::world].copy(), classes)


def sharded_evaluate(model: torch.nn.Module, part: LabeledImages, spec: ImageSpec, compute: Compute,
                     batch_size: int) -> dict:
    """Accuracy over all ranks: each evaluates its own slice of the labeled set, the per-class counts are summed."""
    counts = accuracy_counts(predict(model, part, spec, compute, batch_size), part.y, spec.num_classes)
    total = torch.from_numpy(counts).to(compute.device)
    dist.all_reduce(total)
    return accuracy(total.cpu().numpy())
