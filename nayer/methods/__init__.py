"""Synthesis methods as plug-ins: `method=<name>` -> the synthesizer that makes a run's images. Both runners call
`build_synthesizer`; the KD loop, the buffer and the pipeline are the same for every method, and the orchestrator
never names one. One module per method, each registering its `Synthesizer` subclass (nayer/methods/README.md:
how to add one):

    nayer     NAYER (Tran et al., CVPR 2024): LTE -> noisy layers -> G, re-initialized every iteration
    fm        FM (Fang et al., AAAI 2022): a meta generator adapted per batch (first-order MAML)
    deepinv   DeepInversion (Yin et al., CVPR 2020): the pixels optimized directly
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import Tensor, nn

from nayer.methods import nayer, fm, deepinv  # noqa: F401, I001 - each registers its method, in this order
from nayer.methods.base import SynthesisParts, SynthesisResult, Synthesizer
from nayer.methods.registry import METHODS, register
from nayer.specs import Compute, ImageSpec

if TYPE_CHECKING:
    from nayer.config import RunConfig

__all__ = ["METHODS", "SynthesisParts", "SynthesisResult", "Synthesizer", "build_synthesizer", "method_names",
           "register"]


def method_names() -> tuple[str, ...]:
    """The values `method=` takes."""
    return tuple(METHODS)


def build_synthesizer(cfg: "RunConfig", teacher: nn.Module, student: nn.Module, embeddings: Tensor,
                      images: ImageSpec, compute: Compute, seed: int) -> Synthesizer:
    """The synthesizer of `cfg.method`, built from its config sections."""
    return METHODS[cfg.method].from_config(cfg, SynthesisParts(teacher, student, embeddings, images, compute, seed))
