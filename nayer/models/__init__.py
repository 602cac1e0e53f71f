"""Every teacher/student architecture by one name, plus checked checkpoint loading.

A name is a zoo name (``resnet56``, ``wrn40_2``, ``tv_resnet50``: :func:`model_names`) or a source-prefixed one
(``torchvision:mobilenet_v3_small``, ``timm:vit_tiny_patch16_224``, ``mypkg.models:make_net``: see
:mod:`nayer.models.sources`). All models take normalized NCHW float images and return logits
``[B, num_classes]``. The CIFAR models end in adaptive average pooling, so they accept any input side that is a
multiple of 32.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from functools import partial

from torch import nn

from nayer.models.alexnet import AlexNet
from nayer.models.cifar_resnet import CifarResNet, resnet18, resnet34
from nayer.models.loading import (
    CheckpointMismatchError,
    load_checkpoint,
    load_state_dict_checked,
    read_checkpoint,
)
from nayer.models.sources import (
    ModelMetadata,
    ModelSource,
    build_external,
    check_source,
    parse_source,
    pretrained_metadata,
    pretrained_model,
)
from nayer.models.vgg import VGG11BN
from nayer.models.wrn import WideResNet

__all__ = [
    "CheckpointMismatchError",
    "ModelMetadata",
    "build_model",
    "check_arch",
    "classifier_layer",
    "load_checkpoint",
    "load_state_dict_checked",
    "load_model",
    "load_teacher",
    "model_metadata",
    "model_names",
    "read_checkpoint",
]

_REGISTRY: dict[str, Callable[[int], nn.Module]] = {
    "resnet18": resnet18,
    "resnet34": resnet34,
    **{f"resnet{d}": partial(CifarResNet, d, option_a=False) for d in (20, 32, 44, 56)},
    **{f"resnet{d}_a": partial(CifarResNet, d, option_a=True) for d in (20, 32, 44, 56)},
    **{f"wrn{d}_{k}": partial(WideResNet, d, k) for d, k in ((16, 1), (16, 2), (40, 1), (40, 2))},
    "vgg11_bn": VGG11BN,
    "alexnet": AlexNet,
}
# Short zoo names of two torchvision models (the ImageNet configs and recipes name them): aliases of that source.
TORCHVISION_ALIASES: dict[str, ModelSource] = {
    "tv_resnet18": ModelSource("torchvision", "resnet18"), "tv_resnet50": ModelSource("torchvision", "resnet50"),
}


def model_names() -> list[str]:
    """Sorted zoo names accepted by ``build_model`` (besides the source-prefixed names)."""
    return sorted([*_REGISTRY, *TORCHVISION_ALIASES])


def _source(name: str) -> ModelSource | None:
    """The external source of ``name`` (None for a zoo model); ValueError for a name nobody knows."""
    if name in TORCHVISION_ALIASES:
        return TORCHVISION_ALIASES[name]
    source = parse_source(name)
    if source is None and name not in _REGISTRY:
        raise ValueError(f"unknown model '{name}'; known: {', '.join(model_names())}, or torchvision:<name>, "
                         "timm:<name>, <package.module>:<function>")
    return source


def check_arch(name: str) -> None:
    """ValueError naming ``name`` unless some source builds it (imports torchvision/timm/the factory to check)."""
    source = _source(name)
    if source is not None:
        check_source(source)


def build_model(name: str, num_classes: int) -> nn.Module:
    """Randomly initialised model ``name`` with a ``num_classes``-way head."""
    source = _source(name)
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
        raise ValueError(f"num_classes must be an integer >= 2, got {num_classes!r}")
    if source is not None:
        return build_external(source, num_classes)
    return _REGISTRY[name](num_classes=num_classes)


def model_metadata(name: str, weights: str | None) -> ModelMetadata | None:
    """What the pretrained ``weights`` of model ``name`` say about their input (class names, image side, mean/std);
    None without pretrained weights or for a zoo model. Nothing is downloaded."""
    source = _source(name)
    if not weights or source is None or source.kind == "factory":
        return None
    return pretrained_metadata(source, weights)


def classifier_layer(model: nn.Module) -> nn.Linear:
    """The final Linear of ``model``; its input is the penultimate feature vector.

    Every zoo model registers its head last (``linear``, ``fc`` or ``classifier``), so the last
    Linear in module order is the head.
    """
    linears = [module for module in model.modules() if isinstance(module, nn.Linear)]
    if not linears:
        raise ValueError(f"{type(model).__name__} has no nn.Linear classifier layer")
    return linears[-1]


def load_model(
    name: str,
    num_classes: int,
    checkpoint: str | os.PathLike[str] | None = None,
    weights: str | None = None,
    rename: Sequence[str] = (),
    role: str = "teacher",
) -> nn.Module:
    """Build ``name`` and load either a local state_dict file (its keys renamed by ``rename``, see
    :func:`nayer.models.loading.rename_keys`) or the source's pretrained ``weights`` (torchvision tag, timm
    ``pretrained``). With neither, the model keeps its random init. ``role`` (teacher | student) names the config
    keys in error messages."""
    if checkpoint is not None and weights is not None:
        raise ValueError(f"give either {role}.checkpoint ({checkpoint}) or {role}.weights ({weights}), not both")
    source = _source(name)
    if weights is not None:
        if source is None:
            raise ValueError(f"{role}.weights='{weights}': pretrained weights exist for torchvision:<name>, "
                             f"timm:<name> and {', '.join(TORCHVISION_ALIASES)}, not the zoo model '{name}'; "
                             f"use {role}.checkpoint=<state_dict file> instead")
        return pretrained_model(source, weights, num_classes)
    model = build_model(name, num_classes)
    if checkpoint is not None:
        load_checkpoint(model, checkpoint, name, rename, f"{role}.rename")
    return model


def load_teacher(
    name: str,
    num_classes: int,
    checkpoint: str | os.PathLike[str] | None = None,
    weights: str | None = None,
    rename: Sequence[str] = (),
) -> nn.Module:
    """:func:`load_model`, frozen: ``eval()`` mode and ``requires_grad_(False)``, so synthesis never computes its
    grads."""
    model = load_model(name, num_classes, checkpoint, weights, rename)
    model.eval()
    model.requires_grad_(False)
    return model
