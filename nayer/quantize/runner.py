"""The quantization run as a library: synthetic images -> float top-1 -> PTQ -> recovery by KD, each evaluated on
real data (`run`); the buffer comes through a `BufferReader`: here the single-process runner's `chunk-*.pt` files,
from `orchestrator.quantize` the reader of the pipeline's WebDataset shards (which this package does not import).
The command line is `nayer.quantize.app`.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from nayer.augment import Augment, Normalize, uint8_to_float
from nayer.buffer import CHUNK_GLOB, InMemoryBuffer
from nayer.cli_config import ConfigError, as_dict
from nayer.data import folder_read, load_labeled, preset
from nayer.evaluate import evaluate
from nayer.models import CheckpointMismatchError, load_teacher
from nayer.quantize.config import QuantizeConfig
from nayer.quantize.fx import calibrate, quantize_model
from nayer.quantize.qat import QATTrainer
from nayer.runtime import save_json, seed_everything
from nayer.specs import Compute, ImageSpec

BufferReader = Callable[[Path], InMemoryBuffer]  # a buffer folder -> its images (one-line errors for bad ones)


def read_chunks(folder: Path) -> InMemoryBuffer:
    """The single-process runner's buffer: `chunk-*.pt` in `folder`, or in `folder/buffer` for a run folder."""
    if not any(folder.glob(CHUNK_GLOB)) and (folder / "buffer").is_dir():
        folder = folder / "buffer"
    if not any(folder.glob(CHUNK_GLOB)):
        if (folder / "manifest.json").is_file():
            raise ValueError(f"buffer folder '{folder}' holds the WebDataset shards of orchestrator.run "
                             "(manifest.json), not chunk-*.pt files: quantize it with python -m orchestrator.quantize")
        raise ValueError(f"buffer folder '{folder}' is empty: it has no chunk-*.pt files (run nayer.run first)")
    return InMemoryBuffer.load(folder)


def load_buffer(path: str | Path, images: ImageSpec, read: BufferReader = read_chunks) -> InMemoryBuffer:
    """The synthetic images of `path`, checked to fit the model: not empty, 3 x size x size, labels 0..K-1."""
    folder = Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(f"buffer folder not found: '{path}'; pass buffer=<run folder>/buffer")
    buffer = read(folder)
    if len(buffer) == 0:
        raise ValueError(f"buffer folder '{folder}' is empty: it holds 0 images")
    x, y = buffer.tensors()
    if tuple(x.shape[1:]) != (3, images.size, images.size):
        raise ValueError(f"buffer '{folder}' holds {tuple(x.shape[1:])} images but the model takes "
                         f"(3, {images.size}, {images.size}); synthesize with the model's dataset preset")
    images.check_labels(y, f"buffer '{folder}'", "the model")
    return buffer


def run(cfg: QuantizeConfig, read: BufferReader = read_chunks) -> dict:
    """Float -> PTQ -> data-free QAT by KD, each evaluated on `cfg.eval`; returns the JSON-able summary."""
    cfg.validate()
    q = QuantizeRun(cfg, read)
    top1 = {"float_top1": q.evaluate(q.model, "float_eval")}
    qmodel, calib_images = q.calibrate()
    top1["ptq_top1"] = q.evaluate(qmodel, "ptq_eval")
    curve = q.recover(qmodel)
    top1["recovered_top1"] = q.evaluate(qmodel, "recovered_eval") if cfg.qat.kd_steps else top1["ptq_top1"]
    changed = [name for name, t in q.model.state_dict().items() if not torch.equal(t, q.float_state[name])]
    if changed:  # a bug, not a user error: the float model must stay as loaded
        raise AssertionError(f"the float model was modified during quantization: {changed[:3]}")
    summary = q.summary(top1, calib_images, curve)
    if cfg.out:
        save_json(summary, cfg.out)
    return summary


class QuantizeRun:
    """One run's inputs (created by loading them: the `load` phase) and its phases, each timed in `seconds`."""

    def __init__(self, cfg: QuantizeConfig, read: BufferReader):
        self.cfg, self.start = cfg, time.perf_counter()
        self.seconds: dict[str, float] = {}
        self.compute = Compute.select(cfg.device, channels_last=False)  # fp32, NCHW: fake quant has neither
        if cfg.num_threads:
            torch.set_num_threads(cfg.num_threads)
        seed_everything(cfg.seed)
        self.spec = spec = preset(cfg.dataset).image_spec()
        buffer = load_buffer(cfg.buffer, spec, read)
        self.buffer_images = len(buffer)
        if cfg.max_images and cfg.max_images < self.buffer_images:
            keep = torch.randperm(self.buffer_images, generator=torch.Generator().manual_seed(cfg.seed))
            images, labels = (t[keep[:cfg.max_images]] for t in buffer.tensors())
            buffer = InMemoryBuffer()
            buffer.append(images, labels)
        self.buffer, self.n = buffer, len(buffer)
        self.test = load_labeled(cfg.eval, spec.size, folder_read(cfg.dataset, spec.class_names)).subset(cfg.eval_limit)
        spec.check_labels(self.test.y, f"evaluation set '{cfg.eval}'", f"dataset '{cfg.dataset}'")
        try:
            self.model = load_teacher(cfg.arch, spec.num_classes, cfg.checkpoint or None).to(self.compute.device)
        except CheckpointMismatchError as exc:
            raise ConfigError(f"{exc}; note: dataset '{cfg.dataset}' has {spec.num_classes} classes, the "
                              "checkpoint's head must match") from None
        self.float_state = {name: t.detach().clone() for name, t in self.model.state_dict().items()}
        self.sampler = torch.Generator().manual_seed(cfg.seed + 1)  # calibration, then recovery batches
        self.seconds["load"] = time.perf_counter() - self.start

    def evaluate(self, net: nn.Module, phase: str) -> float:
        t0 = time.perf_counter()
        top1 = evaluate(net, self.test, self.spec, self.compute, self.cfg.eval_batch_size)["top1"]
        self.seconds[phase] = time.perf_counter() - t0
        return top1

    def calibrate(self) -> tuple[nn.Module, int]:
        """PTQ: the fake-quantized copy of the model, its observers calibrated on synthetic images; returns it and
        the number of images calibration saw."""
        cfg, t0 = self.cfg, time.perf_counter()
        example = uint8_to_float(self.buffer.tensors()[0][:2]).to(self.compute.device)
        qmodel = quantize_model(self.model, example, cfg.w_bits, cfg.a_bits, cfg.per_channel, cfg.first_last,
                                cfg.act_observer)
        prep = (Augment(self.spec.mean, self.spec.std, cfg.qat.crop_padding, cfg.qat.flip) if cfg.calib.augment
                else Normalize(self.spec.mean, self.spec.std)).to(self.compute.device)
        batches = (x for x, _ in self.buffer.batches(min(cfg.calib.batch_size, self.n), cfg.calib.batches,
                                                      self.sampler))
        calib_images = calibrate(qmodel, batches, prep, self.compute.device)
        self.seconds["calibrate"] = time.perf_counter() - t0
        return qmodel, calib_images

    def recover(self, qmodel: nn.Module) -> list[dict]:
        """Data-free QAT by KD from the float model; returns the KD loss curve (means of `qat.log_every` steps)."""
        cfg, t0 = self.cfg, time.perf_counter()
        trainer = QATTrainer(qmodel, self.model, cfg.qat, self.spec, self.compute.device)
        self.buffer.reset_order()  # recovery starts a fresh pass over the images
        curve, window = [], []
        for batch, _ in self.buffer.batches(min(cfg.qat.batch_size, self.n), cfg.qat.kd_steps, self.sampler):
            window.append(trainer.step(batch))
            if len(window) == cfg.qat.log_every or trainer.step_count == cfg.qat.kd_steps:
                curve.append({"step": trainer.step_count, "kd_loss": sum(window) / len(window)})
                window = []
        trainer.finish()
        self.seconds["qat"] = time.perf_counter() - t0
        return curve

    def summary(self, top1: dict, calib_images: int, curve: list[dict]) -> dict:
        cfg, n = self.cfg, self.n
        self.seconds["total"] = time.perf_counter() - self.start
        return {
            "arch": cfg.arch, "dataset": cfg.dataset, "w_bits": cfg.w_bits, "a_bits": cfg.a_bits,
            "bits": f"W{cfg.w_bits}A{cfg.a_bits}", "per_channel": cfg.per_channel, "first_last": cfg.first_last,
            "act_observer": cfg.act_observer, **top1, "eval_images": len(self.test),
            "synthetic_images": n, "buffer_images": self.buffer_images, "calib_images": calib_images,
            "calib_distinct_images": min(calib_images, n),  # shuffled passes: a repeat only after a full pass
            "qat_steps": cfg.qat.kd_steps, "qat_batch_size": min(cfg.qat.batch_size, n),
            "qat_images_seen": cfg.qat.kd_steps * min(cfg.qat.batch_size, n),
            "seconds": {key: round(value, 2) for key, value in self.seconds.items()},
            "kd_loss_curve": curve, "device": str(self.compute.device), "config": as_dict(cfg),
        }
