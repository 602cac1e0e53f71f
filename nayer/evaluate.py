"""Evaluation on a real labeled test set: top-1 and per-class accuracy."""

from __future__ import annotations

import contextlib
from typing import Sequence

import numpy as np
import torch
from torch import nn

from nayer.augment import Normalize


def autocast(device: torch.device, bf16: bool):
    """bf16 autocast on the run's device (CPU AMX or CUDA), or a no-op context."""
    if not bf16:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


@torch.no_grad()
def evaluate(model: nn.Module, x: np.ndarray, y: np.ndarray, mean: Sequence[float], std: Sequence[float],
             device: torch.device | str = "cpu", batch_size: int = 500, bf16: bool = False,
             num_classes: int | None = None) -> dict:
    """Accuracy of `model` on uint8 NHWC images `x` with int labels `y`.

    Returns {"top1": %, "per_class": [% per class], "n": count}. The model is put in eval mode and restored.
    """
    if x.ndim != 4 or x.shape[-1] != 3 or x.dtype != np.uint8:
        raise ValueError(f"evaluation images must be uint8 NHWC with 3 channels, got {x.dtype} {tuple(x.shape)}")
    if len(x) != len(y) or len(x) == 0:
        raise ValueError(f"evaluation set needs as many labels as images (>0), got {len(x)} images, {len(y)} labels")
    device = torch.device(device)
    was_training = model.training
    model.eval()
    normalize = Normalize(mean, std).to(device)
    preds = []
    for start in range(0, len(x), batch_size):
        batch = torch.from_numpy(x[start:start + batch_size]).to(device).permute(0, 3, 1, 2).float().div_(255)
        batch = batch.contiguous(memory_format=torch.channels_last)
        with autocast(device, bf16):
            logits = model(normalize(batch))
        preds.append(logits.argmax(1).cpu())
    model.train(was_training)
    pred = torch.cat(preds).numpy()
    k = int(num_classes or (int(y.max()) + 1))
    correct = pred == y
    per_class = [float(correct[y == c].mean() * 100) if np.any(y == c) else float("nan") for c in range(k)]
    return {"top1": float(correct.mean() * 100), "per_class": per_class, "n": int(len(y))}
