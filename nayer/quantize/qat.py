"""Recovery by KD: the float model distilled into its fake-quantized copy on synthetic images only (data-free QAT),
with the student's KD objective and optimizer (`nayer.kd`) and the QAT schedule of BN and observer freezes."""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.ao.nn.intrinsic.qat import freeze_bn_stats
from torch.ao.quantization import disable_observer, enable_fake_quant, enable_observer

from nayer.kd import KDObjective, make_optimizer
from nayer.losses import NonFiniteLossError
from nayer.quantize.config import QATConfig
from nayer.specs import Compute, ImageSpec


class QATTrainer:
    """Data-free QAT by KD: SGD (momentum, weight decay) with a per-step cosine from lr to eta_min over `kd_steps`;
    BN statistics and observers frozen at the configured steps (see QATConfig)."""

    def __init__(self, qmodel: nn.Module, teacher: nn.Module, cfg: QATConfig, images: ImageSpec, device: torch.device):
        self.qmodel, self.teacher, self.cfg = qmodel, teacher, cfg
        # The student's KD objective and optimizer (QATConfig is a KDConfig) with the quantized model as the student,
        # fp32 and NCHW (fake quant has no bf16 or channels_last path), the cosine stepped per step, not per epoch.
        self.objective = KDObjective(qmodel, teacher, cfg, images, Compute(device, bf16=False, channels_last=False))
        self.optimizer, self.scheduler = make_optimizer(qmodel, cfg, cfg.kd_steps)
        self.step_count = 0

    def _apply_freezes(self) -> None:
        step, cfg = self.step_count, self.cfg
        if step == 0:
            self.qmodel.apply(enable_fake_quant)
            self.qmodel.apply(enable_observer if cfg.freeze_observer_step != 0 else disable_observer)
        if cfg.freeze_bn_step >= 0 and step == cfg.freeze_bn_step:
            self.qmodel.apply(freeze_bn_stats)
        if cfg.freeze_observer_step > 0 and step == cfg.freeze_observer_step:
            self.qmodel.apply(disable_observer)

    def step(self, images: Tensor) -> float:
        """One KD step on a uint8 batch; a NaN/inf loss raises NonFiniteLossError (lower qat.lr)."""
        self.qmodel.train()
        self.teacher.eval()
        self._apply_freezes()
        loss = self.objective(images)
        if not bool(torch.isfinite(loss)):
            raise NonFiniteLossError(f"QAT KD loss is {loss.item()} at step {self.step_count}: the quantized model "
                                     "diverged; lower qat.lr")
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.scheduler.step()
        self.step_count += 1
        return loss.item()

    def finish(self) -> None:
        """After training: observers frozen, fake quant on, eval mode (the model as it would be deployed)."""
        self.qmodel.apply(disable_observer)
        self.qmodel.apply(enable_fake_quant)
        self.qmodel.eval()
