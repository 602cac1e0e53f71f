"""NAYER synthesis: one epoch of Algorithm 1, lines 3-11 (Tran et al., CVPR 2024).

For each of I iterations (`g_loops`; `warmup_loops` during warm-up):
  1. re-initialize the noisy layers and create a fresh Adam over all of G (lr 4e-3, betas (0.5, 0.999));
  2. g times (`g_steps`): x = G(y); x_a = augment(x); t = T(x_a);
       L = a_bn * L_BN + a_cls * CE(t, y) [+ a_adv * L_adv(S(x_a), t) after warm-up]; keep the x with the lowest L
       seen in this iteration (best-of-steps, reset every iteration); Adam step on G only;
  3. fold the iteration's BN statistics into the run-long EMA; emit the kept batch as uint8.
G is replaced by a fresh generator every `g_life` epochs. Teacher and student never receive gradients here. The
epoch loop, L_BN and its EMA, the objective and the metrics are the shared `Synthesizer`'s (`nayer.methods.base`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from nayer.generator import NayerGenerator, balanced_targets, class_slice_targets
from nayer.methods.base import SynthesisParts, Synthesizer
from nayer.methods.registry import register

if TYPE_CHECKING:
    from nayer.config import GeneratorConfig, RunConfig, SynthesisConfig


@register("nayer")
class NayerSynthesizer(Synthesizer):
    """Holds G, its noisy layers and the BN-statistics EMA across epochs; `synthesize()` runs one epoch."""

    def __init__(self, parts: SynthesisParts, gen_cfg: "GeneratorConfig", syn_cfg: "SynthesisConfig",
                 on_nonfinite: str = "stop", run_seed: int = 0):
        if parts.embeddings.shape[0] != parts.images.num_classes:
            raise ValueError(f"{parts.embeddings.shape[0]} label embeddings for {parts.images.num_classes} classes")
        super().__init__(parts, syn_cfg, on_nonfinite)
        self.embeddings = parts.embeddings
        self.gen_cfg = gen_cfg
        self.run_seed = run_seed  # the class shuffle of synthesis.targets=slices: shared by every worker of a run
        self.generator = self._new_generator()
        self.generator_forward = self._compiled(self.generator)

    @classmethod
    def from_config(cls, cfg: "RunConfig", parts: SynthesisParts) -> "NayerSynthesizer":
        return cls(parts, cfg.generator, cfg.synthesis, cfg.on_nonfinite, run_seed=cfg.seed)

    def _new_generator(self) -> NayerGenerator:
        return self.compute.place(NayerGenerator(self.gen_cfg, embeddings=self.embeddings,
                                                 batch_size=self.cfg.batch_size, images=self.images))

    def _start_epoch(self) -> None:
        if self.epoch > 0 and self.epoch % self.gen_cfg.g_life == 0:
            self.generator = self._new_generator()
            self.generator_forward = self._compiled(self.generator)

    def _compiled(self, generator: NayerGenerator) -> nn.Module:
        """G's forward, compiled under compile=true (a fresh G reuses the compiled code: same shapes)."""
        return torch.compile(generator) if self.compute.compile else generator

    def _iteration(self, use_adv: bool, bar: Any, iteration: int
                   ) -> tuple[Tensor | None, Tensor, dict, list[tuple[float, float]]]:
        gen = self.generator
        gen.train()
        gen.reinit_noisy()
        g = self.gen_cfg
        optimizer = torch.optim.Adam(gen.parameters(), lr=g.lr, betas=(g.beta1, g.beta2))
        b, k = self.cfg.batch_size, self.num_classes
        targets = (class_slice_targets(b, k, self.run_seed, self.epoch, iteration) if self.cfg.targets == "slices"
                   else balanced_targets(b, k, self.rng)).to(self.device)
        best_loss, best_x, best_parts = float("inf"), None, {}
        curve = []
        for step in range(self.cfg.g_steps):
            with self.compute.autocast():
                x = self.generator_forward(targets).float()  # the kept batch and the augmentation stay in fp32
            loss, parts = self._objective(x, targets, use_adv)
            curve.append((parts["loss"], parts["ce"]))
            optimizer.zero_grad(set_to_none=True)
            if self._finite(parts, iteration, step, "lower generator.lr or synthesis.a_bn"):
                if parts["loss"] < best_loss:  # best-of-steps: the batch x that produced the lowest L
                    best_loss, best_x, best_parts = parts["loss"], x.detach(), parts
                loss.backward()
                optimizer.step()
            bar.update()
        self.bn_loss.update_ema()
        return best_x, targets, best_parts, curve

    def state_dict(self) -> dict:
        return {**super().state_dict(), "generator": self.generator.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.generator.load_state_dict(state["generator"])
