"""torchvision ImageNet ResNets and their pretrained weights (via torchvision's weights API).

Weights are fetched with ``WeightsEnum.get_state_dict`` (cached under ``$TORCH_HOME``). Offline
machines cannot download them, so a failed fetch is turned into one clear error that points at the
offline alternative, a local state_dict passed as ``teacher.checkpoint``. torchvision is imported on use: it costs
about 1.5 s per process, and every Ray worker imports the model zoo.
"""

from __future__ import annotations

import torch
from torch import nn

# Registry name -> torchvision builder name.
TORCHVISION_ARCHS: dict[str, str] = {"tv_resnet18": "resnet18", "tv_resnet50": "resnet50"}


def build_torchvision_model(name: str, num_classes: int) -> nn.Module:
    """Randomly initialised torchvision model with a ``num_classes``-way ``fc`` head."""
    import torchvision

    return torchvision.models.get_model(TORCHVISION_ARCHS[name], weights=None, num_classes=num_classes)


def fetch_pretrained_state_dict(name: str, tag: str, num_classes: int) -> dict[str, torch.Tensor]:
    """State_dict of torchvision weights ``tag`` (e.g. ``IMAGENET1K_V2``) for registry model ``name``.

    Raises ValueError for an unknown tag or a class count the weights do not have, and RuntimeError
    when the weights cannot be downloaded (no retry: offline runs should fail at once).
    """
    import torchvision

    weights_enum = torchvision.models.get_model_weights(TORCHVISION_ARCHS[name])
    valid_tags = list(weights_enum.__members__)  # includes the DEFAULT alias
    if tag not in valid_tags:
        raise ValueError(f"unknown weights tag '{tag}' for {name}; valid: {', '.join(valid_tags)}")
    weights = weights_enum[tag]
    weight_classes = len(weights.meta["categories"])
    if num_classes != weight_classes:
        raise ValueError(
            f"weights {weights_enum.__name__}.{weights.name} have {weight_classes} classes, "
            f"but num_classes={num_classes}"
        )
    try:
        return weights.get_state_dict(progress=False)
    except OSError as error:  # urllib's URLError/HTTPError and socket errors are all OSErrors
        raise RuntimeError(
            f"could not fetch torchvision weights {weights_enum.__name__}.{weights.name} ({error}); "
            f"offline, pass a local state_dict instead: teacher.checkpoint=<local state_dict>"
        ) from error
