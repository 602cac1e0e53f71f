"""What a run reads before its first step, checked against each other: the image spec (class names, size,
normalization), the frozen teacher, the label-text embeddings and the optional labeled evaluation set.

Both runners call `load_inputs`; a mismatch (class counts, checkpoint shapes, labels) is a one-line ConfigError.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from nayer.cli_config import ConfigError
from nayer.config import RunConfig
from nayer.data import LabeledImages, folder_read, imagenet_wordnet_names, load_labeled, preset, read_class_names
from nayer.losses import bn_layers
from nayer.lte import encode_labels
from nayer.models import CheckpointMismatchError, classifier_layer, model_metadata
from nayer.runtime import first_line
from nayer.specs import ImageSpec


def resolve_images(cfg: RunConfig) -> tuple[ImageSpec, dict[str, str]]:
    """Class names, image size and normalization, and where each came from. Per value, the first that has it:
    the config's `data.*` key, the teacher's pretrained weights (torchvision meta, timm pretrained_cfg), the
    `data.dataset` preset."""
    p = preset(cfg.data.dataset)
    meta = model_metadata(cfg.teacher.arch, cfg.teacher.weights or None)
    from_preset = f"preset {cfg.data.dataset}"
    if cfg.data.class_names is not None:
        names, names_from = list(cfg.data.class_names), "data.class_names"
        if not names:
            raise ConfigError("data.class_names is an empty list: give one name per teacher output, or drop the key "
                              f"to use the '{cfg.data.dataset}' preset's names")
    elif cfg.data.class_names_file:
        names, names_from = read_class_names(cfg.data.class_names_file), f"data.class_names_file {cfg.data.class_names_file}"
    elif meta is not None and meta.class_names:
        names, names_from = list(meta.class_names), meta.source
    else:
        names, names_from = list(p.class_names or []), from_preset
        if not names:
            raise ConfigError(f"dataset '{cfg.data.dataset}' has no built-in class names: pass data.class_names_file=<txt>")
        if len(names) != p.num_classes:
            raise ConfigError(f"preset '{cfg.data.dataset}' lists {len(names)} names for {p.num_classes} classes")
    sources = {"class_names": f"{names_from} ({len(names)} classes)"}
    values = {}
    for key, preset_value in (("image_size", p.image_size), ("mean", p.mean), ("std", p.std)):
        given, weights_value = getattr(cfg.data, key), getattr(meta, key, None)
        if given is not None:
            values[key], sources[key] = given, f"data.{key}"
        elif weights_value is not None:
            values[key], sources[key] = weights_value, meta.source
        else:
            values[key], sources[key] = preset_value, from_preset
    if values["image_size"] < 8:
        raise ConfigError(f"data.image_size={values['image_size']} is too small; give the side (px) the teacher takes")
    return ImageSpec(tuple(names), values["image_size"], tuple(values["mean"]), tuple(values["std"])), sources


def prompt_names(cfg: RunConfig, images: ImageSpec) -> list[str]:
    """What each class's prompt names (`lte.names`): the run's class names, or the ImageNet-1k WordNet lines."""
    wordnet = cfg.lte.names == "wordnet" or (
        cfg.lte.names == "auto" and cfg.data.dataset == "imagenet" and images.num_classes == 1000)
    if not wordnet:
        return list(images.class_names)
    if images.num_classes != 1000:
        raise ConfigError(f"lte.names=wordnet names the 1000 ImageNet-1k classes, but the run has {images.num_classes}; "
                          "set lte.names=class_names")
    return list(imagenet_wordnet_names())


def check_teacher(teacher: torch.nn.Module, images: ImageSpec, cfg: RunConfig) -> dict:
    """Refuse, in one line, a teacher the run cannot use: one that does not take `images.size` px input, one with
    no BatchNorm2d under `a_bn > 0`, one without a Linear head under `synthesis.metrics`. Returns what L_BN hooks."""
    arch = cfg.teacher.arch
    try:
        with torch.no_grad():
            teacher(torch.zeros(2, 3, images.size, images.size))
    except (RuntimeError, ValueError, AssertionError) as error:
        raise ConfigError(f"teacher {arch} does not run on {images.size}x{images.size} images ({first_line(error)}); set "
                          "data.image_size to the side it takes") from None
    bn = len(bn_layers(teacher))
    other = sorted({type(m).__name__ for m in teacher.modules() if isinstance(m, OTHER_NORMS)})
    if cfg.synthesis.a_bn > 0 and bn == 0:
        norms = f"it normalizes with {', '.join(other)}" if other else "it has no normalization layer"
        raise ConfigError(f"teacher {arch} has no BatchNorm2d layer ({norms}), so L_BN has no statistics to match: "
                          f"set synthesis.a_bn=0 (as the paper's supplementary B.6 does for AlexNet)")
    if cfg.synthesis.metrics:
        try:
            classifier_layer(teacher)
        except ValueError as error:
            raise ConfigError(f"{error}: the synthesis metrics read the teacher's penultimate features at it; "
                              "set synthesis.metrics=false") from None
    return {"bn_layers_hooked": bn, "other_norm_layers": other}


# Normalization layers L_BN cannot use: they keep no running statistics of the training data.
OTHER_NORMS = (torch.nn.LayerNorm, torch.nn.GroupNorm, torch.nn.InstanceNorm2d, torch.nn.LocalResponseNorm)


@dataclass
class RunInputs:
    """The checked inputs: image spec, teacher (frozen, on CPU), embeddings [K, D], evaluation set or None, and
    `provenance`: where the teacher, its weights and each input value came from (printed; inputs.json)."""

    images: ImageSpec
    teacher: torch.nn.Module
    embeddings: torch.Tensor
    eval_set: LabeledImages | None
    provenance: dict

    def summary(self) -> str:
        """The provenance as the one line a run prints at start."""
        p = self.provenance
        hooked = f"L_BN hooks {p['bn_layers_hooked']} BatchNorm2d layers"
        if p["other_norm_layers"]:
            hooked += f" ({', '.join(p['other_norm_layers'])} not hooked: no running statistics)"
        return (f"teacher {p['teacher']} with {p['weights']}; class names from {p['class_names']}; "
                f"{self.images.size} px from {p['image_size']}; mean/std from {p['mean']}; {hooked}")


def load_inputs(cfg: RunConfig, lte_device: torch.device, eval_cache: str = "") -> RunInputs:
    """Load and cross-check the run's inputs; a mismatch (class counts, checkpoint shapes) is a ConfigError.
    `eval_cache`: where an image folder's decoded images go when `data.eval_cache` names no folder ("" = memory)."""
    try:
        images, sources = resolve_images(cfg)
    except ValueError as exc:  # a weights tag the model does not have
        raise ConfigError(f"teacher.weights: {exc}") from None
    k = images.num_classes
    t = cfg.teacher
    try:
        teacher = t.build(num_classes=k, role="teacher")
    except CheckpointMismatchError as exc:  # most often: a class-name list of the wrong length
        raise ConfigError(f"{exc}; note: the run has {k} class names, the teacher's output size must equal that") from None
    except ValueError as exc:  # weights the source does not have, a factory that returns no module
        raise ConfigError(f"teacher: {exc}") from None
    weights = (f"checkpoint {t.checkpoint}" if t.checkpoint else f"weights {t.weights}" if t.weights
               else "random weights")
    provenance = {"teacher": t.arch, "weights": weights, **sources, **check_teacher(teacher, images, cfg)}
    names = prompt_names(cfg, images)
    provenance["prompt_names"] = ("ImageNet-1k WordNet lines (lte.names)" if names != list(images.class_names)
                                  else "the class names")
    embeddings = encode_labels(names, cfg.lte, device=lte_device)
    read = folder_read(cfg.data.dataset, images.class_names, cfg.data.eval_crop_pct, cfg.data.eval_workers,
                       cfg.data.eval_cache or eval_cache)
    eval_set = load_labeled(cfg.data.eval, images.size, read).subset(cfg.data.eval_limit) if cfg.data.eval else None
    if eval_set is not None:
        images.check_labels(eval_set.y, f"evaluation set {cfg.data.eval}")
    return RunInputs(images, teacher, embeddings, eval_set, provenance)
