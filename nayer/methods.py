"""`method=` -> the synthesizer that makes a run's images (both runners call this; the KD loop is shared)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from nayer.baselines import DeepInversionSynthesizer, FastMetaSynthesizer
from nayer.config import RunConfig
from nayer.synthesis import NayerSynthesizer, Synthesizer


def build_synthesizer(cfg: RunConfig, teacher: nn.Module, student: nn.Module, embeddings: Tensor, image_size: int,
                      mean: list[float], std: list[float], device: torch.device, seed: int) -> Synthesizer:
    """NAYER (label-text embeddings, noisy layers) or a baseline; FM and DeepInversion ignore `embeddings`."""
    common = dict(device=device, bf16=cfg.bf16, channels_last=cfg.channels_last, seed=seed,
                  on_nonfinite=cfg.on_nonfinite)
    k = embeddings.shape[0]
    if cfg.method == "fm":
        return FastMetaSynthesizer(teacher, student, k, image_size, mean, std, cfg.generator, cfg.synthesis, cfg.fm,
                                   **common)
    if cfg.method == "deepinv":
        return DeepInversionSynthesizer(teacher, student, k, image_size, mean, std, cfg.synthesis, cfg.deepinv,
                                        **common)
    return NayerSynthesizer(teacher, student, embeddings, image_size, mean, std, cfg.generator, cfg.synthesis,
                            **common)
