"""The student under DeepSpeed's bf16 engine (`"bf16": {"enabled": true}`): bf16 weights, BatchNorm statistics in fp32.

DeepSpeed casts every parameter to bf16 and keeps fp32 master copies in the optimizer; buffers it leaves as they
are. A BatchNorm's running mean and variance are not parameters: cast to bf16 they have an 8-bit mantissa, so an
EMA update smaller than 1/256 of the statistic (momentum 0.1 x a batch statistic within 4% of the running one) is
rounded away and the statistics the student is evaluated with stop following its activations. So here they stay
fp32, as under autocast (where BatchNorm layers keep fp32 parameters and statistics and take bf16 inputs): each
plain BatchNorm1d/2d/3d computes with its bf16 weight and bias upcast (PyTorch's mixed batch_norm: bf16 input,
fp32 affine and statistics, bf16 output), and its statistics update in fp32. Subclasses with their own forward
(timm's BatchNormAct2d, SyncBatchNorm) are cast to bf16 whole, statistics included, and counted in the note.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class _Fp32Stats:
    """nn.BatchNorm's forward (momentum, cumulative average, eval) with the affine upcast to the statistics' fp32."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(x)
        factor = 0.0 if self.momentum is None else self.momentum
        if self.training:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:  # cumulative moving average
                factor = 1.0 / float(self.num_batches_tracked)
        weight = None if self.weight is None else self.weight.float()
        bias = None if self.bias is None else self.bias.float()
        return F.batch_norm(x, self.running_mean, self.running_var, weight, bias, self.training, factor, self.eps)


class Fp32StatsBatchNorm1d(_Fp32Stats, nn.BatchNorm1d):
    pass


class Fp32StatsBatchNorm2d(_Fp32Stats, nn.BatchNorm2d):
    pass


class Fp32StatsBatchNorm3d(_Fp32Stats, nn.BatchNorm3d):
    pass


# The plain layers and what they become (a class, not a patched instance: the model still pickles and deep-copies)
FP32_STATS = {nn.BatchNorm1d: Fp32StatsBatchNorm1d, nn.BatchNorm2d: Fp32StatsBatchNorm2d,
              nn.BatchNorm3d: Fp32StatsBatchNorm3d}


def bf16_with_fp32_batchnorm_stats(model: nn.Module) -> tuple[nn.Module, str]:
    """Cast `model` to bf16 except the running statistics of its plain BatchNorm layers; returns it and a note."""
    model = model.to(torch.bfloat16)
    kept, whole = 0, 0
    for module in model.modules():
        if type(module) in FP32_STATS and module.track_running_stats:
            module.running_mean.data = module.running_mean.data.float()
            module.running_var.data = module.running_var.data.float()
            module.__class__ = FP32_STATS[type(module)]
            kept += 1
        elif isinstance(module, nn.modules.batchnorm._NormBase):
            whole += 1
    note = f"bf16 engine: {kept} BatchNorm layer(s) keep fp32 running statistics"
    return model, note + (f"; {whole} BatchNorm subclass(es) run in bf16 whole" if whole else "")
