"""Batched, per-sample, differentiable image augmentation on tensors (any device).

The reference code runs kornia-style transforms on the generator's output inside the autograd graph:
RandomCrop(size, padding=4, zero pad) + horizontal flip, then normalization with the teacher's mean/std; on
ImageNet it first rolls the batch (DeepInversion's jitter) and then crops. Its KD pool is read back through the
dataset transform, which on ImageNet is RandomResizedCrop(224) + flip. Doing these as tensor ops (one gather, one
grid_sample, one where) keeps synthesis and KD on the accelerator and avoids PIL round trips.
"""

from __future__ import annotations

import math
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

    def invert(self, x: Tensor) -> Tensor:
        """x * std + mean: the pixels whose normalization `x` is."""
        return x * self.std.to(x.dtype) + self.mean.to(x.dtype)


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


def random_resized_crop(x: Tensor, scale: tuple[float, float] = (0.08, 1.0),
                        ratio: tuple[float, float] = (3 / 4, 4 / 3), attempts: int = 10) -> Tensor:
    """Per-sample torchvision RandomResizedCrop back to the input size (bilinear), as one grid_sample.

    The box is drawn as torchvision draws it: area share ~ U(scale), log aspect ratio ~ U(log ratio), the first of
    `attempts` draws that fits; an image with none that fits gets the whole image, its ratio clamped to `ratio`,
    centered."""
    b, _, h, w = x.shape
    dev = x.device
    area = torch.empty(b, attempts, device=dev).uniform_(*scale) * (h * w)
    log_ratio = torch.empty(b, attempts, device=dev).uniform_(math.log(ratio[0]), math.log(ratio[1]))
    aspect = torch.exp(log_ratio)
    cw, ch = torch.sqrt(area * aspect).round(), torch.sqrt(area / aspect).round()
    fits = (cw > 0) & (cw <= w) & (ch > 0) & (ch <= h)
    first = torch.where(fits.any(1), fits.float().argmax(1), torch.full((b,), -1, device=dev))
    # The fallback: the largest box of the clamped whole-image ratio.
    in_ratio = w / h
    fw, fh = (float(w), float(h)) if ratio[0] <= in_ratio <= ratio[1] else \
        ((float(w), round(w / ratio[0])) if in_ratio < ratio[0] else (round(h * ratio[1]), float(h)))
    pick = first.clamp(min=0).view(b, 1)
    cw = torch.where(first >= 0, cw.gather(1, pick).view(b), torch.full((b,), fw, device=dev))
    ch = torch.where(first >= 0, ch.gather(1, pick).view(b), torch.full((b,), fh, device=dev))
    # Top-left corner uniform over the positions that fit (torchvision: randint(0, H - h + 1)).
    top = torch.floor(torch.rand(b, device=dev) * (h - ch + 1))
    left = torch.floor(torch.rand(b, device=dev) * (w - cw + 1))
    top = torch.where(first >= 0, top, torch.floor((h - ch) / 2))
    left = torch.where(first >= 0, left, torch.floor((w - cw) / 2))
    # Bilinear resize of the box as torchvision does it on the cropped image (half-pixel centers, edges clamped to the
    # box: nothing outside it is read), as a grid in grid_sample's [-1, 1] pixel-edge coordinates.
    steps_x = (torch.arange(w, device=dev, dtype=torch.float32) + 0.5) / w
    steps_y = (torch.arange(h, device=dev, dtype=torch.float32) + 0.5) / h
    src_x = torch.minimum(torch.maximum(left[:, None] + steps_x[None] * cw[:, None] - 0.5, left[:, None]),
                          (left + cw - 1)[:, None])
    src_y = torch.minimum(torch.maximum(top[:, None] + steps_y[None] * ch[:, None] - 0.5, top[:, None]),
                          (top + ch - 1)[:, None])
    gx = ((2 * src_x + 1) / w - 1)[:, None, :].expand(b, h, w)
    gy = ((2 * src_y + 1) / h - 1)[:, :, None].expand(b, h, w)
    grid = torch.stack([gx, gy], dim=-1).to(x.dtype)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def jitter_flip(x: Tensor, jitter: int) -> Tensor:
    """DeepInversion's ImageNet jitter: one random roll of up to `jitter` px and one flip for the whole batch."""
    if jitter > 0:
        ox, oy = (int(v) for v in torch.randint(-jitter, jitter + 1, (2,)))
        x = torch.roll(x, shifts=(ox, oy), dims=(2, 3))
    if bool(torch.rand(()) < 0.5):
        x = x.flip(3)
    return x


CROPS = ("pad", "resized")  # random crop after zero padding | RandomResizedCrop


class Augment(nn.Module):
    """(jitter) then crop (+flip), then normalize; input float [0,1] NCHW, output normalized.

    `crop_padding`=4, `flip`=True is the CIFAR recipe; TinyImageNet/ImageNet synthesis uses crop only, ImageNet
    first rolls the batch by up to `jitter` px and flips it (DeepInversion's jitter; the reference's order: roll,
    then crop). `crop="resized"` is RandomResizedCrop + flip, the reference's ImageNet KD transform.
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float], crop_padding: int = 4, flip: bool = True,
                 jitter: int = 0, crop: str = "pad"):
        super().__init__()
        if crop_padding < 0 or jitter < 0:
            raise ValueError(f"crop_padding and jitter must be >= 0, got {crop_padding} and {jitter}")
        if crop not in CROPS:
            raise ValueError(f"unknown crop {crop!r}; choose one of: {', '.join(CROPS)}")
        self.crop_padding, self.flip, self.jitter, self.crop = crop_padding, flip, jitter, crop
        self.normalize = Normalize(mean, std)

    def forward(self, x: Tensor) -> Tensor:
        if self.jitter:
            x = jitter_flip(x, self.jitter)
        x = random_resized_crop(x) if self.crop == "resized" else random_crop(x, self.crop_padding)
        if self.flip:
            x = random_flip(x)
        return self.normalize(x)
