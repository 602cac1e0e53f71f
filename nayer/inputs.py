"""What a run reads before its first step, checked against each other: the image spec (class names, size,
normalization), the frozen teacher, the label-text embeddings and the optional labeled evaluation set.

Both runners call `load_inputs`; a mismatch (class counts, checkpoint shapes, labels) is a one-line ConfigError.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from nayer.cli_config import ConfigError
from nayer.config import RunConfig
from nayer.data import LabeledImages, load_labeled, preset, read_class_names
from nayer.lte import encode_labels
from nayer.models import CheckpointMismatchError, load_teacher
from nayer.specs import ImageSpec


def resolve_images(cfg: RunConfig) -> ImageSpec:
    """Class names, image size and normalization from the dataset preset and the config's overrides."""
    p = preset(cfg.data.dataset)
    if cfg.data.class_names is not None:
        names = list(cfg.data.class_names)
        if not names:
            raise ConfigError("data.class_names is an empty list: give one name per teacher output, or drop the key "
                              f"to use the '{cfg.data.dataset}' preset's names")
    elif cfg.data.class_names_file:
        names = read_class_names(cfg.data.class_names_file)
    else:
        names = list(p.class_names or [])
    if not names:
        raise ConfigError(f"dataset '{cfg.data.dataset}' has no built-in class names: pass data.class_names_file=<txt>")
    if len(names) != p.num_classes and cfg.data.class_names is None and not cfg.data.class_names_file:
        raise ConfigError(f"preset '{cfg.data.dataset}' lists {len(names)} names for {p.num_classes} classes")
    mean = cfg.data.mean if cfg.data.mean is not None else p.mean
    std = cfg.data.std if cfg.data.std is not None else p.std
    return ImageSpec(tuple(names), p.image_size, tuple(mean), tuple(std))


@dataclass
class RunInputs:
    """The checked inputs: image spec, teacher (frozen, on CPU), embeddings [K, D], evaluation set or None."""

    images: ImageSpec
    teacher: torch.nn.Module
    embeddings: torch.Tensor
    eval_set: LabeledImages | None


def load_inputs(cfg: RunConfig, lte_device: torch.device) -> RunInputs:
    """Load and cross-check the run's inputs; a mismatch (class counts, checkpoint shapes) is a ConfigError."""
    images = resolve_images(cfg)
    k = images.num_classes
    try:
        teacher = load_teacher(cfg.teacher.arch, k, cfg.teacher.checkpoint or None, cfg.teacher.weights or None)
    except CheckpointMismatchError as exc:  # most often: a class-name list of the wrong length
        raise ConfigError(f"{exc}; note: the run has {k} class names, the teacher's output size must equal that") from None
    embeddings = encode_labels(list(images.class_names), cfg.lte.encoder, cfg.lte.template, cfg.lte.model,
                               cfg.lte.pretrained, cfg.lte.path or None, cfg.lte.cache_dir or None, lte_device)
    eval_set = load_labeled(cfg.data.eval, images.size).subset(cfg.data.eval_limit) if cfg.data.eval else None
    if eval_set is not None:
        images.check_labels(eval_set.y, f"evaluation set {cfg.data.eval}")
    return RunInputs(images, teacher, embeddings, eval_set)
