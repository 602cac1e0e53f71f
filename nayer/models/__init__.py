"""Model zoo: every teacher/student architecture by registry name, plus checked checkpoint loading.

All models take normalized NCHW float images and return logits ``[B, num_classes]``. The CIFAR
models end in adaptive average pooling, so they accept any input side that is a multiple of 32.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from functools import partial

from torch import nn

from nayer.models.alexnet import AlexNet
from nayer.models.cifar_resnet import CifarResNet, resnet18, resnet34
from nayer.models.imagenet import TORCHVISION_ARCHS, build_torchvision_model, fetch_pretrained_state_dict
from nayer.models.loading import (
    CheckpointMismatchError,
    load_checkpoint,
    load_state_dict_checked,
    read_checkpoint,
)
from nayer.models.vgg import VGG11BN
from nayer.models.wrn import WideResNet

__all__ = [
    "CheckpointMismatchError",
    "build_model",
    "classifier_layer",
    "load_checkpoint",
    "load_state_dict_checked",
    "load_teacher",
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
    **{name: partial(build_torchvision_model, name) for name in TORCHVISION_ARCHS},
}


def model_names() -> list[str]:
    """Sorted registry names accepted by ``build_model``."""
    return sorted(_REGISTRY)


def build_model(name: str, num_classes: int) -> nn.Module:
    """Randomly initialised model ``name`` with a ``num_classes``-way head."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown model '{name}'; known: {', '.join(model_names())}")
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
        raise ValueError(f"num_classes must be an integer >= 2, got {num_classes!r}")
    return _REGISTRY[name](num_classes=num_classes)


def classifier_layer(model: nn.Module) -> nn.Linear:
    """The final Linear of ``model``; its input is the penultimate feature vector.

    Every zoo model registers its head last (``linear``, ``fc`` or ``classifier``), so the last
    Linear in module order is the head.
    """
    linears = [module for module in model.modules() if isinstance(module, nn.Linear)]
    if not linears:
        raise ValueError(f"{type(model).__name__} has no nn.Linear classifier layer")
    return linears[-1]


def load_teacher(
    name: str,
    num_classes: int,
    checkpoint: str | os.PathLike[str] | None = None,
    weights: str | None = None,
) -> nn.Module:
    """Build ``name`` and load either a local state_dict file or torchvision ``weights`` (tv_* only).

    With neither, the model keeps its random init (useful for tests and smoke runs). The result is
    frozen: ``eval()`` mode and ``requires_grad_(False)``, so synthesis never computes its grads.
    """
    if checkpoint is not None and weights is not None:
        raise ValueError(
            f"give either a checkpoint ({checkpoint}) or torchvision weights ({weights}) for the teacher, not both"
        )
    model = build_model(name, num_classes)
    if checkpoint is not None:
        load_checkpoint(model, checkpoint, name)
    elif weights is not None:
        if name not in TORCHVISION_ARCHS:
            raise ValueError(
                f"torchvision weights ('{weights}') exist only for {', '.join(TORCHVISION_ARCHS)}, "
                f"not '{name}'; use a checkpoint file instead"
            )
        state_dict = fetch_pretrained_state_dict(name, weights, num_classes)
        load_state_dict_checked(model, state_dict, f"torchvision weights {weights}", name)
    model.eval()
    model.requires_grad_(False)
    return model
