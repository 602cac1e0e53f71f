"""Throughput of NAYER's two hot loops on this machine, per precision / memory format / torch.compile.

    python -m bench.speed                       # writes bench/results/speed.md
    python -m bench.speed --batch-gen 100 --steps 4

Synthesis = one generator step (G forward, augment, teacher forward with BN hooks, student forward, backward to
G, Adam step) with a CIFAR ResNet-56 teacher and ResNet-20 student (random weights: speed does not depend on
them). KD = one student step (teacher forward without grad, student forward + backward, SGD step).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from nayer.config import RunConfig
from nayer.kd import StudentTrainer
from nayer.models import build_model
from nayer.data import preset
from nayer.specs import Compute
from nayer.methods.base import SynthesisParts
from nayer.methods.nayer import NayerSynthesizer

ROOT = Path(__file__).resolve().parents[1]

CIFAR10 = preset("cifar10").image_spec()


def models(channels_last: bool):
    teacher = build_model("resnet56", 10).requires_grad_(False)
    for bn in teacher.modules():  # calibrate BN statistics: a random deep ResNet in eval mode overflows to NaN
        if isinstance(bn, torch.nn.BatchNorm2d):
            bn.momentum = None  # cumulative average: one pass gives the exact statistics
    with torch.no_grad():
        teacher(torch.randn(256, 3, 32, 32))
    teacher.eval()
    student = build_model("resnet20", 10)
    if channels_last:
        teacher, student = teacher.to(memory_format=torch.channels_last), student.to(memory_format=torch.channels_last)
    return teacher, student


def synthesis_rate(bf16: bool, channels_last: bool, batch: int, steps: int) -> float:
    cfg = RunConfig()
    cfg.synthesis.batch_size, cfg.synthesis.g_steps, cfg.synthesis.g_loops = batch, steps, 1
    teacher, student = models(channels_last)
    parts = SynthesisParts(teacher, student, torch.randn(10, 384), CIFAR10, Compute(torch.device("cpu"), bf16,
                                                                                      channels_last))
    syn = NayerSynthesizer(parts, cfg.generator, cfg.synthesis)
    syn.synthesize(warmup=False)  # warm-up: allocator, oneDNN primitive caches
    result = syn.synthesize(warmup=False)
    return batch * steps / result.stats["syn_time"]


def kd_rate(bf16: bool, channels_last: bool, compile_: bool, batch: int, steps: int) -> float:
    cfg = RunConfig()
    teacher, student = models(channels_last)
    trainer = StudentTrainer(student, teacher, cfg.kd, 10, CIFAR10, Compute(torch.device("cpu"), bf16, channels_last))
    if compile_:
        trainer.objective.student, trainer.objective.teacher = torch.compile(student), torch.compile(teacher)
    images = torch.randint(0, 256, (batch, 3, 32, 32), dtype=torch.uint8)
    for _ in range(2):  # includes compilation
        trainer.step(images)
    start = time.perf_counter()
    for _ in range(steps):
        trainer.step(images)
    return batch * steps / (time.perf_counter() - start)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch-gen", type=int, default=200)
    ap.add_argument("--batch-kd", type=int, default=256)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "speed.md"))
    args = ap.parse_args()
    rows = ["| loop | fp32 NCHW | fp32 channels_last | bf16 channels_last | bf16 channels_last + compile |",
            "|---|---|---|---|---|"]
    syn = [synthesis_rate(bf, cl, args.batch_gen, args.steps) for bf, cl in ((False, False), (False, True), (True, True))]
    rows.append(f"| synthesis, bs {args.batch_gen} (img-steps/s) | " + " | ".join(f"{v:.0f}" for v in syn) + " | - |")
    kd = [kd_rate(bf, cl, comp, args.batch_kd, args.steps)
          for bf, cl, comp in ((False, False, False), (False, True, False), (True, True, False), (True, True, True))]
    rows.append(f"| KD, bs {args.batch_kd} (img/s) | " + " | ".join(f"{v:.0f}" for v in kd) + " |")
    text = "\n".join([f"# NAYER hot loops on {torch.get_num_threads()} CPU threads (torch {torch.__version__})", "",
                      *rows, ""])
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
