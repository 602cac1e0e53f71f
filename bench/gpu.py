"""GPU benchmark (issue 16): NAYER's ImageNet loops against a plain ResNet-50 training step on the same GPU.

    python -m bench.gpu                  # on a GPU: writes bench/results/gpu-<gpu name>.{md,json}; < 8 min on one H200
    python -m bench.gpu --smoke          # tiny sizes on CPU (tests/test_gpu_bench.py runs it): the script known to
                                         # work before it ever meets a GPU; writes bench/results/gpu-smoke-cpu.*
    python -m bench.gpu --cpu            # the ImageNet shapes on this CPU, a few steps: bench/results/gpu-cpu.*
    python -m bench.gpu --out /tmp/x     # the results' file stem elsewhere (run folders in /tmp/runs/)

Rows, each with its peak device memory, FLOP per step (torch.utils.flop_counter, counted once on the eager step) and
FLOP/s:
1. synthesis image-steps/s: one NAYER generator step (G forward, roll + crop, teacher forward with the BN hooks,
   student forward for the adversarial term, backward to G, Adam) with the ResNet-50 teacher at 224 px, generator
   batch 50 and 256, bf16 autocast + channels_last, eager and `torch.compile`d (compile=true);
2. KD images/s: one student step (RandomResizedCrop + flip, teacher forward without grad, student forward and
   backward, SGD) for R50 -> R50 and R50 -> R18, eager and compiled;
3. the anchor: a plain torchvision ResNet-50 bf16 training step (channels_last, SGD, cross-entropy), images/s;
4. a 3-round ImageNet-shaped pipeline run (python -m orchestrator.run): 1 synthesis actor and 1 DeepSpeed rank sharing
   the device, the random-weight R50 teacher, a small JPEG val folder; the run folder is written under the results'
   stem. On a GPU this is the CUDA path end to end: NCCL, DeepSpeed on CUDA, bf16.
Targets (on the GPU, against the anchor of the same run): synthesis FLOP/s >= 70% of the anchor's; R50 -> R50 KD
images/s >= 80% of the anchor's; no compiled step slower than its eager one. Weights are random: speed does not
depend on them.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from nayer.run_report import read_metrics
from bench.random_models import BoundedTeacher, calibrate_bn, flops
from nayer.cli_config import parse_config
from nayer.config import RunConfig
from nayer.kd import StudentTrainer
from nayer.models import build_model
from nayer.specs import Compute, ImageSpec
from nayer.methods.base import SynthesisParts
from nayer.methods.nayer import NayerSynthesizer

ROOT = Path(__file__).resolve().parents[1]

CONFIG = ROOT / "configs" / "imagenet.yaml"
RESULTS = ROOT / "bench" / "results"


@dataclass(frozen=True)
class Sizes:
    """What one run of the benchmark measures: the full ImageNet shapes, or the tiny CPU smoke test's."""

    image: int
    classes: int
    teacher: str
    students: tuple[str, ...]
    syn_batches: tuple[int, ...]
    kd_batch: int
    steps: int  # timed steps per row (synthesis: in iterations of steps // 2 generator steps)
    warm: int  # untimed steps before them (compilation, allocator, cuDNN autotuning)
    compile: bool
    pipeline: tuple[str, ...]  # overrides of the 3-round pipeline run


FULL = Sizes(224, 1000, "tv_resnet50", ("tv_resnet50", "tv_resnet18"), (50, 256), 256, 10, 4, True,
             ("synthesis.g_steps=20", "synthesis.g_loops=2", "kd.kd_steps=50", "kd.batch_size=64",
              "cluster.synth_gpus=0.5", "cluster.trainer_gpus=0.5", "cluster.synth_cpus=4", "cluster.trainer_cpus=4",
              "bf16=true"))
# The full shapes on a CPU (no compile, one generator batch, a short pipeline): ratios to the anchor, not GPU speed.
CPU = Sizes(224, 1000, "tv_resnet50", ("tv_resnet50", "tv_resnet18"), (50,), 64, 2, 1, False,
            ("synthesis.batch_size=8", "synthesis.g_steps=2", "synthesis.g_loops=1", "kd.batch_size=8",
             "kd.kd_steps=2", "device=cpu", "bf16=true"))
SMOKE = Sizes(64, 1000, "tv_resnet18", ("tv_resnet18",), (4,), 4, 2, 2, True,
              ("data.image_size=64", "teacher.arch=tv_resnet18", "student.arch=tv_resnet18", "synthesis.batch_size=4",
               "synthesis.g_steps=2", "synthesis.g_loops=1", "kd.batch_size=4", "kd.kd_steps=2", "device=cpu",
               "bf16=false", "synthesis.metrics=false"))


@dataclass
class Row:
    name: str
    unit: str  # what `rate` counts per second
    rate: float
    step_s: float
    flop_per_step: float | None
    peak_gb: float | None
    notes: str = ""

    @property
    def flops(self) -> float | None:
        return self.flop_per_step / self.step_s if self.flop_per_step else None


@dataclass
class Bench:
    sizes: Sizes
    compute: Compute
    rows: list[Row] = field(default_factory=list)

    def sync(self) -> None:
        if self.compute.device.type == "cuda":
            torch.cuda.synchronize()

    def measure(self, name: str, unit: str, per_step: int, call, eager_call=None, steps_per_call: int = 1,
                notes: str = "") -> Row:
        """Untimed calls, then timed ones, `sizes.steps` steps in all (`call` runs `steps_per_call` steps); FLOP
        counted on one eager call (compiled code hides its ops from the counter)."""
        calls = max(1, self.sizes.steps // steps_per_call)
        flop = count_flops(eager_call or call)
        for _ in range(max(1, self.sizes.warm // steps_per_call)):
            call()
        self.sync()
        if self.compute.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        for _ in range(calls):
            call()
        self.sync()
        step_s = (time.perf_counter() - start) / (calls * steps_per_call)
        flop = flop / steps_per_call if flop else None
        peak = torch.cuda.max_memory_allocated() / 2 ** 30 if self.compute.device.type == "cuda" else None
        row = Row(name, unit, per_step / step_s, step_s, flop, peak, notes)
        self.rows.append(row)
        print(f"{name}: {row.rate:.1f} {unit}/s, {step_s * 1e3:.1f} ms/step"
              + (f", {row.flops / 1e12:.1f} TFLOP/s" if row.flops else ""), flush=True)
        return row


def count_flops(call) -> float | None:
    return float(flops(call)[0]) or None


def teacher_model(sizes: Sizes, compute: Compute) -> torch.nn.Module:
    """The random-weight teacher with its BN statistics set from noise and its logits bounded (as capacity.py's),
    frozen, on the device."""
    teacher = BoundedTeacher(calibrate_bn(build_model(sizes.teacher, sizes.classes), sizes.image))
    return compute.place(teacher.eval().requires_grad_(False))


def imagenet_cfg(sizes: Sizes, *overrides: str) -> RunConfig:
    return parse_config(RunConfig, [f"config={CONFIG}", "teacher.weights=", f"data.image_size={sizes.image}",
                                    "synthesis.metrics=false", *overrides])


def synthesis_rows(bench: Bench, spec: ImageSpec, teacher: torch.nn.Module) -> None:
    sizes = bench.sizes
    g = max(1, sizes.steps // 2)  # generator steps per iteration: the per-iteration work (fresh Adam, noisy
    for batch in sizes.syn_batches:  # layers re-drawn, kept batch to the host) counts, as it does at g = 100
        eager_syn = None
        for compiled in ((False, True) if sizes.compile else (False,)):
            cfg = imagenet_cfg(sizes, f"synthesis.batch_size={batch}", f"synthesis.g_steps={g}")
            compute = Compute(bench.compute.device, bench.compute.bf16, bench.compute.channels_last, compiled)
            student = compute.place(build_model(sizes.students[0], sizes.classes))
            parts = SynthesisParts(teacher, student, torch.randn(sizes.classes, 512), spec, compute)
            syn = NayerSynthesizer(parts, cfg.generator, cfg.synthesis)
            eager_syn = eager_syn or syn

            def iteration(s=syn):
                s.synthesize(warmup=False, loops=1)  # g generator steps; a_adv > 0: the student's forward too
            bench.measure(f"synthesis {sizes.teacher} bs {batch}{' compiled' if compiled else ''}", "image-steps",
                          batch, iteration, lambda s=eager_syn: s.synthesize(warmup=False, loops=1), g)
            if syn is not eager_syn:
                syn.bn_loss.remove()  # the shared teacher keeps no hooks of finished rows (KD runs hook-free)
        eager_syn.bn_loss.remove()


def kd_rows(bench: Bench, spec: ImageSpec, teacher: torch.nn.Module) -> None:
    sizes = bench.sizes
    cfg = imagenet_cfg(sizes)
    images = torch.randint(0, 256, (sizes.kd_batch, 3, sizes.image, sizes.image), dtype=torch.uint8)
    for arch in sizes.students:
        student = bench.compute.place(build_model(arch, sizes.classes))
        trainer = StudentTrainer(student, teacher, cfg.kd, 10, spec, bench.compute)
        eager = lambda t=trainer: t.step(images)  # noqa: E731
        label = f"KD {sizes.teacher} -> {arch} bs {sizes.kd_batch}"
        bench.measure(label, "images", sizes.kd_batch, eager)
        if sizes.compile:
            compiled = StudentTrainer(student, teacher, cfg.kd, 10, spec, bench.compute)
            compiled.objective.student, compiled.objective.teacher = torch.compile(student), torch.compile(teacher)
            bench.measure(label + " compiled", "images", sizes.kd_batch, lambda t=compiled: t.step(images), eager)


def anchor_row(bench: Bench) -> Row:
    """A plain torchvision ResNet-50 training step: bf16 autocast, channels_last, SGD, cross-entropy."""
    sizes, compute = bench.sizes, bench.compute
    model = compute.place(build_model("tv_resnet50", sizes.classes)).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    x = compute.layout(torch.randn(sizes.kd_batch, 3, sizes.image, sizes.image, device=compute.device))
    y = torch.randint(0, sizes.classes, (sizes.kd_batch,), device=compute.device)

    def step():
        with compute.autocast():
            loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return bench.measure(f"anchor: torchvision ResNet-50 train step bs {sizes.kd_batch}", "images", sizes.kd_batch,
                         step)


def pipeline_row(bench: Bench, out: Path) -> dict:
    """The 3-round ImageNet-shaped pipeline run in its own process; returns what its run folder says."""
    from PIL import Image

    from nayer.data import imagenet_wnids

    val = out.parent / "runs" / f"{out.name}-val"
    rng = np.random.default_rng(0)
    for wnid in imagenet_wnids()[:4]:
        (val / wnid).mkdir(parents=True, exist_ok=True)
        for i in range(4):
            Image.fromarray(rng.integers(0, 256, (300, 260, 3), dtype=np.uint8)).save(val / wnid / f"{i}.JPEG")
    runs = out.parent / "runs" / out.name
    args = [sys.executable, "-m", "orchestrator.run", f"config={CONFIG}", "teacher.weights=", "name=pipeline",
            f"out_dir={runs}", "epochs=3", "warmup=0", "lte.encoder=sbert", f"lte.cache_dir={runs / 'lte'}",
            f"data.eval={val}", "cluster.synth_workers=1", "cluster.trainer_workers=1", "resume=false",
            *bench.sizes.pipeline]
    if (runs / "pipeline").exists():
        import shutil
        shutil.rmtree(runs / "pipeline")
    start = time.perf_counter()
    watch = DeviceMemoryWatch() if bench.compute.device.type == "cuda" else None
    try:  # bounded: a hung Ray start or NCCL init must not eat the device's time
        proc = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=420,
                              env={**os.environ, "HF_HUB_OFFLINE": "1"})
    except subprocess.TimeoutExpired as timeout:
        proc = subprocess.CompletedProcess(args, 124, str(timeout.stdout or ""), "timed out after 420 s")
    wall = time.perf_counter() - start
    peak = watch.stop() if watch is not None else None
    print(proc.stdout[-3000:], proc.stderr[-3000:] if proc.returncode else "", flush=True)
    summary_file = runs / "pipeline" / "summary.json"
    summary = json.loads(summary_file.read_text()) if summary_file.is_file() else {}
    records = read_metrics(runs / "pipeline") if (runs / "pipeline" / "metrics.jsonl").is_file() else []
    return {"returncode": proc.returncode, "wall_s": wall, "rounds": len([r for r in records if "epoch" in r]),
            "final_top1": summary.get("final_top1"), "teacher_top1": summary.get("teacher_top1"),
            "buffer_images": summary.get("buffer_images"), "folder": str(runs / "pipeline"),
            "peak_device_gb": peak, "command": " ".join(args[1:])}


class DeviceMemoryWatch:
    """The device's peak memory in use (all processes: the actor's and the rank's) while the pipeline runs, from
    cudaMemGetInfo every 0.2 s; this process's own share, held before, is subtracted."""

    def __init__(self):
        import threading

        free, self.total = torch.cuda.mem_get_info()
        self.before = self.total - free
        self.peak = self.before
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._poll, daemon=True)
        self.thread.start()

    def _poll(self) -> None:
        while not self.done.wait(0.2):
            free, _ = torch.cuda.mem_get_info()
            self.peak = max(self.peak, self.total - free)

    def stop(self) -> float:
        self.done.set()
        self.thread.join()
        return (self.peak - self.before) / 2 ** 30


def write_results(bench: Bench, pipeline: dict, out: Path, device_name: str, wall: float) -> None:
    anchor = next(r for r in bench.rows if r.name.startswith("anchor"))
    lines = [f"# NAYER on ImageNet shapes: {device_name}", "",
             f"`python -m bench.gpu {' '.join(sys.argv[1:])}` (torch {torch.__version__}, "
             f"bf16 autocast {'on' if bench.compute.bf16 else 'off'}, channels_last, random weights; "
             f"{bench.sizes.steps} timed steps after {bench.sizes.warm} untimed; whole script {wall:.0f} s).", "",
             "| row | rate | ms/step | GFLOP/step | TFLOP/s | of anchor FLOP/s | of anchor images/s | peak GiB |",
             "|---|---|---|---|---|---|---|---|"]
    for r in bench.rows:
        of_flops = f"{r.flops / anchor.flops * 100:.0f}%" if r.flops and anchor.flops else "-"
        of_rate = f"{r.rate / anchor.rate * 100:.0f}%" if r.unit == "images" else "-"
        lines.append(f"| {r.name} | {r.rate:.1f} {r.unit}/s | {r.step_s * 1e3:.1f} | "
                     f"{r.flop_per_step / 1e9:.1f} | {r.flops / 1e12:.2f} | {of_flops} | {of_rate} | "
                     f"{'-' if r.peak_gb is None else f'{r.peak_gb:.1f}'} |" if r.flop_per_step else
                     f"| {r.name} | {r.rate:.1f} {r.unit}/s | {r.step_s * 1e3:.1f} | - | - | - | {of_rate} | - |")
    lines += ["", "## Targets", ""]
    for check, met in targets(bench.rows, anchor):
        lines.append(f"- {'met' if met else 'MISSED'}: {check}")
    lines += ["", "## 3-round pipeline run", "",
              f"`python {pipeline['command']}`", "",
              f"exit {pipeline['returncode']}, {pipeline['wall_s']:.0f} s wall, {pipeline['rounds']} rounds logged, "
              f"{pipeline['buffer_images']} buffer images, teacher top-1 {pipeline['teacher_top1']}, student top-1 "
              f"{pipeline['final_top1']} (random weights: the numbers prove the path, not accuracy)"
              + (f"; peak device memory of its processes {pipeline['peak_device_gb']:.1f} GiB"
                 if pipeline.get("peak_device_gb") is not None else "") + ".", ""]
    out.with_suffix(".md").write_text("\n".join(lines))
    out.with_suffix(".json").write_text(json.dumps({"device": device_name, "sizes": asdict(bench.sizes),
                                                    "rows": [{**asdict(r), "flops": r.flops} for r in bench.rows],
                                                    "pipeline": pipeline, "wall_s": wall}, indent=1))
    print("\n".join(lines))


def targets(rows: list[Row], anchor: Row) -> list[tuple[str, bool]]:
    checks = []
    for r in rows:
        if r.name.startswith("synthesis") and r.flops and anchor.flops:
            checks.append((f"{r.name}: {r.flops / anchor.flops * 100:.0f}% of the anchor's FLOP/s (>= 70%)",
                           r.flops >= 0.7 * anchor.flops))
        if r.name.startswith("KD") and "resnet50 -> tv_resnet50" in r.name:
            checks.append((f"{r.name}: {r.rate / anchor.rate * 100:.0f}% of the anchor's images/s (>= 80%)",
                           r.rate >= 0.8 * anchor.rate))
        if r.name.endswith(" compiled"):
            eager = next((e for e in rows if e.name == r.name[:-len(" compiled")]), None)
            if eager is not None:
                checks.append((f"{r.name}: {r.rate / eager.rate:.2f}x its eager step (>= 1)", r.rate >= eager.rate))
    return checks


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="tiny sizes on CPU: proves the script, measures nothing")
    ap.add_argument("--cpu", action="store_true", help="the ImageNet shapes on this CPU (a few steps, no compile)")
    ap.add_argument("--no-compile", action="store_true", help="leave out the compiled rows")
    ap.add_argument("--out", default="", help="results file stem (default bench/results/gpu-<device name>)")
    args = ap.parse_args()
    started = time.perf_counter()
    on_cpu = args.smoke or args.cpu
    sizes = SMOKE if args.smoke else CPU if args.cpu else FULL
    if args.no_compile:
        sizes = Sizes(**{**asdict(sizes), "compile": False})
    if not on_cpu and not torch.cuda.is_available():
        sys.exit("error: no CUDA device here; `python -m bench.gpu --smoke` checks the script on CPU, --cpu measures "
                 "the ImageNet shapes there")
    device = torch.device("cpu" if on_cpu else "cuda")
    compute = Compute.select(str(device), bf16=not args.smoke, channels_last=True)
    name = torch.cuda.get_device_name(0) if device.type == "cuda" else "smoke-cpu" if args.smoke else "cpu"
    out = Path(args.out) if args.out else RESULTS / f"gpu-{name.lower().replace(' ', '-')}"
    out.parent.mkdir(parents=True, exist_ok=True)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    torch.manual_seed(0)
    bench = Bench(sizes, compute)
    spec = ImageSpec(tuple(str(i) for i in range(sizes.classes)), sizes.image, (0.485, 0.456, 0.406),
                     (0.229, 0.224, 0.225))
    teacher = teacher_model(sizes, compute)
    anchor_row(bench)
    synthesis_rows(bench, spec, teacher)
    kd_rows(bench, spec, teacher)
    del teacher
    import gc
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()  # the pipeline's actor and rank are other processes on the same device
    pipeline = pipeline_row(bench, out)
    write_results(bench, pipeline, out, name, time.perf_counter() - started)
    if pipeline["returncode"] != 0:
        sys.exit(f"error: the pipeline run failed (exit {pipeline['returncode']}); see its output above")


if __name__ == "__main__":
    main()
