"""The student's side of Algorithm 1 (lines 12-15): S steps of KD on batches from the memory buffer.

Each step: uint8 batch -> float -> crop + flip + normalize -> teacher (no grad) and student -> L_KD (Eq. 7,
T = 20) -> SGD (momentum 0.9, wd 1e-4). The learning rate follows a cosine over the E student epochs to eta_min.
"""

from __future__ import annotations

import time
from typing import Iterable

import torch
from torch import Tensor, nn

from nayer.augment import Augment, uint8_to_float
from nayer.config import KDConfig
from nayer.evaluate import autocast
from nayer.losses import kd_loss


class KDObjective:
    """L_KD of a uint8 batch: augment once, teacher (no grad) and student on the same view. Shared by the
    single-process trainer below and the DeepSpeed ranks of the orchestrator (which own their optimizer step)."""

    def __init__(self, student: nn.Module, teacher: nn.Module, cfg: KDConfig, mean: list[float], std: list[float],
                 device: torch.device, bf16: bool = False, channels_last: bool = True):
        self.student, self.teacher, self.cfg = student, teacher, cfg
        self.device, self.bf16, self.channels_last = device, bf16, channels_last
        self.augment = Augment(mean, std, cfg.crop_padding, cfg.flip).to(device)

    def __call__(self, images: Tensor) -> Tensor:
        x = self.augment(uint8_to_float(images.to(self.device, non_blocking=True)))
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast(self.device, self.bf16):
            with torch.no_grad():
                t_logits = self.teacher(x)
            s_logits = self.student(x)
        loss = kd_loss(s_logits, t_logits, self.cfg.temperature)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"KD loss is {loss.item()}: the student diverged (try a lower kd.lr)")
        return loss


def make_optimizer(student: nn.Module, cfg: KDConfig, epochs: int) -> tuple[torch.optim.SGD, torch.optim.lr_scheduler.LRScheduler]:
    """SGD (momentum, weight decay) with a cosine over the E student epochs to eta_min, stepped once per epoch."""
    optimizer = torch.optim.SGD(student.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    return optimizer, torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, max(epochs, 1), eta_min=cfg.eta_min)


class StudentTrainer:
    """Owns the student's optimizer and schedule; `train_epoch` runs one epoch of KD steps."""

    def __init__(self, student: nn.Module, teacher: nn.Module, cfg: KDConfig, epochs: int,
                 mean: list[float], std: list[float], device: torch.device, bf16: bool = False,
                 channels_last: bool = True):
        self.objective = KDObjective(student, teacher, cfg, mean, std, device, bf16, channels_last)
        self.optimizer, self.scheduler = make_optimizer(student, cfg, epochs)

    def step(self, images: Tensor) -> float:
        """One KD step on a uint8 batch; returns the loss."""
        loss = self.objective(images)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return loss.item()

    def train_epoch(self, batches: Iterable[tuple[Tensor, Tensor]]) -> dict:
        """KD over `batches`, then one scheduler step (the cosine is per epoch, as in the reference)."""
        start = time.perf_counter()
        self.objective.student.train()
        self.objective.teacher.eval()
        losses = [self.step(images) for images, _ in batches]
        lr = self.optimizer.param_groups[0]["lr"]
        self.scheduler.step()
        return {"kd_loss": sum(losses) / max(len(losses), 1), "kd_steps": len(losses), "lr": lr,
                "kd_time": time.perf_counter() - start}

    def state_dict(self) -> dict:
        return {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
