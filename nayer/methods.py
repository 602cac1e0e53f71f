"""`method=` -> the synthesizer that makes a run's images (both runners call this; the KD loop is shared)."""

from __future__ import annotations

from torch import Tensor, nn

from nayer.baselines import DeepInversionSynthesizer, FastMetaSynthesizer
from nayer.config import RunConfig
from nayer.specs import Compute, ImageSpec
from nayer.synthesis import NayerSynthesizer, Synthesizer


def build_synthesizer(cfg: RunConfig, teacher: nn.Module, student: nn.Module, embeddings: Tensor, images: ImageSpec,
                      compute: Compute, seed: int) -> Synthesizer:
    """NAYER (label-text embeddings, noisy layers) or a baseline; FM and DeepInversion ignore `embeddings`."""
    policy = dict(seed=seed, on_nonfinite=cfg.on_nonfinite)
    if cfg.method == "fm":
        return FastMetaSynthesizer(teacher, student, images, cfg.generator, cfg.synthesis, cfg.fm, compute, **policy)
    if cfg.method == "deepinv":
        return DeepInversionSynthesizer(teacher, student, images, cfg.synthesis, cfg.deepinv, compute, **policy)
    return NayerSynthesizer(teacher, student, embeddings, images, cfg.generator, cfg.synthesis, compute, **policy,
                            run_seed=cfg.seed)
