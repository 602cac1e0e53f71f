"""NAYER's losses (Tran et al., CVPR 2024), as the paper and its reference code define them.

Generator objective (Algorithm 1, line 8): L_G = a_bn * L_BN + a_cls * L_CE + a_adv * L_adv.
Student objective (Eq. 7): L_KD.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from nayer.runtime import RunError


class NonFiniteLossError(RunError, FloatingPointError):
    """A NaN or inf generator or KD loss under on_nonfinite=stop; the message names the round and step."""


def bn_layers(model: nn.Module) -> list[nn.BatchNorm2d]:
    """The layers L_BN hooks: every BatchNorm2d (subclasses such as timm's BatchNormAct2d included)."""
    return [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]


BN_LOSS_FORMS = ("paper", "relative", "normalized", "kl")
# a_bn / a_cls for bn_loss=relative: the paper's CIFAR 10 : 0.5 times L_paper / L_relative on the CIFAR-10 ResNet-56
# (28-31; bench/bn_term.py --ratios), so every teacher gets the balance the paper's weights give that one
RELATIVE_A_BN_PER_A_CLS = 600.0


class BNStatisticsLoss:
    """L_BN, paper Eq. 2 (the DeepInversion feature-statistics prior, with NAYER's momentum EMA).

    Forward hooks on every BatchNorm2d of the teacher take the BN's *input*: per-channel batch mean and biased
    variance (m, v). With momentum `mmt` (bn_mmt = 0.9) they are mixed with an EMA of earlier iterations:
    m' = (1 - mmt) * m + mmt * ema_m (first iteration of the run: m' = m), and

        L_BN = sum_layers ||running_mean - m'||_2 + ||running_var - v'||_2

    (plain, unweighted L2 norms). After each synthesis iteration :meth:`update_ema` folds that iteration's last
    batch statistics into the EMA: ema <- mmt * ema + (1 - mmt) * stats (the first time: ema <- stats). The EMA
    lives for the whole run (it is checkpointed). Hooks only record inside :meth:`capture`, so the teacher's KD
    forward passes pay nothing for them.

    `form` chooses the per-layer distance (`synthesis.bn_loss`):
    - ``paper``: the sum above, as NAYER and DeepInversion (Yin et al., CVPR 2020, Eq. 4, R_feature; its code
      weighs the first layer 10x) define it; CMI (Fang et al., IJCAI 2021) and SpaceshipNet (Yu et al., CVPR 2023)
      reuse it. Its size follows the scale of the teacher's activations, its width and its depth, so one a_bn
      weighs it differently on every teacher (NAYER itself moves a_bn from 10 on CIFAR to 0.1 on ImageNet).
    - ``relative``: the paper's two L2 distances, each divided by the size of what it measures, s^2 = running_var
      + eps: ||m' - mu||_2 / sqrt(sum_c s^2) + ||v' + eps - s^2||_2 / ||s^2||_2, averaged over the layers. Within
      a layer it keeps the paper's geometry (plain L2 over the channels, so a near-dead channel weighs no more than
      the paper gives it); only each layer's size is taken out. On a given teacher it is the paper's term times a
      constant: L_paper / L_relative was 28-31 on the CIFAR-10 ResNet-56 for real test images, uniform noise and
      gray images alike, 35-46 on the CIFAR-100 ResNet-20 and 630-670 on the digits ResNet-32. So one a_bn
      (RELATIVE_A_BN_PER_A_CLS x a_cls: 300 for CIFAR's a_cls 0.5) gives every teacher the balance the paper's
      a_bn gives the CIFAR-10 ResNet-56.
    - ``normalized``: the same two distances in the units the BN layer itself divides by, s^2 = running_var +
      eps: sqrt(mean_c (m' - mu)^2 / s^2) + sqrt(mean_c ((v' + eps) / s^2 - 1)^2), averaged over the layers.
    - ``kl``: the per-channel Gaussian KL(N(m', v' + eps) || N(mu, s^2)) = ((v' + eps)/s^2 + (m' - mu)^2/s^2 - 1
      - ln((v' + eps)/s^2)) / 2 in nats, averaged over channels and layers. "The Knowledge Within" (Haroush et al.,
      CVPR 2020) matches BN statistics with this KL summed; averaged, neither width nor depth weighs it.
      Near a match it is a quarter of the squared variance term plus half the squared mean term of ``normalized``.
    Both scale-free forms are unchanged when a teacher's activations (and so its BN statistics) are multiplied by a
    constant, and one a_bn holds on any teacher. Not built: normalizing each term by its own running magnitude
    (the weights then follow each term's history, not the teacher) and gradient-norm balancing (GradNorm, Chen et
    al., ICML 2018: three backward passes per generator step instead of one).
    """

    def __init__(self, model: nn.Module, momentum: float = 0.9, form: str = "paper"):
        if form not in BN_LOSS_FORMS:
            raise ValueError(f"unknown BN loss form '{form}'; choose from {', '.join(BN_LOSS_FORMS)}")
        self.momentum = momentum
        self.form = form
        self.layers = bn_layers(model)
        self.ema: list[tuple[Tensor, Tensor] | None] = [None] * len(self.layers)
        self.batch: list[tuple[Tensor, Tensor] | None] = [None] * len(self.layers)
        self._active = False
        self._handles = [layer.register_forward_hook(self._make_hook(i)) for i, layer in enumerate(self.layers)]

    def _make_hook(self, index: int):
        def hook(module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> None:
            if self._active:
                x = inputs[0].float()
                mean = x.mean(dim=(0, 2, 3))
                var = x.var(dim=(0, 2, 3), unbiased=False)
                self.batch[index] = (mean, var)
        return hook

    @contextlib.contextmanager
    def capture(self) -> Iterator["BNStatisticsLoss"]:
        self._active = True
        try:
            yield self
        finally:
            self._active = False

    def __len__(self) -> int:
        return len(self.layers)

    def loss(self) -> Tensor:
        """L_BN for the statistics recorded by the last teacher forward inside :meth:`capture`."""
        if not self.layers:
            raise RuntimeError("the teacher has no BatchNorm2d layer, so the BN loss is undefined; set synthesis.a_bn=0")
        total = 0.0
        for layer, stats, ema in zip(self.layers, self.batch, self.ema):
            if stats is None:
                raise RuntimeError("BN statistics were not recorded: run the teacher forward inside capture()")
            mean, var = stats
            if ema is not None and self.momentum > 0:
                mean = (1 - self.momentum) * mean + self.momentum * ema[0]
                var = (1 - self.momentum) * var + self.momentum * ema[1]
            total = total + self._distance(layer, mean, var)
        if self.form != "paper":
            total = total / len(self.layers)
        return total  # type: ignore[return-value]

    def _distance(self, layer: nn.BatchNorm2d, mean: Tensor, var: Tensor) -> Tensor:
        if self.form == "paper":
            return torch.norm(layer.running_mean - mean, 2) + torch.norm(layer.running_var - var, 2)
        scale = layer.running_var.float() + layer.eps  # what the BN divides by (squared)
        if self.form == "relative":
            return (torch.norm(mean - layer.running_mean, 2) / scale.sum().sqrt()
                    + torch.norm(var + layer.eps - scale, 2) / torch.norm(scale, 2))
        shift = (mean - layer.running_mean) ** 2 / scale
        ratio = (var + layer.eps) / scale
        if self.form == "normalized":
            # + 1e-12: a finite gradient where a distance is exactly 0
            return (shift.mean() + 1e-12).sqrt() + (((ratio - 1) ** 2).mean() + 1e-12).sqrt()
        return 0.5 * (ratio + shift - 1 - ratio.log()).mean()

    @torch.no_grad()
    def update_ema(self) -> None:
        """Fold the last recorded batch statistics into the run-long EMA (once per synthesis iteration)."""
        if self.momentum <= 0:
            return
        for i, stats in enumerate(self.batch):
            if stats is None:
                continue
            mean, var = stats[0].detach(), stats[1].detach()
            if self.ema[i] is None:
                self.ema[i] = (mean.clone(), var.clone())
            else:
                em, ev = self.ema[i]  # type: ignore[misc]
                self.ema[i] = (self.momentum * em + (1 - self.momentum) * mean,
                               self.momentum * ev + (1 - self.momentum) * var)

    def state_dict(self) -> dict:
        return {"ema": [None if e is None else (e[0].cpu(), e[1].cpu()) for e in self.ema]}

    def load_state_dict(self, state: dict) -> None:
        ema = state["ema"]
        if len(ema) != len(self.layers):
            raise ValueError(f"BN-statistics state has {len(ema)} layers but the teacher has {len(self.layers)}")
        device = self.layers[0].running_mean.device if self.layers else "cpu"
        self.ema = [None if e is None else (e[0].to(device), e[1].to(device)) for e in ema]

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


def class_loss(teacher_logits: Tensor, targets: Tensor) -> Tensor:
    """L_CE: cross-entropy of the teacher's logits on the generator's target labels (the class prior)."""
    return F.cross_entropy(teacher_logits.float(), targets)


def kl_div(student_logits: Tensor, teacher_logits: Tensor, temperature: float = 1.0) -> Tensor:
    """Per-sample KL(softmax(t/T) || softmax(s/T)) * T^2, summed over classes: shape [B]."""
    log_q = F.log_softmax(student_logits.float() / temperature, dim=1)
    # Log-probabilities on both sides: a confident teacher's softmax underflows to 0 for logit gaps > ~100, and
    # kl_div on a 0 probability gives NaN gradients (for every sample, masked ones too).
    log_p = F.log_softmax(teacher_logits.float() / temperature, dim=1)
    return F.kl_div(log_q, log_p, reduction="none", log_target=True).sum(1) * temperature ** 2


def adversarial_loss(student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
    """L_adv of the generator objective (NAYER Algorithm 1 line 8, the masked form of Fast-DFKD / CMI).

    L_adv = -mean_b( mask_b * KL(softmax(t_b) || softmax(s_b)) ), mask_b = [argmax s_b == argmax t_b], T = 1:
    the generator seeks images where student and teacher still agree on the class but differ in distribution;
    samples where they already disagree contribute zero (they are not pushed to be harder).
    """
    mask = (student_logits.argmax(1) == teacher_logits.argmax(1)).float()
    return -(kl_div(student_logits, teacher_logits) * mask).mean()


def kd_loss(student_logits: Tensor, teacher_logits: Tensor, temperature: float = 20.0) -> Tensor:
    """L_KD, paper Eq. 7 (Hinton et al. 2015): KL(softmax(t/T) || softmax(s/T)) * T^2, batch mean."""
    return kl_div(student_logits, teacher_logits.detach(), temperature).mean()
