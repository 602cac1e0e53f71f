"""Random-weight models fit to time and count: benchmarks of speed need no trained weights, only sane activations.

Shared by `capacity.py` and `gpu.py`: FLOPs counted with `torch.utils.flop_counter`, BN statistics set from noise
(`calibrate_bn`), and a teacher whose logits stay bounded (`BoundedTeacher`).
"""

from __future__ import annotations

import torch
from torch.utils.flop_counter import FlopCounterMode


def flops(fn) -> tuple[int, dict]:
    """FLOPs of one call of `fn`: the total and per module."""
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops(), {k: sum(v.values()) for k, v in counter.get_flop_counts().items()}


@torch.no_grad()
def calibrate_bn(model: torch.nn.Module, size: int) -> torch.nn.Module:
    """Random weights with BN running statistics (0, 1) blow activations up (random ResNet-56: logits ~1e4): set
    them to those of noise images, as a trained net's are of its data (the cost does not depend on the weights)."""
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average: one forward sets the statistics of this batch
    model.train()(torch.randn(8, 3, size, size))
    for m, momentum in zip(norms, momenta):
        m.momentum = momentum
    return model.eval()


class BoundedTeacher(torch.nn.Module):
    """A random teacher's logits squashed into +-10 (elementwise, not counted as FLOPs). On generator images a random
    ResNet-50's logits differ by > 100: its softmax underflows to exact zeros and the backward of the adversarial
    KL (nayer.losses.kl_div, gradient through the teacher's softmax) turns NaN. A trained teacher is far tamer."""

    def __init__(self, net: torch.nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 10 * torch.tanh(self.net(x) / 10)
