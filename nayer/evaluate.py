"""Evaluation on a real labeled test set: top-1 and per-class accuracy."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from nayer.augment import Normalize
from nayer.data import LabeledImages
from nayer.specs import Compute, ImageSpec


@torch.no_grad()
def predict(model: nn.Module, data: LabeledImages, images: ImageSpec, compute: Compute, batch_size: int = 500
            ) -> np.ndarray:
    """The model's class for each uint8 NHWC image of `data` (eval mode; the model's mode is restored)."""
    x = data.x
    if x.ndim != 4 or x.shape[-1] != 3 or x.dtype != np.uint8:
        raise ValueError(f"evaluation images must be uint8 NHWC with 3 channels, got {x.dtype} {tuple(x.shape)}")
    was_training = model.training
    model.eval()
    normalize = Normalize(images.mean, images.std).to(compute.device)
    preds = []
    for start in range(0, len(x), batch_size):
        part = x[start:start + batch_size]
        if not part.flags.writeable:  # a read-only memory map (data.eval_cache): torch takes a writable copy
            part = np.array(part)
        batch = torch.from_numpy(part).to(compute.device).permute(0, 3, 1, 2).float().div_(255)
        with compute.autocast():
            logits = model(normalize(compute.layout(batch)))
        preds.append(logits.argmax(1).cpu())
    model.train(was_training)
    return torch.cat(preds).numpy() if preds else np.empty(0, dtype=np.int64)


def accuracy_counts(pred: np.ndarray, labels: np.ndarray, num_classes: int) -> np.ndarray:
    """[2, K] int64: correct and total predictions per class (sums over shards of a test set add up)."""
    correct = np.bincount(labels[pred == labels], minlength=num_classes)
    total = np.bincount(labels, minlength=num_classes)
    return np.stack([correct, total]).astype(np.int64)


def accuracy(counts: np.ndarray) -> dict:
    """{"top1": %, "per_class": [% per class, nan where a class has no image], "n": count} from accuracy_counts."""
    correct, total = counts
    per_class = [float(c / t * 100) if t else float("nan") for c, t in zip(correct, total)]
    return {"top1": float(correct.sum() / total.sum() * 100), "per_class": per_class, "n": int(total.sum())}


def evaluate(model: nn.Module, data: LabeledImages, images: ImageSpec, compute: Compute,
             batch_size: int = 500) -> dict:
    """Accuracy of `model` on `data`: {"top1": %, "per_class": [% per class], "n": count}."""
    if len(data) == 0:
        raise ValueError("the evaluation set is empty")
    pred = predict(model, data, images, compute, batch_size)
    return accuracy(accuracy_counts(pred, data.y, images.num_classes))
