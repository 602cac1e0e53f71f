"""Benchmark: synthesis scaling over Ray actors and WebDataset buffer throughput on this machine.

    python -m bench.pipeline_speed                 # writes bench/results/pipeline_speed.{md,json}
    python -m bench.pipeline_speed --iterations 4 --batch-size 200

1. Synthesis images/s (kept images per second of wall time, the driver's view) with 1 and 2 Ray actors of one
   CPU each, the CIFAR-10 profile (ResNet-56 teacher, bs 200, g=10, bf16); plus 1 actor with 2 threads, the best
   a single process gets from both cores. Goal (issue 3): 2 actors >= 1.7x one.
2. Buffer: writing 20,000 32x32 images as shards (uint8 .npy samples, 5000 per shard, temporary name + rename +
   sha256) and reading them back through the streaming WebDataset reader (`shard_batches`), images/s and MB/s;
   bench/reader.py compares it with the resident share the ranks use.
Needs the real ResNet-56 in ../shared/data. Run on an idle machine.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
import time
from pathlib import Path

import ray
import torch

from bench.shared_data import TEACHER, require
from bench.storage import buffer_rates
from nayer.cli_config import parse_config
from nayer.lte import encode_labels
from nayer.models import build_model
from nayer.inputs import resolve_images
from orchestrator.cluster import start_local_ray
from orchestrator.config import PipelineConfig
from nayer.storage import open_storage
from orchestrator.faults import FaultPlan
from orchestrator.workers import SynthesisTask, SynthesisWorker, WorkerFiles

ROOT = Path(__file__).resolve().parents[1]


def synthesis_rate(cfg: PipelineConfig, teacher_state: dict, embeddings: torch.Tensor, workers: int, cpus: float,
                   iterations: int, buffer: str) -> dict:
    """Kept images per wall second for `workers` actors each running `iterations` adversarial iterations."""
    cfg.cluster.synth_cpus = cpus
    images, _ = resolve_images(cfg)
    store = open_storage(buffer)
    files = WorkerFiles(store, store, store.sub("states"))
    actors = [ray.remote(SynthesisWorker).options(num_cpus=cpus).remote(cfg, w, teacher_state, embeddings, images,
                                                                        files, FaultPlan())
              for w in range(workers)]
    student = build_model(cfg.student.arch, images.num_classes).state_dict()
    # round 0 warms up (first-call costs); round 1 continues from each actor's own state after it
    ray.get([a.synthesize.remote(SynthesisTask(0, False, 1, 1, False, -1, 0), student) for a in actors])
    start = time.perf_counter()
    out = ray.get([a.synthesize.remote(SynthesisTask(1, False, iterations, 1, False, 0, 0), student)
                   for a in actors])
    wall = time.perf_counter() - start
    for a in actors:
        ray.kill(a)
    images = workers * iterations * cfg.synthesis.batch_size
    return {"workers": workers, "cpus_per_worker": cpus, "images": images, "wall_s": wall,
            "images_per_s": images / wall, "compute_s": max(o.compute_time for o in out)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--iterations", type=int, default=3, help="timed iterations per actor")
    ap.add_argument("--batch-size", type=int, default=200)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    args = ap.parse_args()
    cfg = parse_config(PipelineConfig, [f"config={ROOT / 'configs/cifar10.yaml'},{ROOT / 'configs/profiles/cpu.yaml'}",
                                        f"synthesis.batch_size={args.batch_size}", "teacher.arch=resnet56"])
    require(TEACHER)
    names = list(resolve_images(cfg)[0].class_names)
    teacher = build_model("resnet56", len(names))
    teacher.load_state_dict(torch.load(TEACHER, map_location="cpu", weights_only=True))
    embeddings = encode_labels(names, dataclasses.replace(cfg.lte, cache_dir=str(ROOT / ".cache/lte")))
    start_local_ray(2, 1 << 30)
    results: dict = {"teacher": "real ResNet-56", "synthesis": []}
    with tempfile.TemporaryDirectory() as buffer:
        for workers, cpus in [(1, 1.0), (2, 1.0), (1, 2.0)]:
            row = synthesis_rate(cfg, teacher.state_dict(), embeddings, workers, cpus, args.iterations, buffer)
            results["synthesis"].append(row)
            print(row, flush=True)
    ray.shutdown()
    one, two, one_wide = results["synthesis"]
    results["speedup_2_vs_1"] = two["images_per_s"] / one["images_per_s"]
    results["speedup_2_vs_1_wide"] = two["images_per_s"] / one_wide["images_per_s"]
    with tempfile.TemporaryDirectory() as buffer:
        results["buffer"] = buffer_rates(buffer, 20000, 5000)
    print(results["buffer"])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "pipeline_speed.json").write_text(json.dumps(results, indent=1))
    b = results["buffer"]
    lines = [
        "# Pipeline speed on this machine (2 CPU cores)", "",
        f"Synthesis: CIFAR-10 profile, {results['teacher']} teacher, generator batch {args.batch_size}, "
        f"g={cfg.synthesis.g_steps}, bf16={cfg.bf16}, {args.iterations} timed iterations per actor "
        f"(after one untimed), adversarial term on.", "",
        "| actors | CPUs (threads) each | images | wall s | images/s |", "|---|---|---|---|---|",
        *[f"| {r['workers']} | {r['cpus_per_worker']:.0f} | {r['images']} | {r['wall_s']:.1f} | "
          f"{r['images_per_s']:.1f} |" for r in results["synthesis"]], "",
        f"- 2 actors vs 1 actor (1 CPU each): **{results['speedup_2_vs_1']:.2f}x** (goal >= 1.7x)",
        f"- 2 actors vs 1 actor with both cores as 2 threads: {results['speedup_2_vs_1_wide']:.2f}x", "",
        f"Buffer: {b['images']} images of 3x32x32 in {b['images'] // 5000} shards ({b['bytes'] / 1e6:.1f} MB)", "",
        f"- write (tar of .npy samples, temp name + rename + sha256): {b['write_images_per_s']:.0f} images/s, "
        f"{b['write_mb_per_s']:.1f} MB/s",
        f"- read (WebDataset reader, decode, shuffle buffer, batches of 256): {b['read_images_per_s']:.0f} images/s, "
        f"{b['read_mb_per_s']:.1f} MB/s",
    ]
    (out / "pipeline_speed.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
