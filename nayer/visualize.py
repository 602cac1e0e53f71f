"""PNG grids of synthetic samples: one row per class, so a person sees at a glance what each label became."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch
from torch import Tensor

from nayer.runtime import atomic_write


def save_sample_grid(images: Tensor, labels: Tensor, path: str | Path, num_classes: int, per_class: int = 8,
                     write: Callable = atomic_write):
    """Row c holds up to `per_class` images of class c (blank where a class has fewer); written whole by
    `write(path, writer)` (atomically, by default)."""
    from torchvision.utils import save_image  # on use: torchvision costs ~1.5 s to import, most workers need none

    _, c, h, w = images.shape
    grid = torch.zeros(num_classes * per_class, c, h, w, dtype=torch.uint8)
    for cls in range(num_classes):
        picked = images[labels == cls][:per_class]
        grid[cls * per_class: cls * per_class + len(picked)] = picked
    return write(path, lambda tmp: save_image(grid.float() / 255, tmp, format="png", nrow=per_class, padding=1))
