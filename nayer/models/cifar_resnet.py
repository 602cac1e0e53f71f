"""CIFAR ResNets (3x3 stem, no max-pool) in two families.

* ``CifarResNet18/34`` (64..512 widths, 4 stages): state_dict layout of the Fast-DFKD / NAYER reference
  ``resnet.py`` (``conv1``, ``bn1``, ``layer1..4.N.{conv1,bn1,conv2,bn2,shortcut.0,shortcut.1}``, ``linear``),
  so checkpoints trained with that code load unchanged.
* ``CifarResNet`` depth 20/32/44/56 (16/32/64 widths, 3 stages, He et al. 2016): option B (1x1 conv + BN
  projection stored as ``downsample.0/1``, the chenyaofo/pytorch-cifar-models layout of the shared
  ResNet-56 teacher) or option A (parameter-free: stride-2 subsample and zero-padded channels).

Every model ends in adaptive average pooling, so any input whose side is a multiple of 32 works
(32x32 CIFAR, 64x64 TinyImageNet, upsampled digits).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def init_conv_bn(model: nn.Module) -> None:
    """He init for convs, identity-like BN: the standard CIFAR ResNet initialisation."""
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(module, nn.BatchNorm2d):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)


# --------------------------------------------------------------------------------------------------
# ResNet-18/34, Fast-DFKD / NAYER layout
# --------------------------------------------------------------------------------------------------
class WideBasicBlock(nn.Module):
    """BasicBlock of the reference ResNet-18/34; the projection shortcut is named ``shortcut``."""

    def __init__(self, in_planes: int, planes: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        # An empty Sequential is the identity and adds no state_dict keys, matching the reference.
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False),
                nn.BatchNorm2d(planes),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet18Family(nn.Module):
    """ResNet-18 (blocks 2,2,2,2) / ResNet-34 (3,4,6,3) for small images, head named ``linear``."""

    def __init__(self, blocks_per_stage: tuple[int, int, int, int], num_classes: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        in_planes = 64
        stages = []
        for planes, count, stride in zip((64, 128, 256, 512), blocks_per_stage, (1, 2, 2, 2)):
            blocks = []
            for block_stride in [stride] + [1] * (count - 1):
                blocks.append(WideBasicBlock(in_planes, planes, block_stride))
                in_planes = planes
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(512, num_classes)
        init_conv_bn(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        return self.linear(torch.flatten(self.avgpool(out), 1))


def resnet18(num_classes: int) -> CifarResNet18Family:
    return CifarResNet18Family((2, 2, 2, 2), num_classes)


def resnet34(num_classes: int) -> CifarResNet18Family:
    return CifarResNet18Family((3, 4, 6, 3), num_classes)


# --------------------------------------------------------------------------------------------------
# ResNet-20/32/44/56, chenyaofo layout (option B) or parameter-free option A
# --------------------------------------------------------------------------------------------------
class ZeroPadShortcut(nn.Module):
    """Option-A shortcut: subsample spatially by ``stride`` and zero-pad the new channels (no params)."""

    def __init__(self, in_planes: int, out_planes: int, stride: int) -> None:
        super().__init__()
        self.stride = stride
        extra = out_planes - in_planes
        self.pad_front = extra // 2
        self.pad_back = extra - extra // 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x[:, :, :: self.stride, :: self.stride]
        # F.pad's last pair addresses the channel dim for a 4-D tensor: (W, W, H, H, C, C).
        return F.pad(x, (0, 0, 0, 0, self.pad_front, self.pad_back))


class BasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN, add shortcut, ReLU; stride sits in the first conv."""

    def __init__(self, in_planes: int, planes: int, stride: int, option_a: bool) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample: nn.Module | None = None
        if stride != 1 or in_planes != planes:
            if option_a:
                self.downsample = ZeroPadShortcut(in_planes, planes, stride)
            else:
                self.downsample = nn.Sequential(
                    nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False),
                    nn.BatchNorm2d(planes),
                )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        identity = x if self.downsample is None else self.downsample(x)
        return F.relu(out + identity)


class CifarResNet(nn.Module):
    """ResNet-(6n+2) with widths 16/32/64; ``option_a`` picks the parameter-free shortcut."""

    def __init__(self, depth: int, num_classes: int, option_a: bool) -> None:
        super().__init__()
        if (depth - 2) % 6 != 0:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2 (20, 32, 44, 56, ...), got {depth}")
        blocks_per_stage = (depth - 2) // 6
        self.conv1 = nn.Conv2d(3, 16, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        in_planes = 16
        stages = []
        for planes, stride in zip((16, 32, 64), (1, 2, 2)):
            blocks = []
            for block_stride in [stride] + [1] * (blocks_per_stage - 1):
                blocks.append(BasicBlock(in_planes, planes, block_stride, option_a))
                in_planes = planes
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(64, num_classes)
        init_conv_bn(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        return self.fc(torch.flatten(self.avgpool(out), 1))
