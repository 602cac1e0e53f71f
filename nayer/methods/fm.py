"""FM (Fang et al., AAAI 2022, "Up to 100x Faster Data-free Knowledge Distillation"), a baseline in the same engine and
KD loop (`method=fm`): a meta generator G(z). Each batch clones G, optimizes the clone and its input z ~ N(0, I)
(Adam, `fm.lr_g` / `fm.lr_z`) for g steps of NAYER's generator objective on uniform random targets, sums the clone's
gradients into the meta generator's (first-order MAML) and takes one meta Adam step at lr_g * g. One batch per
epoch in the reference. It keeps the batch of the step with the lowest loss (best-of-steps) and shares the
BN-statistics loss, its EMA, the non-finite policy and the metrics with NAYER (`nayer.methods.base`).
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from nayer.generator import make_body
from nayer.methods.base import SynthesisParts, Synthesizer
from nayer.methods.registry import register

if TYPE_CHECKING:
    from nayer.config import FMConfig, GeneratorConfig, RunConfig, SynthesisConfig


@register("fm")
class FastMetaSynthesizer(Synthesizer):
    """FM: a meta generator from z, adapted per batch by first-order MAML (see the module docstring)."""

    def __init__(self, parts: SynthesisParts, gen_cfg: "GeneratorConfig", syn_cfg: "SynthesisConfig",
                 fm_cfg: "FMConfig", on_nonfinite: str = "stop"):
        super().__init__(parts, syn_cfg, on_nonfinite)
        self.fm = fm_cfg
        self.generator = parts.compute.place(make_body(gen_cfg, nz=fm_cfg.nz, images=parts.images))
        self.meta_optimizer = torch.optim.Adam(self.generator.parameters(), lr=fm_cfg.lr_g * syn_cfg.g_steps,
                                               betas=(0.5, 0.999))

    @classmethod
    def from_config(cls, cfg: "RunConfig", parts: SynthesisParts) -> "FastMetaSynthesizer":
        return cls(parts, cfg.generator, cfg.synthesis, cfg.fm, cfg.on_nonfinite)

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
