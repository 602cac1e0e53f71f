"""Batched, per-sample, differentiable image augmentation on tensors (any device).

The reference code runs kornia-style transforms on the generator's output inside the autograd graph:
RandomCrop(size, padding=4, zero pad) + horizontal flip, then normalization with the teacher's mean/std.
Doing it as tensor ops (one gather, one where) keeps synthesis on the accelerator and avoids PIL round trips.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def uint8_to_float(images: Tensor) -> Tensor:
    """uint8 [B,C,H,W] in 0..255 -> float32 in [0,1]."""
    return images.float().div_(255.0)


def float_to_uint8(images: Tensor) -> Tensor:
    """float in [0,1] -> uint8, floor(x*255) as the reference's PNG round trip did."""
    return (images.detach().float().clamp(0, 1) * 255).floor_().to(torch.uint8)


class Normalize(nn.Module):
    """(x - mean) / std per channel, the teacher's input normalization."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        if len(mean) != len(std):
            raise ValueError(f"normalization mean has {len(mean)} channels but std has {len(std)}")
        if any(s <= 0 for s in std):
            raise ValueError(f"normalization std must be > 0, got {list(std)}")
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        return (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)


def random_crop(x: Tensor, padding: int) -> Tensor:
    """Per-sample RandomCrop(H, W) after zero padding by `padding` pixels (one gather, differentiable)."""
    if padding <= 0:
        return x
    b, c, h, w = x.shape
    padded = F.pad(x, (padding, padding, padding, padding))
    dy = torch.randint(0, 2 * padding + 1, (b, 1, 1), device=x.device)
    dx = torch.randint(0, 2 * padding + 1, (b, 1, 1), device=x.device)
    rows = torch.arange(h, device=x.device).view(1, h, 1) + dy  # [B,H,1]
    cols = torch.arange(w, device=x.device).view(1, 1, w) + dx  # [B,1,W]
    index = (rows * (w + 2 * padding) + cols).view(b, 1, h * w).expand(b, c, h * w)
    flat = padded.reshape(b, c, -1)
    return flat.gather(2, index).view(b, c, h, w)


def random_flip(x: Tensor) -> Tensor:
    """Per-sample horizontal flip with probability 1/2."""
    flip = torch.rand(x.shape[0], 1, 1, 1, device=x.device) < 0.5
    return torch.where(flip, x.flip(3), x)


def jitter_flip(x: Tensor, jitter: int) -> Tensor:
    """DeepInversion's ImageNet jitter: one random roll of up to `jitter` px and one flip for the whole batch."""
    if jitter > 0:
        ox, oy = (int(v) for v in torch.randint(-jitter, jitter + 1, (2,)))
        x = torch.roll(x, shifts=(ox, oy), dims=(2, 3))
    if bool(torch.rand(()) < 0.5):
        x = x.flip(3)
    return x


class Augment(nn.Module):
    """crop (+flip) (+jitter) then normalize; input float [0,1] NCHW, output normalized.

    `crop_padding`=4, `flip`=True is the CIFAR recipe; TinyImageNet/ImageNet synthesis uses crop only, ImageNet
    adds `jitter` (roll + batch flip as in DeepInversion).
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float], crop_padding: int = 4, flip: bool = True,
                 jitter: int = 0):
        super().__init__()
        if crop_padding < 0 or jitter < 0:
            raise ValueError(f"crop_padding and jitter must be >= 0, got {crop_padding} and {jitter}")
        self.crop_padding = crop_padding
        self.flip = flip
        self.jitter = jitter
        self.normalize = Normalize(mean, std)

    def forward(self, x: Tensor) -> Tensor:
        x = random_crop(x, self.crop_padding)
        if self.flip:
            x = random_flip(x)
        if self.jitter:
            x = jitter_flip(x, self.jitter)
        return self.normalize(x)
