"""The baselines NAYER is compared with, in the same engine and KD loop (`method=fm|deepinv`), so that a comparison
differs only in how the images are made:

- FM (Fang et al., AAAI 2022, "Up to 100x Faster Data-free Knowledge Distillation"): a meta generator G(z).
  Each batch clones G, optimizes the clone and its input z ~ N(0, I) (Adam, `fm.lr_g` / `fm.lr_z`) for g steps
  of NAYER's generator objective on uniform random targets, sums the clone's gradients into the meta
  generator's (first-order MAML) and takes one meta Adam step at lr_g * g. One batch per epoch in the reference.
- DeepInversion (Yin et al., CVPR 2020, "Dreaming to Distill"): the pixels themselves are optimized (Adam,
  `deepinv.lr`, in the teacher's normalized space, clipped to valid images after every step) for g steps of
  a_bn * L_BN + a_cls * CE + a_adv * (-JS(student, teacher; T = 3)) + tv * TV + l2 * ||x||, on a randomly
  rolled and flipped view (`deepinv.jitter`).
Both keep the batch of the step with the lowest loss (best-of-steps) and share the BN-statistics loss, its EMA,
the non-finite policy and the metrics with NAYER (`nayer.synthesis.Synthesizer`).
"""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from nayer.augment import jitter_flip
from nayer.config import DeepInvConfig, FMConfig, GeneratorConfig, SynthesisConfig
from nayer.generator import make_body
from nayer.losses import class_loss
from nayer.specs import Compute, ImageSpec
from nayer.synthesis import Synthesizer


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


class FastMetaSynthesizer(Synthesizer):
    """FM: a meta generator from z, adapted per batch by first-order MAML (see the module docstring)."""

    def __init__(self, teacher: nn.Module, student: nn.Module, images: ImageSpec, gen_cfg: GeneratorConfig,
                 syn_cfg: SynthesisConfig, fm_cfg: FMConfig, compute: Compute, seed: int = 0,
                 on_nonfinite: str = "stop"):
        super().__init__(teacher, student, images, syn_cfg, compute, seed, on_nonfinite)
        self.fm = fm_cfg
        self.generator = compute.place(make_body(gen_cfg.body, fm_cfg.nz, gen_cfg.ngf, images.size,
                                                 gen_cfg.paper_variant, images.mean, images.std))
        self.meta_optimizer = torch.optim.Adam(self.generator.parameters(), lr=fm_cfg.lr_g * syn_cfg.g_steps,
                                               betas=(0.5, 0.999))

    def _iteration(self, use_adv: bool, bar: Any, iteration: int
                   ) -> tuple[Tensor | None, Tensor, dict, list[tuple[float, float]]]:
        cfg = self.cfg
        targets = torch.randint(0, self.num_classes, (cfg.batch_size,), generator=self.rng).to(self.device)
        z = torch.randn(cfg.batch_size, self.fm.nz, device=self.device, requires_grad=True)
        fast = copy.deepcopy(self.generator).train()
        optimizer = torch.optim.Adam([{"params": fast.parameters()}, {"params": [z], "lr": self.fm.lr_z}],
                                     lr=self.fm.lr_g, betas=(0.5, 0.999))
        self.meta_optimizer.zero_grad(set_to_none=False)
        for p in self.generator.parameters():  # accumulated below: start from zeros
            p.grad = torch.zeros_like(p) if p.grad is None else p.grad.zero_()
        best_loss, best_x, best_parts = float("inf"), None, {}
        curve = []
        for step in range(cfg.g_steps):
            with self.compute.autocast():
                x = fast(z).float()
            loss, parts = self._objective(x, targets, use_adv)
            curve.append((parts["loss"], parts["ce"]))
            optimizer.zero_grad(set_to_none=True)
            if self._finite(parts, iteration, step, "lower fm.lr_g or synthesis.a_bn"):
                if parts["loss"] < best_loss:
                    best_loss, best_x, best_parts = parts["loss"], x.detach(), parts
                loss.backward()
                for meta_p, fast_p in zip(self.generator.parameters(), fast.parameters()):  # first-order MAML
                    if fast_p.grad is not None:
                        meta_p.grad.add_(fast_p.grad)
                optimizer.step()
            bar.update()
        if best_x is not None:
            self.meta_optimizer.step()
        self.bn_loss.update_ema()
        return best_x, targets, best_parts, curve

    def state_dict(self) -> dict:
        return {**super().state_dict(), "generator": self.generator.state_dict(),
                "meta_optimizer": self.meta_optimizer.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.generator.load_state_dict(state["generator"])
        self.meta_optimizer.load_state_dict(state["meta_optimizer"])


class DeepInversionSynthesizer(Synthesizer):
    """DeepInversion: g Adam steps on the pixels of each batch (see the module docstring)."""

    def __init__(self, teacher: nn.Module, student: nn.Module, images: ImageSpec, syn_cfg: SynthesisConfig,
                 di_cfg: DeepInvConfig, compute: Compute, seed: int = 0, on_nonfinite: str = "stop"):
        super().__init__(teacher, student, images, syn_cfg, compute, seed, on_nonfinite)
        self.di = di_cfg
        self._mean = torch.tensor(images.mean, device=self.device).view(1, -1, 1, 1)
        self._std = torch.tensor(images.std, device=self.device).view(1, -1, 1, 1)

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
