"""DeepInversion (Yin et al., CVPR 2020, "Dreaming to Distill"), a baseline in the same engine and KD loop
(`method=deepinv`): the pixels themselves are optimized (Adam, `deepinv.lr`, in the teacher's normalized space,
clipped to valid images after every step) for g steps of a_bn * L_BN + a_cls * CE + a_adv * (-JS(student, teacher;
T = 3)) + tv * TV + l2 * ||x||, on a randomly rolled and flipped view (`deepinv.jitter`). It keeps the batch of the
step with the lowest loss (best-of-steps) and shares the BN-statistics loss, its EMA, the non-finite policy and the
metrics with NAYER (`nayer.methods.base`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor

from nayer.augment import jitter_flip
from nayer.losses import class_loss
from nayer.methods.base import SynthesisParts, Synthesizer
from nayer.methods.registry import register

if TYPE_CHECKING:
    from nayer.config import DeepInvConfig, RunConfig, SynthesisConfig


def js_divergence(student_logits: Tensor, teacher_logits: Tensor, temperature: float = 3.0) -> Tensor:
    """The Jensen-Shannon term of Adaptive DeepInversion (Yin et al., CVPR 2020, Eq. 8) between P = softmax(s/T)
    and Q = softmax(t/T), as the reference implementation computes it: 0.5 KL(M || P) + 0.5 KL(M || Q) with
    M = (P + Q) / 2, all three clamped to [0.01, 0.99], batch mean."""
    p = F.softmax(student_logits.float() / temperature, dim=1)
    q = F.softmax(teacher_logits.float() / temperature, dim=1)
    m = (0.5 * (p + q)).clamp(0.01, 0.99)
    p, q = p.clamp(0.01, 0.99), q.clamp(0.01, 0.99)
    return 0.5 * F.kl_div(p.log(), m, reduction="batchmean") + 0.5 * F.kl_div(q.log(), m, reduction="batchmean")


def total_variation(x: Tensor) -> Tensor:
    """DeepInversion's image prior R_TV (Yin et al. CVPR 2020 Eq. 9): the sum of L2 norms of the horizontal,
    vertical and both diagonal neighbour differences."""
    return (torch.norm(x[:, :, :, :-1] - x[:, :, :, 1:]) + torch.norm(x[:, :, :-1, :] - x[:, :, 1:, :])
            + torch.norm(x[:, :, 1:, :-1] - x[:, :, :-1, 1:]) + torch.norm(x[:, :, :-1, :-1] - x[:, :, 1:, 1:]))


@register("deepinv")
class DeepInversionSynthesizer(Synthesizer):
    """DeepInversion: g Adam steps on the pixels of each batch (see the module docstring)."""

    def __init__(self, parts: SynthesisParts, syn_cfg: "SynthesisConfig", di_cfg: "DeepInvConfig",
                 on_nonfinite: str = "stop"):
        super().__init__(parts, syn_cfg, on_nonfinite)
        self.di = di_cfg
        self._mean = torch.tensor(parts.images.mean, device=self.device).view(1, -1, 1, 1)
        self._std = torch.tensor(parts.images.std, device=self.device).view(1, -1, 1, 1)

    @classmethod
    def from_config(cls, cfg: "RunConfig", parts: SynthesisParts) -> "DeepInversionSynthesizer":
        return cls(parts, cfg.synthesis, cfg.deepinv, cfg.on_nonfinite)

    def _iteration(self, use_adv: bool, bar: Any, iteration: int
                   ) -> tuple[Tensor | None, Tensor, dict, list[tuple[float, float]]]:
        cfg, di = self.cfg, self.di
        targets = torch.randint(0, self.num_classes, (cfg.batch_size,), generator=self.rng).to(self.device)
        size = self.images.size
        low, high = (0 - self._mean) / self._std, (1 - self._mean) / self._std
        # Gaussian noise in the normalized space, clipped to valid images from the start (the reference clips after
        # every step; clipping the start too means any kept batch, even the first step's, is an image).
        x = torch.randn(cfg.batch_size, 3, size, size, device=self.device)
        x = torch.maximum(torch.minimum(x, high), low).requires_grad_(True)
        optimizer = torch.optim.Adam([x], lr=di.lr, betas=(0.5, 0.99))
        zero = torch.zeros((), device=self.device)
        best_loss, best_x, best_parts = float("inf"), None, {}
        curve = []
        for step in range(cfg.g_steps):
            with self.compute.autocast(), self.bn_loss.capture():
                xa = self.compute.layout(jitter_flip(x, di.jitter))
                t_logits = self.teacher_forward(xa)
                s_logits = self.student_forward(xa) if use_adv else None
            loss_bn = self.bn_loss.loss() if cfg.a_bn != 0 else zero
            loss_ce = class_loss(t_logits, targets)
            loss_adv = -js_divergence(s_logits, t_logits, di.js_temperature) if s_logits is not None else zero
            loss = (cfg.a_bn * loss_bn + cfg.a_cls * loss_ce + cfg.a_adv * loss_adv + di.tv * total_variation(x)
                    + di.l2 * torch.norm(x))
            parts = self._parts(loss, loss_bn, loss_ce, loss_adv)
            curve.append((parts["loss"], parts["ce"]))
            optimizer.zero_grad(set_to_none=True)
            if self._finite(parts, iteration, step, "lower deepinv.lr or synthesis.a_bn"):
                if parts["loss"] < best_loss:
                    best_loss, best_x, best_parts = parts["loss"], x.detach().clone(), parts
                loss.backward()
                optimizer.step()
                with torch.no_grad():  # keep every pixel a valid image value
                    x.copy_(torch.maximum(torch.minimum(x, high), low))
            bar.update()
        self.bn_loss.update_ema()
        images = None if best_x is None else best_x * self._std + self._mean  # in [0, 1]: clipped every step
        return images, targets, best_parts, curve
