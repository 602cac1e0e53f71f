"""The config of a data-free quantization run (`python -m nayer.quantize --help` lists every key).

The recovery phase is KD, so its section `qat` is a `KDConfig` (same keys, same objective and optimizer) with
the QAT schedule added and defaults of its own.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from nayer.cli_config import ConfigError
from nayer.config import KDConfig, check_choice
from nayer.data import PRESETS
from nayer.models import model_names
from nayer.runtime import check_device_name

MIN_BITS, MAX_BITS = 2, 8
FIRST_LAST = ("8bit", "same", "float")
ACT_OBSERVERS = ("minmax", "moving_average", "histogram")


@dataclass
class CalibConfig:
    batches: int = 8  # PTQ calibration batches
    batch_size: int = 128  # images per calibration batch
    augment: bool = False  # crop + flip the calibration images (as in KD); false = the images as synthesized


@dataclass
class QATConfig(KDConfig):
    """KD from the float model into the fake-quantized one: KDConfig's keys, the cosine stepped per step."""

    kd_steps: int = 300  # data-free QAT-by-KD steps; 0 = PTQ only (recovered = PTQ)
    batch_size: int = 128  # synthetic images per step
    lr: float = 0.0005  # small: the KD gradient carries a factor T (=20), and W4 diverged at lr >= 0.002
    eta_min: float = 0.0  # cosine (per step) from lr to eta_min
    freeze_bn_step: int = 0  # BN running statistics frozen from this step on (0 = never updated; -1 = never frozen)
    freeze_observer_step: int = 0  # observers re-enabled for steps before this (0 = calibrated ranges kept; -1 = never frozen)
    log_every: int = 10  # KD loss curve: mean loss of every `log_every` steps


@dataclass
class QuantizeConfig:
    """One data-free quantization run: float -> PTQ (calibrated on synthetic images) -> QAT by KD."""

    arch: str = "resnet56"  # the float model's zoo name (nayer.models.model_names)
    checkpoint: str = ""  # the float model's state_dict (torch.load weights_only=True); "" = random init (tests)
    dataset: str = "cifar10"  # preset: class count, image size, normalization
    eval: str = ""  # real labeled test set (load_labeled spec: .npz, image folder, digits:test); required
    eval_batch_size: int = 500  # images per evaluation forward pass
    eval_limit: int = 0  # evaluate on a fixed random subset of this many test images (smoke runs); 0 = all
    buffer: str = ""  # synthetic images: <run>/buffer (or the run folder); required
    max_images: int = 0  # use a random subset of this many synthetic images; 0 = all
    w_bits: int = 4  # weight bits, 2..8
    a_bits: int = 8  # activation bits, 2..8
    per_channel: bool = True  # per-output-channel weight scales; false = one scale per weight tensor
    first_last: str = "8bit"  # 8bit | same | float: width of the first conv and the last Linear
    act_observer: str = "minmax"  # minmax | moving_average | histogram
    calib: CalibConfig = field(default_factory=CalibConfig)
    qat: QATConfig = field(default_factory=QATConfig)
    seed: int = 0  # subsets, calibration and QAT order, augmentation
    device: str = "auto"  # auto = cuda when present, else cpu
    num_threads: int = 0  # torch CPU threads; 0 = torch default
    out: str = ""  # also write the summary JSON here; "" = print only

    def validate(self) -> None:
        """Cross-field checks; each error names the key and what is allowed."""
        check_device_name(self.device)
        check_choice("arch", self.arch, tuple(model_names()))
        check_choice("dataset", self.dataset, tuple(PRESETS))
        for key in ("w_bits", "a_bits"):
            value = getattr(self, key)
            if not MIN_BITS <= value <= MAX_BITS:
                raise ConfigError(f"{key}={value} is out of range; allowed: {MIN_BITS}..{MAX_BITS}")
        check_choice("first_last", self.first_last, FIRST_LAST)
        check_choice("act_observer", self.act_observer, ACT_OBSERVERS)
        for key, value, low in (("calib.batches", self.calib.batches, 1), ("calib.batch_size", self.calib.batch_size, 1),
                                ("qat.batch_size", self.qat.batch_size, 1), ("qat.log_every", self.qat.log_every, 1),
                                ("eval_batch_size", self.eval_batch_size, 1), ("qat.kd_steps", self.qat.kd_steps, 0),
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
            raise ConfigError("no synthetic images: pass buffer=<run folder>/buffer (of nayer.run, or of "
                              "orchestrator.run through python -m orchestrator.quantize)")
        if not self.eval:
            raise ConfigError("no evaluation set: pass eval=<test set> (e.g. ../shared/data/cifar10_test.npz)")
