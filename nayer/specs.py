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


def native_bf16(device: torch.device) -> bool:
    """Whether `device` computes bf16 in hardware: a CUDA GPU that supports it, or a CPU with AVX512-BF16 or AMX
    (oneDNN's own check). On other CPUs autocast emulates bf16: a ResNet-32 training step measured 15x slower
    than fp32 on an AVX2-only EPYC, against about 2x faster on one with AVX512-BF16."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)  # Ampere and later
    if device.type == "cpu":
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return True


def bf16_fallback_note(requested: bool, device: torch.device) -> str | None:
    """The one line a driver prints when `bf16=true` runs in fp32 because `device` has no native bf16."""
    if requested and not native_bf16(device):
        return (f"bf16=true, but this {device.type.upper()} has no native bf16 (AVX512-BF16 or AMX), where "
                "autocast is about 15x slower than fp32: running in fp32")
    return None


@dataclass(frozen=True)
class Compute:
    """Device and precision: `bf16` autocast (CUDA, or a CPU with native bf16), `channels_last`, `compile`."""

    device: torch.device = torch.device("cpu")
    bf16: bool = False
    channels_last: bool = True
    compile: bool = False

    @classmethod
    def select(cls, device: str, bf16: bool = False, channels_last: bool = True, compile: bool = False) -> "Compute":
        """From config values: `device` is auto | cpu | cuda | cuda:<index> (see nayer.runtime.select_device).
        `bf16` holds only where the device computes it natively (see `native_bf16`); elsewhere fp32."""
        resolved = select_device(device)
        return cls(resolved, bf16 and native_bf16(resolved), channels_last, compile)

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
