"""The student's side of Algorithm 1 (lines 12-15): S steps of KD on batches from the memory buffer.

Each step: uint8 batch -> float -> crop (padded, or RandomResizedCrop: `kd.crop`) + flip + normalize ->
teacher (no grad) and student -> L_KD (Eq. 7, T = 20) -> SGD (momentum 0.9, wd 1e-4). The learning rate follows
a cosine over the E student epochs to eta_min.
"""

from __future__ import annotations

import time
from typing import Iterable

import torch
from torch import Tensor, nn

from nayer.augment import Augment, uint8_to_float
from nayer.config import KDConfig
from nayer.losses import NonFiniteLossError, kd_loss
from nayer.specs import Compute, ImageSpec


def finite_or_skip(loss: Tensor, policy: str, where: str) -> bool:
    """True if the KD loss is finite. Otherwise on_nonfinite=stop raises NonFiniteLossError naming `where` (round,
    step, rank); skip returns False: the caller leaves the step out."""
    if bool(torch.isfinite(loss)):
        return True
    if policy == "stop":
        raise NonFiniteLossError(f"KD loss is {loss.item()} at {where}: the student diverged; lower kd.lr, or set "
                                 "on_nonfinite=skip")
    return False


class KDObjective:
    """L_KD of a uint8 batch: augment once, teacher (no grad) and student on the same view. Shared by the
    single-process trainer below, the DeepSpeed ranks of the orchestrator (which own their optimizer step) and
    nayer.quantize's recovery (its QATConfig is a KDConfig)."""

    def __init__(self, student: nn.Module, teacher: nn.Module, cfg: KDConfig, images: ImageSpec, compute: Compute):
        self.student, self.teacher, self.cfg, self.compute = student, teacher, cfg, compute
        self.augment = Augment(images.mean, images.std, cfg.crop_padding, cfg.flip, crop=cfg.crop).to(compute.device)

    def __call__(self, images: Tensor) -> Tensor:
        x = self.compute.layout(self.augment(uint8_to_float(images.to(self.compute.device, non_blocking=True))))
        with self.compute.autocast():
            with torch.no_grad():
                t_logits = self.teacher(x)
            s_logits = self.student(x)
        return kd_loss(s_logits, t_logits, self.cfg.temperature)


def make_optimizer(student: nn.Module, cfg: KDConfig, epochs: int) -> tuple[torch.optim.SGD, torch.optim.lr_scheduler.LRScheduler]:
    """SGD (momentum, weight decay) with a cosine over the E student epochs to eta_min, stepped once per epoch."""
    optimizer = torch.optim.SGD(student.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    return optimizer, torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, max(epochs, 1), eta_min=cfg.eta_min)


class StudentTrainer:
    """Owns the student's optimizer and schedule; `train_epoch` runs one epoch of KD steps."""

    def __init__(self, student: nn.Module, teacher: nn.Module, cfg: KDConfig, epochs: int, images: ImageSpec,
                 compute: Compute, on_nonfinite: str = "stop"):
        self.objective = KDObjective(student, teacher, cfg, images, compute)
        self.optimizer, self.scheduler = make_optimizer(student, cfg, epochs)
        self.on_nonfinite = on_nonfinite

    def step(self, images: Tensor, where: str = "a KD step") -> float | None:
        """One KD step on a uint8 batch; returns the loss, or None for a non-finite one left out (on_nonfinite)."""
        loss = self.objective(images)
        self.optimizer.zero_grad(set_to_none=True)
        if not finite_or_skip(loss, self.on_nonfinite, where):
            return None
        loss.backward()
        self.optimizer.step()
        return loss.item()

    def train_epoch(self, batches: Iterable[tuple[Tensor, Tensor]], epoch: int = 0) -> dict:
        """KD over `batches`, then one scheduler step (the cosine is per epoch, as in the reference)."""
        start = time.perf_counter()
        self.objective.student.train()
        self.objective.teacher.eval()
        steps = [self.step(images, f"round {epoch}, KD step {i}") for i, (images, _) in enumerate(batches)]
        losses = [loss for loss in steps if loss is not None]
        if len(losses) < len(steps):
            print(f"round {epoch}: {len(steps) - len(losses)} KD step(s) with a non-finite loss skipped "
                  "(on_nonfinite=skip)", flush=True)
        lr = self.optimizer.param_groups[0]["lr"]
        self.scheduler.step()
        return {"kd_loss": sum(losses) / max(len(losses), 1), "kd_steps": len(losses),
                "kd_nonfinite_steps": len(steps) - len(losses), "lr": lr, "kd_time": time.perf_counter() - start}

    def state_dict(self) -> dict:
        return {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
