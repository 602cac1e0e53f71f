"""VGG-11 with BatchNorm for small images (the CRD / Fast-DFKD CIFAR variant).

Five conv groups (64 | 128 | 256,256 | 512,512 | 512,512) separated by 2x2 max-pools, global average
pooling and a single Linear head. At 32x32 the fourth pool is skipped (as in the reference), so the
last two groups run at 4x4; larger inputs (64x64, ...) keep that pool and end in adaptive pooling.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

VGG11_GROUPS: tuple[tuple[int, ...], ...] = ((64,), (128,), (256, 256), (512, 512), (512, 512))


def conv_group(in_planes: int, widths: tuple[int, ...]) -> nn.Sequential:
    """conv3x3-BN-ReLU repeated, without the final ReLU (the caller applies it)."""
    layers: list[nn.Module] = []
    for width in widths:
        layers += [nn.Conv2d(in_planes, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(inplace=True)]
        in_planes = width
    return nn.Sequential(*layers[:-1])


class VGG11BN(nn.Module):
    def __init__(self, num_classes: int) -> None:
        super().__init__()
        in_planes = 3
        groups = []
        for widths in VGG11_GROUPS:
            groups.append(conv_group(in_planes, widths))
            in_planes = widths[-1]
        self.block0, self.block1, self.block2, self.block3, self.block4 = groups
        self.pool = nn.MaxPool2d(2, 2)
        self.classifier = nn.Linear(512, num_classes)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.pool(F.relu(self.block0(x)))
        out = self.pool(F.relu(self.block1(out)))
        out = self.pool(F.relu(self.block2(out)))
        out = F.relu(self.block3(out))
        if out.shape[-1] > 4:  # 64x64 and larger inputs: keep the reference's fourth pool
            out = self.pool(out)
        out = F.relu(self.block4(out))
        return self.classifier(torch.flatten(F.adaptive_avg_pool2d(out, 1), 1))
