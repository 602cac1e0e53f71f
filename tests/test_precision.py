"""The bf16 engine's student: bf16 weights, BatchNorm running statistics in fp32 (orchestrator.precision)."""

import copy

import pytest
import torch
from torch import nn

from orchestrator.precision import bf16_with_fp32_batchnorm_stats


@pytest.mark.parametrize("momentum", [0.1, None])
def test_the_fp32_statistics_forward_is_batchnorms_own(momentum):
    torch.manual_seed(0)
    stock = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, momentum=momentum), nn.BatchNorm1d(4))
    stock[1].weight.data.uniform_(0.5, 1.5)
    stock[1].bias.data.uniform_(-0.5, 0.5)
    stock.to(torch.bfloat16).float()  # weights that bf16 holds exactly: the cast below loses nothing
    ours, note = bf16_with_fp32_batchnorm_stats(copy.deepcopy(stock))
    assert note == "bf16 engine: 2 BatchNorm layer(s) keep fp32 running statistics"
    ours.float()  # the patched forward with fp32 weights: it must compute what BatchNorm's own does
    for _ in range(3):
        x = torch.randn(8, 3, 6, 6)
        assert torch.allclose(ours[:2](x), stock[:2](x), atol=1e-5)
    assert torch.allclose(ours[1].running_var, stock[1].running_var, atol=1e-6)
    assert ours[1].num_batches_tracked.item() == stock[1].num_batches_tracked.item() == 3
    ours.eval(), stock.eval()
    x = torch.randn(8, 3, 6, 6)
    assert torch.allclose(ours[:2](x), stock[:2](x), atol=1e-5)


def test_small_updates_of_the_statistics_survive_in_bf16_training():
    # Batches whose variance is 1% above the running one: each EMA step moves running_var by 0.1%, below bf16's
    # resolution at 1.0 (1/128), so bf16 statistics never move; fp32 ones converge towards 1.01.
    model, _ = bf16_with_fp32_batchnorm_stats(nn.Sequential(nn.BatchNorm1d(2)))
    bf16 = nn.Sequential(nn.BatchNorm1d(2)).to(torch.bfloat16)
    for _ in range(50):
        x = torch.randn(4096, 2)
        x = ((x - x.mean(0)) / x.std(0) * 1.01 ** 0.5).to(torch.bfloat16)
        y = model(x)
        bf16(x)
    bn = model[0]
    assert y.dtype == torch.bfloat16 and bn.weight.dtype == torch.bfloat16 and bn.running_var.dtype == torch.float32
    assert bn.running_var.min().item() > 1.004 and torch.all(bf16[0].running_var == 1.0)
    y.float().sum().backward()  # gradients reach the bf16 affine parameters
    assert bn.weight.grad is not None and bn.weight.grad.dtype == torch.bfloat16


def test_the_converted_student_pickles_and_copies():
    # the layers become module-level classes (no per-instance forward): the model pickles, as Ray and DeepSpeed may
    import pickle

    model, _ = bf16_with_fp32_batchnorm_stats(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)))
    for clone in (pickle.loads(pickle.dumps(model)), copy.deepcopy(model)):
        assert type(clone[1]) is type(model[1]) and clone[1].running_var.dtype == torch.float32
        x = torch.randn(2, 3, 6, 6, dtype=torch.bfloat16)
        assert torch.equal(clone.eval()(x), model.eval()(x))
