"""FX graph mode fake quantization of a float model: the QConfigMapping (W`w_bits`A`a_bits`, the first and last
layers at 8 bits, float or like the rest), BN folding, PTQ calibration, and the weights a layer computes with.
What is quantized where is described in `nayer.quantize`'s docstring."""

from __future__ import annotations

import copy
import warnings
from typing import Iterator, Sequence

import torch
from torch import Tensor, nn
from torch.ao.quantization import (
    FakeQuantize,
    FakeQuantizeBase,
    HistogramObserver,
    MinMaxObserver,
    MovingAverageMinMaxObserver,
    MovingAveragePerChannelMinMaxObserver,
    QConfig,
    QConfigMapping,
    disable_fake_quant,
    disable_observer,
    enable_fake_quant,
    enable_observer,
)
from torch.ao.quantization.quantize_fx import prepare_qat_fx

from nayer.augment import uint8_to_float
from nayer.models import classifier_layer


class BitHistogramObserver(HistogramObserver):
    """PyTorch's HistogramObserver, with its L2 search done on the 2^b-level grid actually used.

    Upstream sizes the search grid from the dtype (256 levels for quint8) whatever quant_min/quant_max say.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.dst_nbins = int(self.quant_max - self.quant_min + 1)


def weight_fake_quant(bits: int, per_channel: bool = True):
    """Symmetric b-bit weight fake quant: qint8 storage, [-2^(b-1), 2^(b-1) - 1], zero point 0, per output
    channel (axis 0) or per tensor."""
    qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    if per_channel:
        return FakeQuantize.with_args(observer=MovingAveragePerChannelMinMaxObserver, quant_min=qmin, quant_max=qmax,
                                      dtype=torch.qint8, qscheme=torch.per_channel_symmetric, ch_axis=0)
    return FakeQuantize.with_args(observer=MovingAverageMinMaxObserver, quant_min=qmin, quant_max=qmax,
                                  dtype=torch.qint8, qscheme=torch.per_tensor_symmetric)


def act_fake_quant(bits: int, observer: str = "minmax"):
    """Affine b-bit activation fake quant: quint8 storage, [0, 2^b - 1], one scale and zero point per tensor."""
    observers = {"minmax": MinMaxObserver, "moving_average": MovingAverageMinMaxObserver,
                 "histogram": BitHistogramObserver}
    return FakeQuantize.with_args(observer=observers[observer], quant_min=0, quant_max=2 ** bits - 1,
                                  dtype=torch.quint8, qscheme=torch.per_tensor_affine)


def first_last_names(model: nn.Module) -> tuple[str, str]:
    """Module names of the first Conv2d (in module order) and of the classifier (the last Linear)."""
    head = classifier_layer(model)
    first = next((name for name, m in model.named_modules() if isinstance(m, nn.Conv2d)), None)
    last = next(name for name, m in model.named_modules() if m is head)
    if first is None:
        raise ValueError(f"{type(model).__name__} has no Conv2d: nothing to keep as the first layer")
    return first, last


def qconfig_mapping(w_bits: int, a_bits: int, per_channel: bool = True, first_last: str = "8bit",
                    act_observer: str = "minmax", first: str | None = None, last: str | None = None) -> QConfigMapping:
    """The QConfigMapping: W`w_bits`A`a_bits` everywhere; the modules `first` and `last` at 8 bits
    (``first_last=8bit``), not quantized (``float``) or like the rest (``same``)."""
    mapping = QConfigMapping().set_global(QConfig(activation=act_fake_quant(a_bits, act_observer),
                                                  weight=weight_fake_quant(w_bits, per_channel)))
    if first_last == "same":
        return mapping
    edge = (QConfig(activation=act_fake_quant(8, act_observer), weight=weight_fake_quant(8, per_channel))
            if first_last == "8bit" else None)
    for name in (first, last):
        if name is not None:
            mapping.set_module_name(name, edge)
    return mapping


def _replace_module(gm: torch.fx.GraphModule, old: nn.Module, new: nn.Module) -> None:
    """Point every attribute of `gm` that holds `old` (FX shares one observer under several names) to `new`."""
    for name, module in list(gm._modules.items()):  # not named_children(): it lists a shared module once
        if module is old:
            setattr(gm, name, new)


def _adjust_edges(gm: torch.fx.GraphModule, first: str, last: str, a_bits: int, first_last: str,
                  act_observer: str) -> None:
    """Fix the activations around the first and last layers, where FX's own choice is not the documented one.

    ``8bit``: the first conv's output observer -> a_bits (FX gives it the conv's 8-bit qconfig, but it is the
    next layer's input); the last Linear's input observer -> 8 bits (FX reuses the a_bits observer it shares
    through pooling and flatten). ``float``: the last Linear's input observer -> Identity (float features into the
    float Linear; FX would keep the a_bits one). ``same``: nothing to fix.
    """
    if first_last == "same":
        return
    for node in list(gm.graph.nodes):
        if node.op != "call_module" or node.target not in (first, last):
            continue
        if node.target == first:
            if first_last != "8bit":
                continue
            targets = [user for user in node.users if user.op == "call_module"]
            make = lambda: act_fake_quant(a_bits, act_observer)()  # noqa: E731
        else:
            targets = [arg for arg in node.args[:1] if isinstance(arg, torch.fx.Node) and arg.op == "call_module"]
            make = (lambda: act_fake_quant(8, act_observer)()) if first_last == "8bit" else nn.Identity  # noqa: E731
        for target in targets:
            old = gm.get_submodule(target.target)  # named_modules() lists a shared module under one name only
            if isinstance(old, FakeQuantizeBase):
                _replace_module(gm, old, make().to(_device_of(gm)))


def _device_of(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def quantize_model(model: nn.Module, example: Tensor, w_bits: int, a_bits: int, per_channel: bool = True,
                   first_last: str = "8bit", act_observer: str = "minmax") -> torch.fx.GraphModule:
    """W`w_bits`A`a_bits` fake-quantized copy of `model` (FX ``prepare_qat_fx``); `model` itself is untouched.

    Conv + BN (+ ReLU) are fused into QAT modules that fake-quantize the BN-folded weight. The result is in eval
    mode, with every observer on and every fake quant off (ready for :func:`calibrate`); its parameters require
    grad. See the module docstring for where each bit width applies.
    """
    first, last = first_last_names(model)
    qmodel = copy.deepcopy(model).train().requires_grad_(True)
    mapping = qconfig_mapping(w_bits, a_bits, per_channel, first_last, act_observer, first, last)
    with warnings.catch_warnings():  # torch >= 2.9 flags torch.ao.quantization for a future move to torchao
        warnings.filterwarnings("ignore", message=r".*torch\.ao\.quantization is deprecated", category=DeprecationWarning)
        qmodel = prepare_qat_fx(qmodel, mapping, example_inputs=(example,))
    _adjust_edges(qmodel, first, last, a_bits, first_last, act_observer)
    qmodel.apply(enable_observer)
    qmodel.apply(disable_fake_quant)
    return qmodel.eval()


@torch.no_grad()
def calibrate(qmodel: nn.Module, images: Sequence[Tensor] | Iterator[Tensor], normalize: nn.Module,
              device: torch.device) -> int:
    """PTQ calibration: observers on and fake quant off while uint8 `images` batches pass in eval mode (BN on
    its running statistics), then observers frozen and fake quant on. `normalize` maps [0,1] images to the
    model's input (Normalize, or an Augment). Returns the number of images seen."""
    qmodel.eval()
    qmodel.apply(enable_observer)
    qmodel.apply(disable_fake_quant)
    seen = 0
    for batch in images:
        qmodel(normalize(uint8_to_float(batch.to(device))))
        seen += len(batch)
    if seen == 0:
        raise ValueError("PTQ calibration got no images")
    qmodel.apply(disable_observer)
    qmodel.apply(enable_fake_quant)
    return seen


def fake_quant_weights(qmodel: nn.Module) -> dict[str, Tensor]:
    """The weight each quantized layer computes with: BN-folded (fused conv-BN modules, running statistics)
    and fake-quantized with the layer's current scale and zero point (its observer is not updated)."""
    out = {}
    for name, module in qmodel.named_modules():
        fq = getattr(module, "weight_fake_quant", None)
        if not isinstance(fq, FakeQuantizeBase):
            continue
        w = module.weight.detach()
        bn = getattr(module, "bn", None)
        if isinstance(bn, nn.BatchNorm2d):
            factor = bn.weight.detach() / torch.sqrt(bn.running_var + bn.eps)
            w = w * factor.reshape(-1, *([1] * (w.ndim - 1)))
        if fq.qscheme in (torch.per_channel_symmetric, torch.per_channel_affine):
            wq = torch.fake_quantize_per_channel_affine(w, fq.scale, fq.zero_point.int(), fq.ch_axis,
                                                        fq.quant_min, fq.quant_max)
        else:
            wq = torch.fake_quantize_per_tensor_affine(w, float(fq.scale), int(fq.zero_point), fq.quant_min,
                                                       fq.quant_max)
        out[name] = wq
    return out
