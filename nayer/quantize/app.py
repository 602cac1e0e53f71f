"""The quantization run: synthetic images -> float top-1 -> PTQ -> recovery by KD, each evaluated on real data.

    python -m nayer.quantize config=configs/quantize/cifar10_w4a8.yaml buffer=runs/<run>/buffer
    python -m nayer.quantize config=configs/quantize/cifar10_w6a6.yaml buffer=runs/<run>/buffer qat.kd_steps=200
    python -m nayer.quantize config=configs/quantize/cifar10_w4a8.yaml buffer=... w_bits=2 a_bits=4 out=q.json
    python -m orchestrator.quantize config=... buffer=runs/<pipeline run>/buffer      # WebDataset shards
    python -m nayer.quantize --help                                                   # every key, its default

Prints one JSON line (float / PTQ / recovered top-1 on the real test set `eval`, the bit widths, the number of
synthetic images, seconds per phase and the KD loss curve); `out=<file.json>` also writes it. The buffer is read by
a `BufferReader`: here the single-process runner's `chunk-*.pt` files; `orchestrator.quantize` hands in the
reader of the pipeline's WebDataset shards (which this package does not import).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch import nn

from nayer.augment import Augment, Normalize, uint8_to_float
from nayer.buffer import CHUNK_GLOB, InMemoryBuffer
from nayer.cli import cli
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
    t_start = time.perf_counter()
    seconds: dict[str, float] = {}
    compute = Compute.select(cfg.device, channels_last=False)  # fp32, NCHW: fake quant has neither bf16 nor CL
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    seed_everything(cfg.seed)
    spec = preset(cfg.dataset).image_spec()
    k = spec.num_classes

    buffer = load_buffer(cfg.buffer, spec, read)
    total_images = len(buffer)
    if cfg.max_images and cfg.max_images < total_images:
        keep = torch.randperm(total_images, generator=torch.Generator().manual_seed(cfg.seed))[:cfg.max_images]
        images, labels = (t[keep] for t in buffer.tensors())
        buffer = InMemoryBuffer()
        buffer.append(images, labels)
    n = len(buffer)
    test = load_labeled(cfg.eval, spec.size, folder_read(cfg.dataset, spec.class_names)).subset(cfg.eval_limit)
    spec.check_labels(test.y, f"evaluation set '{cfg.eval}'", f"dataset '{cfg.dataset}'")
    try:
        model = load_teacher(cfg.arch, k, cfg.checkpoint or None).to(compute.device)
    except CheckpointMismatchError as exc:
        raise ConfigError(f"{exc}; note: dataset '{cfg.dataset}' has {k} classes, the checkpoint's head must match") from None
    float_state = {name: t.detach().clone() for name, t in model.state_dict().items()}
    seconds["load"] = time.perf_counter() - t_start

    def timed_eval(net: nn.Module, phase: str) -> float:
        t0 = time.perf_counter()
        top1 = evaluate(net, test, spec, compute, cfg.eval_batch_size)["top1"]
        seconds[phase] = time.perf_counter() - t0
        return top1

    float_top1 = timed_eval(model, "float_eval")

    # PTQ
    t0 = time.perf_counter()
    sampler = torch.Generator().manual_seed(cfg.seed + 1)
    example = uint8_to_float(buffer.tensors()[0][:2]).to(compute.device)
    qmodel = quantize_model(model, example, cfg.w_bits, cfg.a_bits, cfg.per_channel, cfg.first_last, cfg.act_observer)
    prep = (Augment(spec.mean, spec.std, cfg.qat.crop_padding, cfg.qat.flip) if cfg.calib.augment
            else Normalize(spec.mean, spec.std)).to(compute.device)
    calib = (x for x, _ in buffer.batches(min(cfg.calib.batch_size, n), cfg.calib.batches, sampler))
    calib_images = calibrate(qmodel, calib, prep, compute.device)
    seconds["calibrate"] = time.perf_counter() - t0
    ptq_top1 = timed_eval(qmodel, "ptq_eval")

    # Recovery: data-free QAT by KD
    t0 = time.perf_counter()
    trainer = QATTrainer(qmodel, model, cfg.qat, spec, compute.device)
    buffer.reset_order()  # recovery starts a fresh pass over the images
    curve, window = [], []
    for batch, _ in buffer.batches(min(cfg.qat.batch_size, n), cfg.qat.kd_steps, sampler):
        window.append(trainer.step(batch))
        if len(window) == cfg.qat.log_every or trainer.step_count == cfg.qat.kd_steps:
            curve.append({"step": trainer.step_count, "kd_loss": sum(window) / len(window)})
            window = []
    trainer.finish()
    seconds["qat"] = time.perf_counter() - t0
    recovered_top1 = timed_eval(qmodel, "recovered_eval") if cfg.qat.kd_steps else ptq_top1

    changed = [name for name, t in model.state_dict().items() if not torch.equal(t, float_state[name])]
    if changed:  # a bug, not a user error: the float model must stay as loaded
        raise AssertionError(f"the float model was modified during quantization: {changed[:3]}")
    seconds["total"] = time.perf_counter() - t_start
    summary = {
        "arch": cfg.arch, "dataset": cfg.dataset, "w_bits": cfg.w_bits, "a_bits": cfg.a_bits,
        "bits": f"W{cfg.w_bits}A{cfg.a_bits}", "per_channel": cfg.per_channel, "first_last": cfg.first_last,
        "act_observer": cfg.act_observer,
        "float_top1": float_top1, "ptq_top1": ptq_top1, "recovered_top1": recovered_top1, "eval_images": len(test),
        "synthetic_images": n, "buffer_images": total_images, "calib_images": calib_images,
        "calib_distinct_images": min(calib_images, n),  # shuffled passes: a repeat only after a full pass
        "qat_steps": cfg.qat.kd_steps, "qat_batch_size": min(cfg.qat.batch_size, n),
        "qat_images_seen": cfg.qat.kd_steps * min(cfg.qat.batch_size, n),
        "seconds": {key: round(value, 2) for key, value in seconds.items()},
        "kd_loss_curve": curve, "device": str(compute.device), "config": as_dict(cfg),
    }
    if cfg.out:
        save_json(summary, cfg.out)
    return summary


def main(argv: Sequence[str] | None = None, read: BufferReader = read_chunks, doc: str = __doc__) -> None:
    """`python -m nayer.quantize` (and, with the shard reader, `python -m orchestrator.quantize`)."""
    from nayer import quantize  # the package docstring: what is quantized, and how

    cli(lambda cfg: run(cfg, read), argv, doc=f"{doc}\n{quantize.__doc__}", schema=QuantizeConfig)
