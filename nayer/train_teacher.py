"""Train a teacher from scratch on labeled data you own (NAYER appendix A.1, Fast-DFKD `train_scratch.py`).

    python -m nayer.train_teacher config=configs/teacher/digits.yaml out=runs/digits/teacher.pt
    python -m nayer.train_teacher config=configs/teacher/cifar10.yaml train=/data/cifar10_train.npz \\
        test=/data/cifar10_test.npz out=runs/cifar10/resnet34.pt
    python -m nayer.train_teacher --help                 # every key, its default

Recipe: SGD (momentum 0.9, lr 0.1, weight decay 5e-4), batch 128, cosine annealing over `epochs`,
RandomCrop(pad 4) + horizontal flip, cross-entropy. `dataset` names the preset (nayer.data.PRESETS) that
fixes the class count, image size and the normalization the teacher will expect later; `train`/`test` are
nayer.data.load_labeled specs (digits:train, a .npz file or an image folder).

Writes the state_dict to `out` (atomically: `out.tmp`, then rename) and `<out>.json` with the test top-1
and the resolved config.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F

from nayer.augment import Augment, uint8_to_float
from nayer.cli import cli
from nayer.cli_config import ConfigError, as_dict
from nayer.config import check_choice
from nayer.data import PRESETS, LabeledImages, load_labeled, preset
from nayer.evaluate import evaluate
from nayer.models import build_model, model_names
from nayer.progress import progress_bar
from nayer.runtime import check_device_name, save_json, save_torch
from nayer.specs import Compute, ImageSpec

log = logging.getLogger(__name__)


@dataclass
class TeacherTrainConfig:
    arch: str = "resnet34"  # zoo name (nayer.models.model_names)
    dataset: str = "cifar10"  # preset name: class count, image size, mean/std
    train: str = ""  # load_labeled spec; required
    test: str = ""  # load_labeled spec; empty = no evaluation
    epochs: int = 200  # cosine annealing over these
    batch_size: int = 128
    lr: float = 0.1  # SGD
    momentum: float = 0.9
    weight_decay: float = 5e-4
    seed: int = 0  # initial weights and batch order
    device: str = "auto"  # auto = cuda if available, else cpu
    bf16: bool = False  # bf16 autocast (about 2x on CPUs with AMX and on recent GPUs)
    out: str = ""  # path of the state_dict to write; required
    num_threads: int = 0  # torch intra-op threads; 0 = torch default

    def validate(self) -> None:
        if not self.train:
            raise ConfigError("no training data: pass train=<path> (a .npz file or an image folder) or "
                              "train=digits:train")
        if not self.out:
            raise ConfigError("no output path: pass out=<path/teacher.pt>")
        check_choice("dataset", self.dataset, tuple(PRESETS))
        check_choice("arch", self.arch, tuple(model_names()))
        for name in ("epochs", "batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.lr <= 0 or self.weight_decay < 0 or not 0 <= self.momentum < 1:
            raise ConfigError(f"need lr > 0, weight_decay >= 0, 0 <= momentum < 1; got lr={self.lr}, "
                              f"weight_decay={self.weight_decay}, momentum={self.momentum}")
        if self.num_threads < 0:
            raise ConfigError(f"num_threads must be >= 0 (0 = torch default), got {self.num_threads}")
        check_device_name(self.device)


def train_teacher(cfg: TeacherTrainConfig) -> dict:
    """Train `cfg.arch` on `cfg.train`, evaluate on `cfg.test`, save; returns {"top1", "path"}."""
    cfg.validate()
    spec = preset(cfg.dataset).image_spec()
    compute = Compute.select(cfg.device, cfg.bf16)
    device = compute.device
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    torch.manual_seed(cfg.seed)

    train = load_labeled(cfg.train, spec.size)
    spec.check_labels(train.y, f"'{cfg.train}'", f"dataset '{cfg.dataset}'")
    test = load_labeled(cfg.test, spec.size) if cfg.test else None
    if test is not None:
        spec.check_labels(test.y, f"'{cfg.test}'", f"dataset '{cfg.dataset}'")

    model = build_model(cfg.arch, spec.num_classes).to(device, memory_format=torch.channels_last)
    train_seconds = fit(model, train, cfg, spec, compute)

    top1 = None
    result: dict = {}
    if test is not None:
        result = evaluate(model, test, spec, compute)
        top1 = result["top1"]
        log.info("test top-1 %.2f%% on %d images of '%s'", top1, result["n"], cfg.test)

    # Plain contiguous tensors: loadable with weights_only=True into a fresh model of any memory format.
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_torch(state, cfg.out)
    summary = {"top1": top1, "per_class": result.get("per_class"), "n_test": result.get("n"),
               "n_train": len(train), "train_seconds": round(train_seconds, 1), "config": as_dict(cfg)}
    save_json(summary, cfg.out + ".json")
    log.info("wrote %s (%.0f s of training)", cfg.out, train_seconds)
    return {"top1": top1, "path": cfg.out}


def fit(model: torch.nn.Module, train: LabeledImages, cfg: TeacherTrainConfig, spec: ImageSpec,
        compute: Compute) -> float:
    """`cfg.epochs` epochs of SGD (momentum, weight decay, cosine per epoch) with crop + flip, batches shuffled anew
    each epoch; the loss and training accuracy on the progress bar. Returns the epochs' seconds."""
    device = compute.device
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                                weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=cfg.epochs)
    augment = Augment(spec.mean, spec.std, crop_padding=4, flip=True).to(device)
    # The whole set stays on the device as uint8 NCHW: batches are index gathers, no DataLoader workers.
    x_all = torch.from_numpy(train.x).permute(0, 3, 1, 2).contiguous().to(device)
    y_all = torch.from_numpy(train.y).to(device)
    order_rng = torch.Generator().manual_seed(cfg.seed)
    n = len(train)
    start = time.perf_counter()
    model.train()
    bar = progress_bar(cfg.epochs, f"teacher {cfg.arch}", "epoch")
    for _ in range(cfg.epochs):
        perm = torch.randperm(n, generator=order_rng).to(device)
        loss_sum, correct = 0.0, 0
        for i in range(0, n, cfg.batch_size):
            idx = perm[i:i + cfg.batch_size]
            images = augment(uint8_to_float(x_all[idx])).contiguous(memory_format=torch.channels_last)
            labels = y_all[idx]
            with compute.autocast():
                logits = model(images)
            loss = F.cross_entropy(logits.float(), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            loss_sum += loss.item() * len(idx)
            correct += int((logits.argmax(1) == labels).sum())
        scheduler.step()
        bar.set_postfix(loss=f"{loss_sum / n:.3f}", train_acc=f"{100 * correct / n:.1f}")
        bar.update()
    bar.close()
    return time.perf_counter() - start


def main(argv: Sequence[str] | None = None) -> None:
    """Command-line entry (also the `nayer-train-teacher` script); bad input exits with one error line."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    cli(train_teacher, argv, doc=__doc__, schema=TeacherTrainConfig)


if __name__ == "__main__":
    main()
