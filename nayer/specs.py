"""The two values every component is handed instead of a dozen loose arguments.

- `ImageSpec`: what the images are and what the teacher expects as input (class names, image side, the
  normalization mean/std). Synthesizers, the KD objective, the metrics, evaluation and the workers all take it.
- `Compute`: where and how tensors are computed (device, bf16 autocast, channels_last, torch.compile).

Both are frozen and picklable, so the driver hands them to Ray actors and ranks as they are.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from nayer.runtime import select_device


@dataclass(frozen=True)
class ImageSpec:
    """The images of a run and the teacher's input: one name per teacher output, a square side, mean and std."""

    class_names: tuple[str, ...]
    size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def __post_init__(self) -> None:
        # Lists from a config become tuples: hashable, and never shared with (or edited through) the config.
        for name in ("class_names", "mean", "std"):
            object.__setattr__(self, name, tuple(getattr(self, name)))

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def check_labels(self, labels, where: str, owner: str = "the teacher") -> None:
        """ValueError naming `where` if a label (tensor or array) lies outside 0..K-1 for this run's K classes."""
        check_label_range(labels, self.num_classes, where, owner)


def check_label_range(labels, num_classes: int, where: str, owner: str) -> None:
    """The one label-range check: `labels` (tensor or array) must lie in 0..num_classes-1, the classes of `owner`
    (e.g. "the teacher"); the error names both."""
    if len(labels) == 0:
        return
    low, high = int(labels.min()), int(labels.max())
    if low < 0 or high >= num_classes:
        bad = high if high >= num_classes else low
        raise ValueError(f"{where} has label {bad} but {owner} has {num_classes} classes (labels 0..{num_classes - 1})")


@dataclass(frozen=True)
class Compute:
    """Device and precision: `bf16` autocast (CPU AMX or CUDA), `channels_last` activations, `compile`."""

    device: torch.device = torch.device("cpu")
    bf16: bool = False
    channels_last: bool = True
    compile: bool = False

    @classmethod
    def select(cls, device: str, bf16: bool = False, channels_last: bool = True, compile: bool = False) -> "Compute":
        """From config values: `device` is auto | cpu | cuda | cuda:<index> (see nayer.runtime.select_device)."""
        return cls(select_device(device), bf16, channels_last, compile)

    def autocast(self):
        """bf16 autocast on this device, or a no-op context."""
        if not self.bf16:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)

    def place(self, model: nn.Module) -> nn.Module:
        """The model on this device, in channels_last memory format when that is on."""
        model = model.to(self.device)
        return model.to(memory_format=torch.channels_last) if self.channels_last else model

    def layout(self, x: Tensor) -> Tensor:
        """An NCHW batch in the memory format the models run in."""
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x
