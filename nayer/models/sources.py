"""Models from outside the zoo, named by one string: ``torchvision:<name>``, ``timm:<name>`` or
``<package.module>:<function>``.

- ``torchvision:mobilenet_v3_small``: any torchvision classification model (``torchvision.models.list_models``);
  pretrained weights through torchvision's weights API (``weights=IMAGENET1K_V1``, ``DEFAULT``), fetched with
  ``WeightsEnum.get_state_dict`` (cached under ``$TORCH_HOME``).
- ``timm:resnet18`` or ``timm:resnet18.a1_in1k``: any timm model (``timm.list_models``), a pretrained tag after the
  dot as timm spells it; ``weights=pretrained`` is timm's own download (Hugging Face hub, cached there).
- ``mypkg.models:make_net``: a user factory, imported and called with the class count; it returns the nn.Module.
  It must be importable on every Ray worker too: on ``PYTHONPATH``, installed, or shipped by
  ``ray job submit --working-dir``.

torchvision and timm are imported on use: each costs a second or more per process, and every Ray worker imports
the model zoo. A download that fails is one error naming the offline alternative (a local ``checkpoint``).
torchvision's download is tried once; timm's goes through the Hugging Face hub, which retries for about a minute
unless ``HF_HUB_OFFLINE=1`` (set by the Makefile) makes it fail at once.

What pretrained weights say about their input (normalization, image side, class names) is read from the weights'
own description, torchvision's ``meta``/``transforms`` and timm's ``pretrained_cfg``, without downloading anything:
see :func:`pretrained_metadata`.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Optional

from torch import nn

from nayer.models.loading import load_state_dict_checked
from nayer.runtime import first_line

PREFIXES = ("torchvision", "timm")
TIMM_PRETRAINED = "pretrained"  # the `weights` value that asks timm for its own pretrained weights


@dataclass(frozen=True)
class ModelSource:
    """Where an architecture comes from: ``kind`` is torchvision | timm | factory, ``name`` what that source calls
    it (a factory's ``module:function``)."""

    kind: str
    name: str

    @property
    def arch(self) -> str:
        return self.name if self.kind == "factory" else f"{self.kind}:{self.name}"


@dataclass(frozen=True)
class ModelMetadata:
    """What a model's pretrained weights say about their input; None where they say nothing. ``source`` names the
    description it was read from (printed and written to the run folder's inputs.json)."""

    source: str
    class_names: Optional[tuple[str, ...]] = None
    image_size: Optional[int] = None
    mean: Optional[tuple[float, ...]] = None
    std: Optional[tuple[float, ...]] = None


def parse_source(arch: str) -> ModelSource | None:
    """``prefix:name`` -> its ModelSource; None for a plain (zoo) name. ValueError for a malformed one."""
    if ":" not in arch:
        return None
    head, _, tail = arch.partition(":")
    if not head or not tail:
        raise ValueError(f"model '{arch}' is malformed; use torchvision:<name>, timm:<name> or <package.module>:<function>")
    if head in PREFIXES:
        return ModelSource(head, tail)
    return ModelSource("factory", arch)


def check_source(source: ModelSource) -> None:
    """ValueError naming the model when its source does not know it (an unknown name, a factory that fails to
    import); cheap enough for config validation."""
    if source.kind == "torchvision":
        names = _torchvision_names()
        if source.name not in names:
            raise ValueError(f"torchvision has no classification model '{source.name}'; "
                             f"known: {', '.join(names)}")
    elif source.kind == "timm":
        import timm

        if not timm.is_model(source.name):
            close = timm.list_models(f"*{source.name.split('.')[0]}*")[:8]
            raise ValueError(f"timm has no model '{source.name}'"
                             f"{'; similar: ' + ', '.join(close) if close else ''} (list them: timm.list_models())")
    else:
        _factory(source.name)


def build_external(source: ModelSource, num_classes: int) -> nn.Module:
    """A randomly initialized model of ``source`` with a ``num_classes``-way head."""
    if source.kind == "torchvision":
        import torchvision

        check_source(source)
        return torchvision.models.get_model(source.name, weights=None, num_classes=num_classes)
    if source.kind == "timm":
        import timm

        check_source(source)
        return timm.create_model(source.name, pretrained=False, num_classes=num_classes)
    model = _factory(source.name)(num_classes)
    if not isinstance(model, nn.Module):
        raise ValueError(f"factory {source.name} returned {type(model).__name__}, not a torch.nn.Module")
    return model


def pretrained_model(source: ModelSource, weights: str, num_classes: int) -> nn.Module:
    """``source`` with its pretrained ``weights`` loaded (a torchvision tag, or ``pretrained`` for timm).

    ValueError for a tag the source does not have or a class count the weights do not have; RuntimeError naming
    the offline alternative when the weights cannot be fetched."""
    if source.kind == "torchvision":
        model = build_external(source, num_classes)
        enum_weights = _torchvision_weights(source.name, weights, num_classes)
        try:
            state_dict = enum_weights.get_state_dict(progress=False)
        except OSError as error:  # urllib's URLError/HTTPError and socket errors are all OSErrors
            raise _offline(f"torchvision weights {type(enum_weights).__name__}.{enum_weights.name}", error) from error
        load_state_dict_checked(model, state_dict, f"torchvision weights {weights}", source.arch)
        return model
    if source.kind == "timm":
        import timm

        _check_timm_weights(source, weights)
        _check_classes(_timm_cfg(source.name).get("num_classes"), num_classes, f"timm {source.name} pretrained")
        try:  # timm's own mechanism: the hub id or URL in the model's pretrained_cfg
            return timm.create_model(source.name, pretrained=True, num_classes=num_classes)
        except Exception as error:  # hub errors differ by version (LocalEntryNotFoundError, HTTPError, OSError)
            raise _offline(f"timm pretrained weights for {source.name}", error) from error
    raise ValueError(f"weights='{weights}' for factory {source.name}: a factory's weights come from a checkpoint "
                     "file (checkpoint=<state_dict>)")


def pretrained_metadata(source: ModelSource, weights: str) -> ModelMetadata:
    """What pretrained ``weights`` of ``source`` say about their input: torchvision's weight ``meta`` and eval
    transforms, timm's ``pretrained_cfg`` (class names for ImageNet-1k/22k subsets through ``timm.data.ImageNetInfo``).
    Nothing is downloaded."""
    if source.kind == "torchvision":
        w = _torchvision_weights(source.name, weights, None)
        transform = w.transforms()
        return ModelMetadata(f"torchvision weights {type(w).__name__}.{w.name}", tuple(w.meta["categories"]),
                             int(transform.crop_size[0]), tuple(transform.mean), tuple(transform.std))
    _check_timm_weights(source, weights)
    cfg = _timm_cfg(source.name)
    names = None
    try:
        from timm.data import ImageNetInfo, infer_imagenet_subset

        subset = infer_imagenet_subset(cfg)
        if subset:
            names = tuple(ImageNetInfo(subset).label_descriptions())
    except (ImportError, ValueError, KeyError):  # not an ImageNet subset: no class names from timm
        names = None
    side = cfg.get("input_size", (3, None, None))[-1]
    return ModelMetadata(f"timm pretrained_cfg {cfg.get('architecture', source.name)}.{cfg.get('tag', '')}".rstrip("."),
                         names, side, tuple(cfg["mean"]) if "mean" in cfg else None,
                         tuple(cfg["std"]) if "std" in cfg else None)


def _torchvision_names() -> list[str]:
    import torchvision

    return sorted(torchvision.models.list_models(module=torchvision.models))


def _torchvision_weights(name: str, tag: str, num_classes: int | None):
    import torchvision

    enum = torchvision.models.get_model_weights(name)
    valid = list(enum.__members__)  # includes the DEFAULT alias
    if tag not in valid:
        raise ValueError(f"unknown weights tag '{tag}' for torchvision:{name}; valid: {', '.join(valid)}")
    weights = enum[tag]
    if num_classes is not None:
        _check_classes(len(weights.meta["categories"]), num_classes, f"weights {enum.__name__}.{weights.name}")
    return weights


def _timm_cfg(name: str) -> dict:
    import timm

    check_source(ModelSource("timm", name))
    return timm.models.get_pretrained_cfg(name).to_dict()


def _check_timm_weights(source: ModelSource, weights: str) -> None:
    if weights != TIMM_PRETRAINED:
        raise ValueError(f"weights='{weights}' for {source.arch}: timm models take weights={TIMM_PRETRAINED} "
                         f"(a tag goes in the name, e.g. timm:resnet18.a1_in1k) or a checkpoint file")


def _check_classes(weight_classes: int | None, num_classes: int, what: str) -> None:
    if weight_classes is not None and weight_classes != num_classes:
        raise ValueError(f"{what} have {weight_classes} classes, but num_classes={num_classes}")


def _offline(what: str, error: Exception) -> RuntimeError:
    return RuntimeError(f"could not fetch {what} ({first_line(error)}); offline, pass a local state_dict instead: "
                        "teacher.checkpoint=<local state_dict>")


def _factory(path: str):
    """The callable at ``module:function`` (attributes may be dotted: ``module:Class.build``)."""
    module_name, _, attribute = path.partition(":")
    try:
        target = importlib.import_module(module_name)
    except ImportError as error:
        raise ValueError(f"cannot import the factory's module '{module_name}' ({error}); put it on "
                         "PYTHONPATH, install it, or ship it with `ray job submit --working-dir`") from None
    for part in attribute.split("."):
        if not hasattr(target, part):
            raise ValueError(f"module '{module_name}' has no '{attribute}'")
        target = getattr(target, part)
    if not callable(target):
        raise ValueError(f"'{path}' is not callable (its type: {type(target).__name__}); name a function that "
                         "returns the model")
    return target
