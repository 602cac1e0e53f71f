"""Data-free quantization (NAYER paper Table 3): PTQ calibrated on NAYER's synthetic images, then recovery by
distilling the float model into its fake-quantized copy (data-free QAT by KD) on those same images only.

    python -m nayer.quantize config=configs/quantize/cifar10_w4a8.yaml buffer=runs/<run>/buffer
    python -m nayer.quantize config=configs/quantize/cifar10_w6a6.yaml buffer=runs/<run>/buffer qat.steps=200
    python -m nayer.quantize config=configs/quantize/cifar10_w4a8.yaml buffer=... w_bits=2 a_bits=4 out=q.json

Prints one JSON line (float / PTQ / recovered top-1 on the real test set `eval`, the bit widths, the number of
synthetic images, seconds per phase and the KD loss curve); `out=<file.json>` also writes it. A bad input
(unknown key, bits outside 2..8, a missing or empty buffer, a buffer whose image size or labels do not fit the
model) exits with a one-line `error: ...`.

Pure PyTorch: FX graph mode quantization from ``torch.ao.quantization`` (``prepare_qat_fx`` with a custom
``QConfigMapping``); every bit width is *simulated* with ``FakeQuantize`` modules (there are no int4/int6 CPU
kernels), so the numbers are those of an integer model with these grids, evaluated in float arithmetic.

What is quantized, and how (:func:`quantize_model`):

- Weights: symmetric, ``qint8`` storage with ``quant_min, quant_max = -2^(b-1), 2^(b-1) - 1`` (2^b levels, zero
  point 0), per output channel by default (``per_channel=false``: one scale per tensor). Observer: min/max of the
  weights (``MovingAverage*MinMaxObserver``; weights do not change during calibration, so it is their exact
  min/max).
- BatchNorm is folded: FX fuses every conv + BN (+ ReLU) into a ``ConvBn(ReLU)2d`` QAT module, which fake-quantizes
  ``W * gamma / sqrt(running_var + eps)``, the weight a deployed integer conv would hold.
- Activations: affine, ``quint8`` storage with ``0 .. 2^a - 1``, per tensor, at every point FX observes: the
  network input, each fused conv(+BN+ReLU) output, each residual add + ReLU, the logits. Observer ``act_observer``:
  ``minmax`` (global min/max over the calibration batches, the default), ``moving_average`` (EMA of batch
  min/max, constant 0.01) or ``histogram`` (PyTorch's L2-optimal histogram search, with its target grid set to
  the 2^a levels actually used).
- First and last layers, ``first_last`` (data-free quantization papers, e.g. Genie and Qimera, follow BRECQ and
  keep them at 8 bits): ``8bit`` (default) = the first conv's weights and its input (the image) and the last
  Linear's weights, its input (the pooled features; the tensor before pooling, since FX shares the observer
  across pooling and flatten) and its output (logits) at 8 bits; the first conv's *output* follows ``a_bits``.
  ``same`` = everything at w_bits / a_bits. ``float`` = the first conv and the last Linear are not quantized:
  float weights, the float image into the first conv, float features into the last Linear and float logits out
  (the first conv's output is still quantized at a_bits, as the next layer's input).

Phases (:func:`run`): (1) float top-1; (2) PTQ: observers on, fake quant off, ``calib.batches`` batches of the
synthetic images through the model in eval mode (BN uses the teacher's running statistics), un-augmented by
default (``calib.augment=true``: crop + flip as in KD), then observers frozen and fake quant on, evaluate;
(3) recovery: SGD on the KD loss (paper Eq. 7, T = ``qat.temperature``) between the float model and the PTQ model
on augmented synthetic images, cosine learning rate per step, BN statistics frozen from ``qat.freeze_bn_step`` and
observers (re-enabled for QAT) frozen from ``qat.freeze_observer_step`` (default 0: the calibrated ranges stay),
evaluate. The float model is never modified (the quantized model is a deep copy).

Synthetic images: the single-process runner's buffer, ``<run>/buffer/chunk-*.pt`` files of
``{"images": uint8 [N,3,H,W], "labels": int64 [N]}`` (``buffer=`` may also name the run folder). The distributed
runner's WebDataset shards (``buffer/manifest.json``) are not read here.
"""

from __future__ import annotations

import copy
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
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
from torch.ao.nn.intrinsic.qat import freeze_bn_stats
from torch.ao.quantization.quantize_fx import prepare_qat_fx

from nayer.augment import Augment, Normalize, uint8_to_float
from nayer.cli_config import ConfigError, as_dict
from nayer.data import PRESETS, LabeledImages, load_labeled, preset
from nayer.evaluate import evaluate
from nayer.kd import KDObjective, make_optimizer
from nayer.losses import NonFiniteLossError
from nayer.models import CheckpointMismatchError, classifier_layer, load_teacher, model_names
from nayer.runtime import check_device_name, save_json, seed_everything, select_device

MIN_BITS, MAX_BITS = 2, 8
FIRST_LAST = ("8bit", "same", "float")
ACT_OBSERVERS = ("minmax", "moving_average", "histogram")


# --------------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------------
@dataclass
class CalibConfig:
    batches: int = 8  # PTQ calibration batches
    batch_size: int = 128
    augment: bool = False  # crop + flip the calibration images (as in KD); false = the images as synthesized


@dataclass
class QATConfig:
    steps: int = 300  # data-free QAT-by-KD steps; 0 = PTQ only (recovered = PTQ)
    batch_size: int = 128
    lr: float = 0.0005  # small: the KD gradient carries a factor T (=20), and W4 diverged at lr >= 0.002
    momentum: float = 0.9
    weight_decay: float = 1e-4
    eta_min: float = 0.0  # cosine (per step) from lr to eta_min
    temperature: float = 20.0  # KD temperature T of paper Eq. 7, the project's value
    crop_padding: int = 4
    flip: bool = True
    freeze_bn_step: int = 0  # BN running statistics frozen from this step on (0 = never updated; -1 = never frozen)
    freeze_observer_step: int = 0  # observers re-enabled for steps before this (0 = calibrated ranges kept; -1 = never frozen)
    log_every: int = 10  # KD loss curve: mean loss of every `log_every` steps


@dataclass
class QuantizeConfig:
    """One data-free quantization run: float -> PTQ (calibrated on synthetic images) -> QAT by KD."""

    arch: str = "resnet56"
    checkpoint: str = ""  # the float model's state_dict (torch.load weights_only=True); "" = random init (tests)
    dataset: str = "cifar10"  # preset: class count, image size, normalization
    eval: str = ""  # real labeled test set (load_labeled spec: .npz, image folder, digits:test); required
    eval_batch_size: int = 500
    eval_limit: int = 0  # evaluate on a fixed random subset of this many test images (smoke runs); 0 = all
    buffer: str = ""  # synthetic images: <run>/buffer with chunk-*.pt (or the run folder); required
    max_images: int = 0  # use a random subset of this many synthetic images; 0 = all
    w_bits: int = 4
    a_bits: int = 8
    per_channel: bool = True  # per-output-channel weight scales; false = one scale per weight tensor
    first_last: str = "8bit"  # 8bit | same | float: width of the first conv and the last Linear
    act_observer: str = "minmax"  # minmax | moving_average | histogram
    calib: CalibConfig = field(default_factory=CalibConfig)
    qat: QATConfig = field(default_factory=QATConfig)
    seed: int = 0
    device: str = "auto"  # auto = cuda when present, else cpu
    num_threads: int = 0  # torch CPU threads; 0 = torch default
    out: str = ""  # also write the summary JSON here; "" = print only

    def validate(self) -> None:
        """Cross-field checks; each error names the key and what is allowed."""
        check_device_name(self.device)
        if self.arch not in model_names():
            raise ConfigError(f"arch={self.arch!r} is not allowed; choose one of: {', '.join(model_names())}")
        if self.dataset not in PRESETS:
            raise ConfigError(f"dataset={self.dataset!r} is not allowed; choose one of: {', '.join(PRESETS)}")
        for key in ("w_bits", "a_bits"):
            value = getattr(self, key)
            if not MIN_BITS <= value <= MAX_BITS:
                raise ConfigError(f"{key}={value} is out of range; allowed: {MIN_BITS}..{MAX_BITS}")
        for key, value, allowed in (("first_last", self.first_last, FIRST_LAST),
                                    ("act_observer", self.act_observer, ACT_OBSERVERS)):
            if value not in allowed:
                raise ConfigError(f"{key}={value!r} is not allowed; choose one of: {', '.join(allowed)}")
        for key, value, low in (("calib.batches", self.calib.batches, 1), ("calib.batch_size", self.calib.batch_size, 1),
                                ("qat.batch_size", self.qat.batch_size, 1), ("qat.log_every", self.qat.log_every, 1),
                                ("eval_batch_size", self.eval_batch_size, 1), ("qat.steps", self.qat.steps, 0),
                                ("eval_limit", self.eval_limit, 0), ("max_images", self.max_images, 0),
                                ("num_threads", self.num_threads, 0), ("qat.crop_padding", self.qat.crop_padding, 0),
                                ("qat.freeze_bn_step", self.qat.freeze_bn_step, -1),
                                ("qat.freeze_observer_step", self.qat.freeze_observer_step, -1)):
            if value < low:
                raise ConfigError(f"{key}={value} is out of range; allowed: >= {low}")
        if self.qat.lr <= 0 or self.qat.eta_min < 0 or self.qat.eta_min > self.qat.lr:
            raise ConfigError(f"qat.lr={self.qat.lr}, qat.eta_min={self.qat.eta_min}: need qat.lr > 0 and "
                              "0 <= qat.eta_min <= qat.lr")
        if not 0 <= self.qat.momentum < 1:
            raise ConfigError(f"qat.momentum={self.qat.momentum} is out of range; allowed: [0, 1)")
        if self.qat.weight_decay < 0:
            raise ConfigError(f"qat.weight_decay={self.qat.weight_decay} is out of range; allowed: >= 0")
        if self.qat.temperature <= 0:
            raise ConfigError(f"qat.temperature={self.qat.temperature} is out of range; allowed: > 0")
        if not self.buffer:
            raise ConfigError("no synthetic images: pass buffer=<run folder>/buffer (chunk-*.pt files of nayer.run)")
        if not self.eval:
            raise ConfigError("no evaluation set: pass eval=<test set> (e.g. ../shared/data/cifar10_test.npz)")


# --------------------------------------------------------------------------------------------------
# Synthetic images
# --------------------------------------------------------------------------------------------------
def load_buffer(path: str | Path, image_size: int, num_classes: int) -> tuple[Tensor, Tensor]:
    """All synthetic images of a single-process NAYER buffer: uint8 [N,3,H,W] and int64 [N] labels.

    Reads ``chunk-*.pt`` (``{"images", "labels"}``) in `path`, or in ``path/buffer`` when `path` is a run folder.
    The distributed runner's WebDataset shards (``manifest.json``) are refused with a message saying so. Raises
    FileNotFoundError / ValueError naming the folder for a missing or empty buffer, images that are not
    3 x image_size x image_size, and labels outside [0, num_classes).
    """
    folder = Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(f"buffer folder not found: '{path}'; pass buffer=<run folder>/buffer")
    chunks = sorted(folder.glob("chunk-*.pt"))
    if not chunks and (folder / "buffer").is_dir():
        folder = folder / "buffer"
        chunks = sorted(folder.glob("chunk-*.pt"))
    if not chunks:
        if (folder / "manifest.json").is_file():
            raise ValueError(f"buffer folder '{folder}' holds WebDataset shards (manifest.json) of the distributed "
                             "runner; nayer.quantize reads only the single-process runner's chunk-*.pt files")
        raise ValueError(f"buffer folder '{folder}' is empty: it has no chunk-*.pt files (run nayer.run first)")
    images, labels = [], []
    for chunk in chunks:
        try:
            data = torch.load(chunk, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - torch.load raises many types for a bad file
            raise ValueError(f"cannot read buffer chunk '{chunk}': {str(exc).strip().splitlines()[0]}") from None
        if not isinstance(data, dict) or "images" not in data or "labels" not in data:
            raise ValueError(f"buffer chunk '{chunk}' is not a {{'images', 'labels'}} dict of nayer.run")
        x, y = data["images"], data["labels"]
        if x.dtype != torch.uint8 or x.ndim != 4 or y.shape != (x.shape[0],):
            raise ValueError(f"buffer chunk '{chunk}' must hold uint8 images [N,C,H,W] and N labels, got "
                             f"{x.dtype} {tuple(x.shape)} and {tuple(y.shape)} labels")
        if tuple(x.shape[1:]) != (3, image_size, image_size):
            raise ValueError(f"buffer chunk '{chunk}' holds {tuple(x.shape[1:])} images but the model takes "
                             f"(3, {image_size}, {image_size}); synthesize with the model's dataset preset")
        images.append(x)
        labels.append(y.long())
    x, y = torch.cat(images), torch.cat(labels)
    if len(x) == 0:
        raise ValueError(f"buffer folder '{folder}' is empty: its {len(chunks)} chunk file(s) hold 0 images")
    if int(y.min()) < 0 or int(y.max()) >= num_classes:
        raise ValueError(f"buffer '{folder}' has labels in [{int(y.min())}, {int(y.max())}] but the model has "
                         f"{num_classes} classes (labels 0..{num_classes - 1}); the buffer was synthesized for "
                         "another teacher")
    return x, y


def batches(images: Tensor, batch_size: int, num_batches: int, generator: torch.Generator) -> Iterator[Tensor]:
    """`num_batches` uint8 batches from shuffled passes over `images` (no repeat within a pass)."""
    n, order = len(images), torch.empty(0, dtype=torch.long)
    batch_size = min(batch_size, n)
    for _ in range(num_batches):
        while order.numel() < batch_size:
            order = torch.cat([order, torch.randperm(n, generator=generator)])
        idx, order = order[:batch_size], order[batch_size:]
        yield images[idx]


# --------------------------------------------------------------------------------------------------
# Quantization
# --------------------------------------------------------------------------------------------------
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


class QATTrainer:
    """Data-free QAT by KD: SGD (momentum, weight decay) with a per-step cosine from lr to eta_min over `steps`;
    BN statistics and observers frozen at the configured steps (see QATConfig)."""

    def __init__(self, qmodel: nn.Module, teacher: nn.Module, cfg: QATConfig, mean: Sequence[float],
                 std: Sequence[float], device: torch.device):
        self.qmodel, self.teacher, self.cfg = qmodel, teacher, cfg
        # the student's KD objective and optimizer (QATConfig carries KDConfig's keys), with the quantized model as
        # the student, fp32 and NCHW, and the cosine stepped per QAT step instead of per epoch
        self.objective = KDObjective(qmodel, teacher, cfg, mean, std, device, bf16=False, channels_last=False)
        self.optimizer, self.scheduler = make_optimizer(qmodel, cfg, cfg.steps)
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


# --------------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------------
def _eval_subset(data: LabeledImages, limit: int) -> LabeledImages:
    """A fixed random subset (seed 0, independent of `seed`) of `limit` images; the test sets are class-sorted."""
    if not limit or limit >= len(data):
        return data
    idx = np.sort(np.random.default_rng(0).permutation(len(data))[:limit])
    return LabeledImages(data.x[idx], data.y[idx], data.classes)


def run(cfg: QuantizeConfig) -> dict:
    """Float -> PTQ -> data-free QAT by KD, each evaluated on `cfg.eval`; returns the JSON-able summary."""
    cfg.validate()
    t_start = time.perf_counter()
    seconds: dict[str, float] = {}
    device = select_device(cfg.device)
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    seed_everything(cfg.seed)
    p = preset(cfg.dataset)
    k = p.num_classes

    images, labels = load_buffer(cfg.buffer, p.image_size, k)
    total_images = len(images)
    if cfg.max_images and cfg.max_images < total_images:
        keep = torch.randperm(total_images, generator=torch.Generator().manual_seed(cfg.seed))[:cfg.max_images]
        images, labels = images[keep], labels[keep]
    test = _eval_subset(load_labeled(cfg.eval, p.image_size), cfg.eval_limit)
    if int(test.y.max()) >= k:
        raise ConfigError(f"evaluation set '{cfg.eval}' has label {int(test.y.max())} but dataset '{cfg.dataset}' "
                          f"has {k} classes")
    try:
        model = load_teacher(cfg.arch, k, cfg.checkpoint or None).to(device)
    except CheckpointMismatchError as exc:
        raise ConfigError(f"{exc}; note: dataset '{cfg.dataset}' has {k} classes, the checkpoint's head must match") from None
    float_state = {name: t.detach().clone() for name, t in model.state_dict().items()}
    seconds["load"] = time.perf_counter() - t_start

    def timed_eval(net: nn.Module, phase: str) -> float:
        t0 = time.perf_counter()
        top1 = evaluate(net, test.x, test.y, p.mean, p.std, device, cfg.eval_batch_size, False, k)["top1"]
        seconds[phase] = time.perf_counter() - t0
        return top1

    float_top1 = timed_eval(model, "float_eval")

    # PTQ
    t0 = time.perf_counter()
    sampler = torch.Generator().manual_seed(cfg.seed + 1)
    example = uint8_to_float(images[:2]).to(device)
    qmodel = quantize_model(model, example, cfg.w_bits, cfg.a_bits, cfg.per_channel, cfg.first_last, cfg.act_observer)
    prep = (Augment(p.mean, p.std, cfg.qat.crop_padding, cfg.qat.flip) if cfg.calib.augment
            else Normalize(p.mean, p.std)).to(device)
    calib_images = calibrate(qmodel, batches(images, cfg.calib.batch_size, cfg.calib.batches, sampler), prep, device)
    seconds["calibrate"] = time.perf_counter() - t0
    ptq_top1 = timed_eval(qmodel, "ptq_eval")

    # Recovery: data-free QAT by KD
    t0 = time.perf_counter()
    trainer = QATTrainer(qmodel, model, cfg.qat, p.mean, p.std, device)
    curve, window = [], []
    for batch in batches(images, cfg.qat.batch_size, cfg.qat.steps, sampler):
        window.append(trainer.step(batch))
        if len(window) == cfg.qat.log_every or trainer.step_count == cfg.qat.steps:
            curve.append({"step": trainer.step_count, "kd_loss": sum(window) / len(window)})
            window = []
    trainer.finish()
    seconds["qat"] = time.perf_counter() - t0
    recovered_top1 = timed_eval(qmodel, "recovered_eval") if cfg.qat.steps else ptq_top1

    changed = [name for name, t in model.state_dict().items() if not torch.equal(t, float_state[name])]
    if changed:  # a bug, not a user error: the float model must stay as loaded
        raise AssertionError(f"the float model was modified during quantization: {changed[:3]}")
    seconds["total"] = time.perf_counter() - t_start
    summary = {
        "arch": cfg.arch, "dataset": cfg.dataset, "w_bits": cfg.w_bits, "a_bits": cfg.a_bits,
        "bits": f"W{cfg.w_bits}A{cfg.a_bits}", "per_channel": cfg.per_channel, "first_last": cfg.first_last,
        "act_observer": cfg.act_observer,
        "float_top1": float_top1, "ptq_top1": ptq_top1, "recovered_top1": recovered_top1, "eval_images": len(test),
        "synthetic_images": len(images), "buffer_images": total_images, "calib_images": calib_images,
        "calib_distinct_images": min(calib_images, len(images)),  # shuffled passes: a repeat only after a full pass
        "qat_steps": cfg.qat.steps, "qat_batch_size": min(cfg.qat.batch_size, len(images)),
        "qat_images_seen": cfg.qat.steps * min(cfg.qat.batch_size, len(images)),
        "seconds": {key: round(value, 2) for key, value in seconds.items()},
        "kd_loss_curve": curve, "device": str(device), "config": as_dict(cfg),
    }
    if cfg.out:
        save_json(summary, cfg.out)
    return summary


def main(argv: Sequence[str] | None = None) -> None:
    from nayer.run import cli  # late: nayer.run pulls in the synthesis stack

    cli(QuantizeConfig, run, argv)


if __name__ == "__main__":
    main()
