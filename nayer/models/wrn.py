"""Pre-activation Wide ResNets (Zagoruyko & Komodakis 2016) for small images.

State_dict layout of the Fast-DFKD / NAYER reference ``wresnet.py``: ``conv1``,
``block1/2/3.layer.N.{bn1,conv1,bn2,conv2,convShortcut}``, ``bn1``, ``fc``. Dropout is left out:
the reference trains its teachers and students with dropRate 0.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class PreActBlock(nn.Module):
    """BN-ReLU-conv3x3-BN-ReLU-conv3x3; a 1x1 ``convShortcut`` when the width changes."""

    def __init__(self, in_planes: int, out_planes: int, stride: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, out_planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_planes)
        self.conv2 = nn.Conv2d(out_planes, out_planes, 3, stride=1, padding=1, bias=False)
        self.equal_in_out = in_planes == out_planes
        self.convShortcut: nn.Conv2d | None = None
        if not self.equal_in_out:
            self.convShortcut = nn.Conv2d(in_planes, out_planes, 1, stride=stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        preact = F.relu(self.bn1(x))
        out = self.conv2(F.relu(self.bn2(self.conv1(preact))))
        # As in the reference: a width-changing block projects the *pre-activated* input,
        # an equal-width block adds the raw input.
        shortcut = x if self.convShortcut is None else self.convShortcut(preact)
        return out + shortcut


class NetworkBlock(nn.Module):
    """A stage of ``count`` blocks held in ``.layer`` (the reference's key prefix)."""

    def __init__(self, count: int, in_planes: int, out_planes: int, stride: int) -> None:
        super().__init__()
        self.layer = nn.Sequential(
            *[
                PreActBlock(in_planes if i == 0 else out_planes, out_planes, stride if i == 0 else 1)
                for i in range(count)
            ]
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


class WideResNet(nn.Module):
    """WRN-depth-width: widths 16, 16k, 32k, 64k; (depth-4)/6 blocks per stage."""

    def __init__(self, depth: int, widen_factor: int, num_classes: int) -> None:
        super().__init__()
        if (depth - 4) % 6 != 0:
            raise ValueError(f"WRN depth must be 6n+4 (16, 22, 28, 40, ...), got {depth}")
        count = (depth - 4) // 6
        widths = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        self.conv1 = nn.Conv2d(3, widths[0], 3, stride=1, padding=1, bias=False)
        self.block1 = NetworkBlock(count, widths[0], widths[1], 1)
        self.block2 = NetworkBlock(count, widths[1], widths[2], 2)
        self.block3 = NetworkBlock(count, widths[2], widths[3], 2)
        self.bn1 = nn.BatchNorm2d(widths[3])
        self.fc = nn.Linear(widths[3], num_classes)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Linear):
                nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.block3(self.block2(self.block1(self.conv1(x))))
        out = F.relu(self.bn1(out))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(out, 1), 1))
