"""Capacity plan for NAYER on ImageNet at 8, 64 and 512 GPUs, built from per-image costs measured on this machine.

    python -m bench.capacity                                   # measure (~1.5 min on 2 idle cores) + plan
    python -m bench.capacity --plan-only --gpu-util 0.2        # re-plan from results/capacity.json, other assumptions
    python -m bench.capacity --threads 1 --max-load 1.0 --max-wait 600 --scales 8 64 512

Writes bench/results/capacity.{json,md}. docs/scaling.md explains the plan.

Measured with the project's own code (random weights: the cost does not depend on them):
  * FLOPs (torch.utils.flop_counter: matmuls and convolutions, forward and backward) of one generator step of a real
    `NayerSynthesizer` (adversarial round), of one `KDObjective` step and of `evaluate`, per image;
  * CPU seconds per image of the same steps (fp32 and bf16 autocast, `--threads` threads), each timing preceded by a
    load check: the 1-min load average must be <= --max-load (polled every 20 s, up to --max-wait s); the load and the
    cores other processes kept busy during the timing (/proc/stat minus this process) are recorded with it;
  * shard bytes per image (`write_shards`), per-rank reader images/s (`shard_batches`), manifest bytes per entry;
  * checkpoint sizes: synthesizer state (generator + noisy layers + BN EMA), student, teacher, student + SGD state.
Settings: configs/imagenet.yaml with a ResNet-50 -> ResNet-18 student at 224 px (docs/scaling.md's setting) and, as a
cross-check against the measured pipeline round, the CIFAR-10 benchmark's config (configs/cifar10.yaml +
profiles/cpu.yaml, ResNet-56 -> ResNet-20, 32 px).
The plan turns the ImageNet numbers into GPU time with the ASSUMPTIONS given as options (GPU peak and utilization,
per-step overhead, bandwidths); nothing in it was measured on a GPU. It models a round of the pipeline as the code
runs it (each rank holds its share of the buffer and reads each new shard once, in a loader thread; each actor writes
its own state file; evaluation is sharded over the ranks) under both schedules: overlapped (the cluster default on
GPUs: the ranks train round r while the actors synthesize round r+1) and alternating (cluster.schedule=alternating),
and searches the synthesis : trainer split for each. --plan-only reads the measured costs from results/capacity.json
and only re-plans.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import pickle
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from bench.random_models import BoundedTeacher, calibrate_bn, flops
from nayer.cli_config import parse_config
from nayer.data import LabeledImages
from nayer.evaluate import evaluate
from nayer.inputs import resolve_images
from nayer.kd import KDObjective, StudentTrainer
from nayer.methods.base import SynthesisParts
from nayer.methods.nayer import NayerSynthesizer
from nayer.models import build_model
from nayer.specs import Compute
from orchestrator.config import ClusterConfig, PipelineConfig
from orchestrator.shards import MANIFEST, Manifest, shard_batches, write_shards

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
CPU = Compute(torch.device("cpu"))
# flop_batch: FLOPs are counted at b and 2b and fitted as fixed + per-image (the K-to-1 noisy layer pads its matmul
# to K rows, a per-batch cost), then taken at the config's batch. time_batch / kd_batch: CPU timing batches (ImageNet
# small to stay within minutes; CIFAR = the pipeline benchmark's generator batch and per-rank micro-batch).
SETTINGS = {
    # docs/scaling.md's settings: R50 -> R18 and the spec's Table 5 generator body (configs/imagenet.yaml is now
    # R50 -> R50 with the reference's body, 3.06 instead of 3.72 GMAC per image)
    "imagenet": dict(argv=[f"config={ROOT}/configs/imagenet.yaml", "student.arch=tv_resnet18",
                           "generator.body=imagenet_paper", "epochs=100", "synthesis.targets=balanced",
                           "kd.crop=pad", "synthesis.crop_padding=16"], flop_batch=2, time_batch=8, kd_batch=8,
                     time_steps=2, reader_images=1024, reader_batch=16),
    "cifar10": dict(argv=[f"config={ROOT}/configs/cifar10.yaml,{ROOT}/configs/profiles/cpu.yaml",
                          "teacher.arch=resnet56", "student.arch=resnet20"], flop_batch=10, time_batch=200,
                    kd_batch=128, time_steps=3, reader_images=8192, reader_batch=128),
}
EMB_DIM = {"clip": 512, "sbert": 384}  # label-embedding width of the configs' encoders (ViT-B-32, MiniLM)


# ---------------------------------------------------------------------------------------------------- machine load
def cpu_jiffies() -> tuple[int, int]:
    """(busy, total) jiffies of all cores since boot, from /proc/stat."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    return sum(fields) - idle, sum(fields)


def timed(fn, units: int, args: argparse.Namespace) -> dict:
    """Wait for a quiet machine, run `fn` once, return seconds per unit with the load it ran under."""
    waited, load = 0.0, os.getloadavg()[0]
    while load > args.max_load and waited < args.max_wait:
        print(f"  load {load:.2f} > {args.max_load}: waiting 20 s", flush=True)
        time.sleep(20)
        waited, load = waited + 20, os.getloadavg()[0]
    busy0, total0 = cpu_jiffies()
    cpu0, t0 = time.process_time(), time.perf_counter()
    fn()
    wall = time.perf_counter() - t0
    busy1, total1 = cpu_jiffies()
    cores_busy = (busy1 - busy0) / max(total1 - total0, 1) * os.cpu_count()
    return {"s_per_unit": wall / units, "wall_s": wall, "units": units, "load1_before": round(load, 2),
            "waited_s": waited, "other_cores_busy": round(max(cores_busy - (time.process_time() - cpu0) / wall, 0), 2)}


# ---------------------------------------------------------------------------------------------------- measurements
def file_bytes(obj, path: Path) -> int:
    torch.save(obj, path)
    return path.stat().st_size


def measure_flops(spec: dict, cfg: PipelineConfig, synthesizer, student, teacher, images) -> tuple[dict, dict]:
    """FLOPs per image of a generator step (with the generator's and the adversarial student's shares), of a KD step
    and of evaluation; and a filled BN EMA, for the synthesizer state's size."""
    small, batch_size = spec["flop_batch"], cfg.synthesis.batch_size
    counts = {}
    # one adversarial generator step (warmup=False: the student's forward and its input gradient count)
    for batch in (small, 2 * small):
        synth = synthesizer(batch, bf16=False)
        counts[batch], by_module = flops(lambda: synth.synthesize(warmup=False, loops=1))
        synth.bn_loss.remove()
    per_image = (counts[2 * small] - counts[small]) / small  # the slope of the fit fixed + per-image (SETTINGS)
    per_image_step = per_image + (counts[small] - per_image * small) / batch_size  # at the config's generator batch
    # the same step without the adversarial term: the student's share is what that leaves out
    synth = synthesizer(2 * small, bf16=False)
    no_adversarial = flops(lambda: synth.synthesize(warmup=True, loops=1))[0]
    bn_ema = synth.bn_loss.state_dict()
    synth.bn_loss.remove()
    objective = KDObjective(student, teacher, cfg.kd, images, CPU)
    batch = torch.randint(0, 256, (spec["kd_batch"], 3, images.size, images.size), dtype=torch.uint8)
    kd_per_image = flops(lambda: objective(batch).backward())[0] / len(batch)
    eval_set = LabeledImages(np.random.randint(0, 256, (8, images.size, images.size, 3), dtype=np.uint8),
                             np.zeros(8, dtype=np.int64))
    eval_per_image = flops(lambda: evaluate(student, eval_set, images, CPU, 8))[0] / 8
    return {"synthesis_per_image_step": per_image_step,
            "synthesis_generator_share": by_module["NayerGenerator"] / counts[2 * small],
            "synthesis_student_share": 1 - no_adversarial / counts[2 * small],
            "synthesis_per_kept_image": per_image_step * cfg.synthesis.g_steps, "kd_per_image": kd_per_image,
            "eval_per_image": eval_per_image}, bn_ema


def measure_buffer(name: str, spec: dict, cfg: PipelineConfig, image_size: int, classes: int,
                   args: argparse.Namespace, tmp: Path) -> dict:
    """Shard bytes per image (`write_shards`), one rank's reader speed (`shard_batches`, files in the page cache),
    and the manifest's bytes and save time per entry."""
    count = spec["reader_images"]
    images = torch.randint(0, 256, (count, 3, image_size, image_size), dtype=torch.uint8)
    entries = write_shards(tmp / f"buffer-{name}", 0, 0, images, torch.randint(0, classes, (count,)),
                           cfg.cluster.shard_samples, min_shards=2)
    manifest = Manifest(tmp / f"buffer-{name}")
    manifest.commit(entries)
    # two passes: with_epoch repeats them, as a rank does when S x mb exceeds its shards
    batches = 2 * count // spec["reader_batch"]
    reader = timed(lambda: sum(1 for _ in shard_batches(manifest.store, manifest.snapshot(), spec["reader_batch"],
                                                        batches, 0, cfg.cluster.shuffle_buffer)),
                   batches * spec["reader_batch"], args)
    # 100 rounds of these entries, as the driver's manifest holds them after 100 rounds: bytes and save time per entry
    folder = tmp / f"manifest-{name}"
    many = Manifest(folder, shards=[dataclasses.replace(entry, round=r, seq=len(entries) * r + i)
                                    for r in range(100) for i, entry in enumerate(entries)])
    start = time.perf_counter()
    many.save()
    save_s = time.perf_counter() - start
    return {"bytes": {"shard_per_image": sum(entry.bytes for entry in entries) / count,
                      "manifest_per_entry": (folder / MANIFEST).stat().st_size / len(many.shards),
                      "snapshot_per_entry_pickled": len(pickle.dumps(many.snapshot())) / len(many.shards)},
            "manifest_save_s_per_entry": save_s / len(many.shards), "reader": reader}


def measure_setting(name: str, spec: dict, args: argparse.Namespace, tmp: Path) -> dict:
    cfg = parse_config(PipelineConfig, spec["argv"])
    images, _ = resolve_images(cfg)
    size, classes = images.size, images.num_classes
    compute = Compute(torch.device("cpu"), channels_last=cfg.channels_last)
    embeddings = torch.randn(classes, EMB_DIM[cfg.lte.encoder])
    teacher = BoundedTeacher(calibrate_bn(build_model(cfg.teacher.arch, classes), size)).eval().requires_grad_(False)
    student = calibrate_bn(build_model(cfg.student.arch, classes), size)
    if cfg.channels_last:  # as the synthesis workers and DeepSpeed ranks hold them
        teacher, student = (net.to(memory_format=torch.channels_last) for net in (teacher, student))
    syn_cfg = cfg.synthesis

    def synthesizer(batch: int, bf16: bool) -> NayerSynthesizer:
        parts = SynthesisParts(teacher, student, embeddings, images, dataclasses.replace(compute, bf16=bf16))
        return NayerSynthesizer(parts, cfg.generator, dataclasses.replace(syn_cfg, batch_size=batch, g_steps=1))

    print(f"[{name}] FLOPs", flush=True)
    flop_counts, bn_ema = measure_flops(spec, cfg, synthesizer, student, teacher, images)

    print(f"[{name}] checkpoint sizes", flush=True)
    synth = synthesizer(syn_cfg.batch_size, bf16=False)  # at the config's batch: the noisy-layer count depends on it
    synth.bn_loss.load_state_dict(bn_ema)  # a filled BN EMA, as after the first iteration of a run
    sizes = {"synthesizer_state": file_bytes(synth.state_dict(), tmp / "syn.pt"),
             "generator_params": sum(p.numel() for p in synth.generator.parameters()),
             "student_state": file_bytes(student.state_dict(), tmp / "student.pt"),
             "teacher_state": file_bytes(teacher.net.state_dict(), tmp / "teacher.pt"),
             "student_params": sum(p.numel() for p in student.parameters())}
    synth.bn_loss.remove()

    print(f"[{name}] CPU timings ({args.threads} thread(s))", flush=True)
    timings = {}
    for bf16 in (False, True):
        tag = "bf16" if bf16 else "fp32"
        synth = synthesizer(spec["time_batch"], bf16)
        synth.synthesize(warmup=False, loops=1)  # warm-up step (allocations, oneDNN primitive caches)
        synth.cfg = dataclasses.replace(synth.cfg, g_steps=spec["time_steps"])
        timings[f"synthesis_{tag}"] = timed(lambda: synth.synthesize(warmup=False, loops=1),
                                            spec["time_steps"] * spec["time_batch"], args)
        synth.bn_loss.remove()
        # lr 0: KD on noise diverges at the configs' rates (NaN check); SGD does the same work at any rate
        trainer = StudentTrainer(student, teacher, dataclasses.replace(cfg.kd, lr=0.0), cfg.epochs, images,
                                 dataclasses.replace(compute, bf16=bf16))
        batch = torch.randint(0, 256, (spec["kd_batch"], 3, size, size), dtype=torch.uint8)
        trainer.step(batch)
        timings[f"kd_{tag}"] = timed(lambda: [trainer.step(batch) for _ in range(spec["time_steps"])],
                                     spec["time_steps"] * spec["kd_batch"], args)
        for key in (f"synthesis_{tag}", f"kd_{tag}"):
            print(f"  {key}: {timings[key]['s_per_unit'] * 1e3:.1f} ms/image (load {timings[key]['load1_before']}, "
                  f"other cores busy {timings[key]['other_cores_busy']})", flush=True)
    # the DeepSpeed ZeRO-0 checkpoint holds the module and the client optimizer (SGD momentum after a step)
    sizes["student_and_sgd_state"] = file_bytes({"module": student.state_dict(),
                                                 "optimizer": trainer.optimizer.state_dict()}, tmp / "ds.pt")

    print(f"[{name}] shards, reader, manifest", flush=True)
    buffer = measure_buffer(name, spec, cfg, size, classes, args, tmp)
    return {
        "config": " ".join(spec["argv"]).replace(f"{ROOT}/", ""), "image_size": size, "classes": classes,
        "teacher": cfg.teacher.arch, "student": cfg.student.arch,
        "synthesis_batch": syn_cfg.batch_size, "g_steps": syn_cfg.g_steps, "g_loops": syn_cfg.g_loops,
        "kd_batch": cfg.kd.batch_size, "kd_steps": cfg.kd.kd_steps, "epochs": cfg.epochs,
        "shard_samples": cfg.cluster.shard_samples, "flops": flop_counts, "bytes": {**buffer["bytes"], **sizes},
        "manifest_save_s_per_entry": buffer["manifest_save_s_per_entry"],
        "cpu": {**timings, "reader": buffer["reader"], "threads": args.threads},
    }


# ---------------------------------------------------------------------------------------------------- the plan
GB = 1e9  # the bandwidth options are in GB/s
GIB = 2 ** 30  # cluster.rank_buffer_gb and rank_buffer_device_gb are GiB (orchestrator/resident.py)
# cluster.schedule values modeled: overlapped is what the default (auto) picks when both pools have GPUs
SCHEDULES = ("overlapped", "alternating")
PATHS = ("synthesis", "KD", "serial")  # the actors, the DeepSpeed ranks, the driver


def gpu_flops_per_s(assume: argparse.Namespace) -> float:
    return assume.gpu_tflops * 1e12 * assume.gpu_util


def micro_batch_for(measured: dict, trainer_gpus: int, assume: argparse.Namespace) -> int | None:
    """KD images per rank: the paper's batch split over the ranks while that leaves each at least
    --min-micro-batch, else --min-micro-batch (the batch grows with the ranks); None for a split the code rejects."""
    paper_batch = measured["kd_batch"]
    if trainer_gpus > paper_batch // assume.min_micro_batch:
        return assume.min_micro_batch
    if paper_batch % trainer_gpus:
        return None  # orchestrator/config.py: kd.batch_size must be divisible by cluster.trainer_workers
    return paper_batch // trainer_gpus


def round_recipe(measured: dict, synth_gpus: int, trainer_gpus: int, merged: int,
                 assume: argparse.Namespace) -> dict | None:
    """The config of one option (the recipe rule of `round_model`) and its counts per round; None for a split the
    code would reject or that leaves synthesis GPUs idle."""
    micro_batch = micro_batch_for(measured, trainer_gpus, assume)
    g_loops = measured["g_loops"] * merged
    new_images = g_loops * measured["synthesis_batch"]
    # workers.split_iterations gives actors beyond g_loops nothing to do; trainer.py: in the first KD round every
    # rank needs a micro-batch of samples
    if micro_batch is None or synth_gpus > g_loops or new_images < trainer_gpus * micro_batch:
        return None
    kd_batch = micro_batch * trainer_gpus
    kd_steps = round(measured["kd_steps"] * measured["kd_batch"] * merged / kd_batch)
    epochs = math.ceil(measured["epochs"] / merged)
    iterations = math.ceil(g_loops / synth_gpus)  # of the busiest actor
    # the actors write at least one shard per rank between them (min_shards): every rank gets a shard of every round
    shards_per_round = synth_gpus * max(math.ceil(iterations * measured["synthesis_batch"] / measured["shard_samples"]),
                                        math.ceil(trainer_gpus / synth_gpus))
    return {"synth_gpus": synth_gpus, "trainer_gpus": trainer_gpus, "rounds_merged": merged, "g_loops": g_loops,
            "epochs": epochs, "kd_batch": kd_batch, "micro_batch": micro_batch, "kd_steps": kd_steps,
            # a streamed share's reader decodes this many images per round that it never trains on (the buffer fill)
            "shuffle_buffer": min(2000, kd_steps * micro_batch // 10),
            # bf16 gradients halve the cross-node all-reduce
            "deepspeed": "zero0" if trainer_gpus <= assume.gpus_per_node else "zero2_bf16",
            "new_images": new_images, "iterations_per_actor": iterations, "shards_per_round": shards_per_round,
            "manifest_entries_end": shards_per_round * epochs}


def share_residency(measured: dict, recipe: dict, assume: argparse.Namespace) -> dict:
    """A rank's share (shard seq % ranks) at the end of the run, and where orchestrator/resident.py holds it: its
    uint8 images within cluster.rank_buffer_device_gb on the GPU, else its shard bytes within cluster.rank_buffer_gb
    in host memory, else it streams from storage every round."""
    epochs, new_images, trainer_gpus = recipe["epochs"], recipe["new_images"], recipe["trainer_gpus"]
    share_bytes = epochs * (new_images * measured["bytes"]["shard_per_image"]) / trainer_gpus
    share_image_bytes = epochs * new_images * (3 * measured["image_size"] ** 2) / trainer_gpus
    where = ("device" if share_image_bytes <= assume.rank_buffer_device_gb * GIB else
             "host" if share_bytes <= assume.rank_buffer_gb * GIB else "streams")
    return {"share_per_rank_end": share_bytes, "share_images_per_rank_end": share_image_bytes, "share_resident": where}


def synthesis_terms(measured: dict, recipe: dict, assume: argparse.Namespace) -> dict[str, float]:
    """Seconds of each step on the actors' path of a round, in order."""
    flop_counts, sizes = measured["flops"], measured["bytes"]
    synth_gpus, trainer_gpus, new_images = recipe["synth_gpus"], recipe["trainer_gpus"], recipe["new_images"]
    generator_steps = recipe["iterations_per_actor"] * measured["g_steps"]
    new_bytes, state_bytes = new_images * sizes["shard_per_image"], sizes["synthesizer_state"]
    storage_bps, objstore_bps = assume.storage_gbs * GB, assume.objstore_gbs * GB
    reader_images_per_s = 1 / measured["cpu"]["reader"]["s_per_unit"]  # one core per rank (measured)
    return {
        "student broadcast to actors": sizes["student_state"] * synth_gpus / objstore_bps,
        "synthesis compute": generator_steps * measured["synthesis_batch"] * flop_counts["synthesis_per_image_step"]
        / gpu_flops_per_s(assume),
        "synthesis step overhead": generator_steps * (assume.step_overhead_ms / 1e3),
        "shard write": new_bytes / storage_bps,
        # every actor writes at once: one writer's bandwidth or the shared filesystem's, whichever limits
        "synthesizer states (each actor its file)": max(state_bytes / (assume.ckpt_gbs * GB),
                                                        synth_gpus * state_bytes / storage_bps),
        "manifest commit + new entries to the ranks":
            recipe["manifest_entries_end"] * measured["manifest_save_s_per_entry"]
            + recipe["shards_per_round"] * sizes["snapshot_per_entry_pickled"] * (1 + trainer_gpus) / objstore_bps,
        # the loader threads read and verify the new shards as they are committed; the next KD round waits for
        # them, so this ends the synthesis path
        "new shards read once (loader thread)": max(new_images / trainer_gpus / reader_images_per_s,
                                                    new_bytes / storage_bps),
    }


def kd_terms(measured: dict, recipe: dict, resident: str, assume: argparse.Namespace) -> dict[str, float]:
    """Seconds of each step on the ranks' path of a round, in order; `resident`: where a rank's share is held."""
    flop_counts, sizes = measured["flops"], measured["bytes"]
    trainer_gpus, steps, micro_batch = recipe["trainer_gpus"], recipe["kd_steps"], recipe["micro_batch"]
    rate = gpu_flops_per_s(assume)
    gradient_bytes = sizes["student_params"] * (2 if recipe["deepspeed"] == "zero2_bf16" else 4)
    ring_gbs = assume.intranode_gbs if trainer_gpus <= assume.gpus_per_node else assume.allreduce_gbs
    step_loop = {"KD compute": steps * micro_batch * flop_counts["kd_per_image"] / rate,
                 "KD step overhead": steps * (assume.step_overhead_ms / 1e3),
                 "KD all-reduce": steps * 2 * (trainer_gpus - 1) / trainer_gpus * gradient_bytes / (ring_gbs * GB)}
    reader_images_per_s = 1 / measured["cpu"]["reader"]["s_per_unit"]  # one core per rank (measured)
    # a streamed share: the rank decodes its batches and the shuffle fill every round, behind a prefetch thread
    reread_s = (steps * micro_batch + recipe["shuffle_buffer"]) / reader_images_per_s
    batches_s = {"device": 0.0,  # an on-device gather
                 "host": steps * micro_batch * 3 * measured["image_size"] ** 2 / (assume.h2d_gbs * GB),  # a copy each
                 "streams": max(0.0, reread_s - sum(step_loop.values()))}[resident]  # what the steps cannot hide
    return {**step_loop, f"KD batches ({resident})": batches_s,
            "eval sharded over the ranks": assume.eval_images / trainer_gpus * flop_counts["eval_per_image"] / rate,
            "DeepSpeed checkpoint (ranks)": sizes["student_and_sgd_state"] / (assume.ckpt_gbs * GB)}


def round_time(seconds: dict[str, float], path: dict[str, str], schedule: str, epochs: int) -> dict:
    """A round's length from its terms. alternating: their sum. overlapped (the ranks train round r while the actors
    synthesize round r+1): the longer of the synthesis and KD paths plus the serial part; the first synthesis and
    the last KD round run alone. The first bottleneck: the largest non-compute term on the critical path."""
    path_s = {name: sum(s for term, s in seconds.items() if path[term] == name) for name in PATHS}
    if schedule == "overlapped":
        binding = max(("synthesis", "KD"), key=path_s.get)
        round_s = path_s[binding] + path_s["serial"]
        run_s = epochs * round_s + min(path_s["synthesis"], path_s["KD"])
    elif schedule == "alternating":
        binding, round_s = "both", sum(seconds.values())
        run_s = epochs * round_s
    else:
        raise ValueError(f"schedule {schedule!r}: one of {SCHEDULES}")
    critical = [term for term in seconds if schedule == "alternating" or path[term] in (binding, "serial")]
    return {"path_s": path_s, "binding_path": binding, "round_s": round_s, "run_h": run_s / 3600,
            "first_bottleneck": max((term for term in critical if "compute" not in term), key=seconds.get)}


def round_model(measured: dict, synth_gpus: int, trainer_gpus: int, merged: int, assume: argparse.Namespace,
                schedule: str) -> dict | None:
    """One round of the pipeline with `synth_gpus` synthesis GPUs (actors) and `trainer_gpus` trainer GPUs (DeepSpeed
    ranks) under `schedule`. Each term runs on the synthesis path (actors), the KD path (ranks) or serially (driver):
    a rank reads each new shard of its share once, in a loader thread, and trains from its held share; each actor
    writes its own state file; evaluation is sharded over the ranks.
    Recipe rule: keep the paper's KD image-passes per synthesized image (S x B / (I x bs) = 256) and at least
    `--min-micro-batch` images per rank; `merged` = k > 1 merges k paper rounds into one (I and S x B times k,
    epochs / k): the same total images and KD passes, fewer rounds (fewer per-round costs, fewer student refreshes).
    Returns None for a split the code would reject or that leaves synthesis GPUs idle."""
    recipe = round_recipe(measured, synth_gpus, trainer_gpus, merged, assume)
    if recipe is None:
        return None
    flop_counts, sizes = measured["flops"], measured["bytes"]
    residency = share_residency(measured, recipe, assume)
    manifest_bytes = recipe["manifest_entries_end"] * sizes["manifest_per_entry"]  # at the last round
    terms = {"synthesis": synthesis_terms(measured, recipe, assume),
             "KD": kd_terms(measured, recipe, residency["share_resident"], assume),
             # driver.pt holds cursors and names (kilobytes); the manifest's bytes stand in for it
             "serial": {"driver checkpoint (cursors, manifest)": manifest_bytes / (assume.ckpt_gbs * GB)}}
    seconds = {term: s for path_terms in terms.values() for term, s in path_terms.items()}
    path = {term: name for name, path_terms in terms.items() for term in path_terms}
    timing = round_time(seconds, path, schedule, recipe["epochs"])
    steps, kd_batch, new_images = recipe["kd_steps"], recipe["kd_batch"], recipe["new_images"]
    useful_s = (recipe["g_loops"] * measured["g_steps"] * measured["synthesis_batch"]
                * flop_counts["synthesis_per_image_step"] + steps * kd_batch * flop_counts["kd_per_image"]
                + assume.eval_images * flop_counts["eval_per_image"]) / gpu_flops_per_s(assume)
    synthesis_s = seconds["synthesis compute"] + seconds["synthesis step overhead"]
    synth_rate = recipe["iterations_per_actor"] * measured["synthesis_batch"] / synthesis_s  # kept images/s per GPU
    kd_rate = steps * recipe["micro_batch"] / sum(s for term, s in seconds.items() if term.startswith("KD"))
    passes = steps * kd_batch / new_images  # KD image-passes per synthesized image
    new_bytes = new_images * sizes["shard_per_image"]
    # a held share reads each new shard once; a streamed one reads every batch it trains on
    read_bytes = new_bytes if residency["share_resident"] != "streams" else steps * kd_batch * sizes["shard_per_image"]
    return {
        "schedule": schedule, **recipe, "times_s": seconds, "term_path": path, **timing, "useful_gpu_s": useful_s,
        "gpu_compute_util": useful_s / ((synth_gpus + trainer_gpus) * timing["round_s"]),
        "synth_images_per_s_per_gpu": synth_rate, "kd_images_per_s_per_gpu": kd_rate,
        "kd_images_per_s": trainer_gpus * kd_rate, "kd_passes_per_new_image": passes,
        "overlap_synth_per_trainer_gpu": kd_rate / (passes * synth_rate),
        "overlap_synth_per_trainer_gpu_flops_only": new_images * flop_counts["synthesis_per_kept_image"]
        / (steps * kd_batch * flop_counts["kd_per_image"]),
        "buffer_bytes_per_round": new_bytes,
        "buffer_bytes_end": recipe["epochs"] * new_images * sizes["shard_per_image"],
        "shard_write_gbs": new_bytes / synthesis_s / GB, "kd_read_bytes_per_round": read_bytes,
        "kd_read_gbs_uncached": read_bytes / timing["round_s"] / GB, **residency,
        "driver_checkpoint_bytes": manifest_bytes, "manifest_bytes_end": manifest_bytes,
        "deepspeed_checkpoint_bytes": sizes["student_and_sgd_state"]}


def snippet(option: dict, gpus: int, measured: dict, lr: float, assume: argparse.Namespace) -> str:
    """The plan as a YAML layered on configs/imagenet.yaml (`plan` validates it with the pipeline's own parser)."""
    lines = [f"# {gpus} GPUs available: {option['synth_gpus']} synthesis actors + {option['trainer_gpus']} DeepSpeed "
             "ranks (bench/capacity.py model)",
             "# python -m orchestrator.run config=configs/imagenet.yaml,<this file> ...", "bf16: true"]
    if option["rounds_merged"] > 1:
        lines += [f"epochs: {option['epochs']}  # {option['rounds_merged']} paper rounds per round: same images and KD "
                  "passes", "synthesis:", f"  g_loops: {option['g_loops']}"]
    if option["kd_batch"] != measured["kd_batch"]:
        scaled_lr = lr * option["kd_batch"] / measured["kd_batch"]
        lines += ["kd:", f"  batch_size: {option['kd_batch']}  # {option['micro_batch']} per rank",
                  f"  kd_steps: {option['kd_steps']}",
                  f"  # lr: re-tune for this batch (linear scaling would give {scaled_lr:.2g}; not validated)"]
    lines += ["cluster:", f"  synth_workers: {option['synth_gpus']}", "  synth_gpus: 1",
              f"  trainer_workers: {option['trainer_gpus']}", "  trainer_gpus: 1",
              f"  deepspeed: configs/deepspeed/{option['deepspeed']}.json", f"  schedule: {option['schedule']}"]
    lines += [f"  {key}: {getattr(assume, key)}" for key in ("rank_buffer_gb", "rank_buffer_device_gb")
              if getattr(assume, key) != getattr(ClusterConfig, key)]
    if option["share_resident"] == "streams":  # only a streamed share uses the shuffle buffer
        lines.append(f"  shuffle_buffer: {option['shuffle_buffer']}")
    return "\n".join(lines) + "\n"


def check_config(config: str, yaml_text: str) -> None:
    """Parse `yaml_text` layered on `config` with the pipeline's own parser: fails loudly on an invalid key or
    value."""
    with tempfile.NamedTemporaryFile("w", suffix=".yaml") as file:
        file.write(yaml_text)
        file.flush()
        parse_config(PipelineConfig, [f"{config},{file.name}"])


def plan(measured: dict, assume: argparse.Namespace, schedule: str) -> dict:
    """For each scale: among the options (not every GPU has to be used) whose modeled run is within --slack of the
    shortest, the one closest to the paper's recipe (fewest merged rounds), then with the fewest GPUs; with the
    fastest option at the paper's rounds (k = 1) and the chosen option's config."""
    config = f"config={ROOT}/configs/imagenet.yaml"
    lr = parse_config(PipelineConfig, [config]).kd.lr
    chosen = {}
    for gpus in assume.scales:
        candidates = ((synth_gpus, trainer_gpus, merged) for merged in range(1, assume.max_merge + 1)
                      for synth_gpus in range(1, gpus) for trainer_gpus in range(1, gpus - synth_gpus + 1))
        options = [option for synth_gpus, trainer_gpus, merged in candidates
                   if (option := round_model(measured, synth_gpus, trainer_gpus, merged, assume, schedule))]
        fastest_h = min(option["run_h"] for option in options)
        best = min((option for option in options if option["run_h"] <= fastest_h * (1 + assume.slack)),
                   key=lambda option: (option["rounds_merged"], option["synth_gpus"] + option["trainer_gpus"],
                                       option["run_h"]))
        paper = min((option for option in options if option["rounds_merged"] == 1),
                    key=lambda option: option["run_h"])
        best["gpu_compute_util_all"] = best["useful_gpu_s"] / (gpus * best["round_s"])
        best["paper_rounds"] = {key: paper[key] for key in ("synth_gpus", "trainer_gpus", "kd_batch", "round_s",
                                                             "run_h", "gpu_compute_util", "first_bottleneck")}
        best["config_yaml"] = snippet(best, gpus, measured, lr, assume)
        check_config(config, best["config_yaml"])
        chosen[str(gpus)] = best
    return chosen


def cifar_check(cifar: dict) -> dict:
    """What the per-image CPU costs imply for the measured CIFAR pipeline round (2 one-thread actors, one iteration
    of g=10 steps on 200 images each; 2 one-thread ranks, S=150 steps of 128; bench-cifar10-resnet56-pipeline.md)."""
    cpu = cifar["cpu"]
    micro_batch = cifar["kd_batch"] // 2
    synthesis_s = cifar["g_steps"] * cifar["synthesis_batch"] * cpu["synthesis_bf16"]["s_per_unit"]
    reading_s = (cifar["kd_steps"] * micro_batch + 2000) * cpu["reader"]["s_per_unit"]
    kd_s = cifar["kd_steps"] * micro_batch * cpu["kd_bf16"]["s_per_unit"]
    return {"synthesis_s": {"model": synthesis_s, "measured_pipeline": 24.7},
            "kd_compute_s": {"model": kd_s, "measured_pipeline": 51.0 - 3.67},
            "kd_reading_s": {"model": reading_s, "measured_pipeline": 3.67}}


# ---------------------------------------------------------------------------------------------------- report
def human_bytes(count: float) -> str:
    return f"{count / 1e9:,.2f} GB" if count >= 1e8 else f"{count / 1e6:,.1f} MB"


def split_text(option: dict, gpus: str) -> str:
    idle = int(gpus) - option["synth_gpus"] - option["trainer_gpus"]
    return f"{option['synth_gpus']} : {option['trainer_gpus']}" + (f" ({idle} idle)" if idle else "")


def cell(fill, option: dict) -> str:
    """A table cell: `fill` is a format string over the option's keys or a function of the option."""
    return fill.format(**option) if isinstance(fill, str) else fill(option)


def measured_section(results: dict) -> list[str]:
    """The per-image costs of each setting, the CIFAR-10 cross-check and the plan's assumptions."""
    settings = results["measured"]

    def cpu(key: str, unit: str):
        return lambda cost: (f"{cost['cpu'][key]['s_per_unit'] * 1e3:.1f} ms/{unit} (load "
                             f"{cost['cpu'][key]['load1_before']}, others {cost['cpu'][key]['other_cores_busy']})")

    rows = [("setting", "{teacher} -> {student}, {image_size} px"),
            ("synthesis GFLOP per generator step", lambda cost: "{:.2f} (generator {:.0%}, student {:.0%}, teacher the "
             "rest)".format(cost["flops"]["synthesis_per_image_step"] / 1e9, cost["flops"]["synthesis_generator_share"],
                            cost["flops"]["synthesis_student_share"])),
            ("synthesis GFLOP per kept image",
             lambda cost: f"{cost['flops']['synthesis_per_kept_image'] / 1e9:,.0f} (g = {cost['g_steps']})"),
            ("KD GFLOP", lambda cost: f"{cost['flops']['kd_per_image'] / 1e9:.2f}"),
            ("eval GFLOP", lambda cost: f"{cost['flops']['eval_per_image'] / 1e9:.2f}"),
            ("CPU synthesis fp32", cpu("synthesis_fp32", "image-step")),
            ("CPU synthesis bf16", cpu("synthesis_bf16", "image-step")),
            ("CPU KD fp32", cpu("kd_fp32", "image")), ("CPU KD bf16", cpu("kd_bf16", "image")),
            ("shard reader, 1 core", lambda cost: f"{1 / cost['cpu']['reader']['s_per_unit']:,.0f} images/s (load "
             f"{cost['cpu']['reader']['load1_before']}, others {cost['cpu']['reader']['other_cores_busy']})"),
            ("shard bytes", lambda cost: f"{cost['bytes']['shard_per_image']:,.0f}"),
            ("manifest bytes per entry: JSON / pickled snapshot",
             lambda cost: f"{cost['bytes']['manifest_per_entry']:.0f} / "
                          f"{cost['bytes']['snapshot_per_entry_pickled']:.0f}"),
            ("synthesizer state (generator + noisy layers + BN EMA)",
             lambda cost: f"{human_bytes(cost['bytes']['synthesizer_state'])} "
                          f"({cost['bytes']['generator_params'] / 1e6:.1f} M generator parameters)"),
            ("student state / + SGD momentum", lambda cost: f"{human_bytes(cost['bytes']['student_state'])} / "
             f"{human_bytes(cost['bytes']['student_and_sgd_state'])}"),
            ("teacher state", lambda cost: human_bytes(cost["bytes"]["teacher_state"]))]
    lines = ["## Measured (this machine)", "", "| per image | " + " | ".join(settings) + " |",
             "|---|" + "---|" * len(settings)]
    lines += [f"| {label} | " + " | ".join(cell(fill, cost) for cost in settings.values()) + " |"
              for label, fill in rows]
    lines += ["", f"CPU timings with {settings['imagenet']['cpu']['threads']} thread(s); load = 1-min load average "
              "before the timing, others = cores other processes kept busy during it.", "",
              "## CIFAR-10 cross-check: per-image costs vs. the measured pipeline round", "",
              "| seconds per round | from per-image costs | measured (bench-cifar10-resnet56-pipeline) |",
              "|---|---|---|"]
    lines += [f"| {key} | {check['model']:.1f} | {check['measured_pipeline']:.1f} |"
              for key, check in results["cifar_check"].items()]
    lines += ["", "## ASSUMPTIONS of the plan (not measured)", ""]
    lines += [f"- `--{key.replace('_', '-')} {value}`" + (f" (cluster.{key}: a config key, not an assumption)"
                                                          if key.startswith("rank_buffer") else "")
              for key, value in results["assumptions"].items()]
    return lines


def headline_section(plans: dict) -> list[str]:
    """Per scale, the chosen option of each schedule."""
    lines = ["## Headline (model): the best split per scale and schedule", "",
             "overlapped: what cluster.schedule=auto picks when both pools have GPUs (the ranks train round r while "
             "the actors synthesize round r+1); alternating: cluster.schedule=alternating.", "",
             "| GPUs | schedule | split (synthesis : trainer) | k | s/round | run h | GPU compute utilization | "
             "first bottleneck |", "|---|---|---|---|---|---|---|---|"]
    for gpus in plans[SCHEDULES[0]]:
        for schedule in SCHEDULES:
            option = plans[schedule][gpus]
            lines.append(f"| {gpus} | {schedule} | {split_text(option, gpus)} | {option['rounds_merged']} | "
                         f"{option['round_s']:.1f} | {option['run_h']:.2f} | {option['gpu_compute_util']:.0%} | "
                         f"{option['first_bottleneck']} |")
    return lines


def round_is(option: dict) -> str:
    paths = "{synthesis:.1f} / {KD:.1f} / {serial:.2f}; ".format(**option["path_s"])
    return paths + ("the sum" if option["schedule"] == "alternating" else f"{option['binding_path']} path + serial")


PLAN_ROWS = [  # (label, cell) of the detailed plan; the per-term seconds go after the third row
    ("schedule; synthesis : trainer GPUs", "{schedule}; {synth_gpus} : {trainer_gpus}"),
    ("paper rounds per round (k) / g_loops / epochs", "{rounds_merged} / {g_loops} / {epochs}"),
    ("kd.batch_size (per rank) / kd_steps / deepspeed", "{kd_batch} ({micro_batch}) / {kd_steps} / {deepspeed}"),
    ("s: synthesis path / KD path / serial; a round is", round_is),
    ("round s / whole run h", "{round_s:.1f} / {run_h:.2f}"),
    ("GPU compute utilization: of the GPUs used / of all", "{gpu_compute_util:.0%} / {gpu_compute_util_all:.0%}"),
    ("first bottleneck (largest non-compute term on the critical path)", "{first_bottleneck}"),
    ("kept images/s per synthesis GPU; KD images/s per trainer GPU / all trainers",
     "{synth_images_per_s_per_gpu:.1f}; {kd_images_per_s_per_gpu:,.0f} / {kd_images_per_s:,.0f}"),
    ("synthesis GPUs per trainer GPU for balanced paths (FLOPs only)",
     "{overlap_synth_per_trainer_gpu:.2f} ({overlap_synth_per_trainer_gpu_flops_only:.2f})"),
    ("buffer growth per round / after all rounds; shard writes, GB/s",
     lambda option: f"{human_bytes(option['buffer_bytes_per_round'])} / {human_bytes(option['buffer_bytes_end'])}; "
                    f"{option['shard_write_gbs']:.2f}"),
    ("KD reads per round / GB/s if none were cached",
     lambda option: f"{human_bytes(option['kd_read_bytes_per_round'])} / {option['kd_read_gbs_uncached']:.2f}"),
    ("a rank's share at the end: file / image bytes, where it is held",
     lambda option: f"{human_bytes(option['share_per_rank_end'])} / "
                    f"{human_bytes(option['share_images_per_rank_end'])}, {option['share_resident']}"),
    ("shards per round / manifest entries, bytes (end)",
     lambda option: f"{option['shards_per_round']} / {option['manifest_entries_end']:,}, "
                    f"{human_bytes(option['manifest_bytes_end'])}"),
    ("checkpoints every round: driver / DeepSpeed",
     lambda option: f"{human_bytes(option['driver_checkpoint_bytes'])} / "
                    f"{human_bytes(option['deepspeed_checkpoint_bytes'])}"),
    ("fastest with the paper's rounds (k = 1): split, KD batch, round s, run h, utilization, first bottleneck",
     lambda option: "{synth_gpus} : {trainer_gpus}, {kd_batch}, {round_s:.1f} s, {run_h:.2f} h, "
                    "{gpu_compute_util:.0%}, {first_bottleneck}".format(**option["paper_rounds"])),
]


def plan_section(plans: dict) -> list[str]:
    """The chosen options side by side, a column per scale and schedule, with every modeled term."""
    columns = [(gpus, schedule, plans[schedule][gpus]) for gpus in plans[SCHEDULES[0]] for schedule in SCHEDULES]
    term_path = {term: option["term_path"][term] for _, _, option in columns for term in option["times_s"]}
    term_rows = [(f"s: {term} [{path}]", lambda option, term=term: f"{option['times_s'][term]:.2f}"
                  if term in option["times_s"] else "-") for term, path in term_path.items()]
    rows = PLAN_ROWS[:3] + term_rows + PLAN_ROWS[3:]
    lines = ["## Plan (model)", "", "| | " + " | ".join(f"{gpus} GPUs {schedule}" for gpus, schedule, _ in columns)
             + " |", "|---|" + "---|" * len(columns)]
    lines += [f"| {label} | " + " | ".join(cell(fill, option) for _, _, option in columns) + " |"
              for label, fill in rows]
    return lines


def snippets_section(plans: dict) -> list[str]:
    """The overlapped plan of each scale as a config layered on configs/imagenet.yaml."""
    lines = ["## Configs of the overlapped plans (checked with the pipeline's parser)"]
    for gpus, option in plans["overlapped"].items():
        lines += ["", f"### {gpus} GPUs", "", "```yaml", option["config_yaml"].rstrip(), "```"]
    return lines


def markdown(results: dict) -> str:
    intro = ["# Capacity plan: per-image costs measured here, ImageNet plan modeled from them", "",
             f"`python -m bench.capacity` on {results['machine']}; measurement runtime {results['runtime_s']:.0f} s. "
             "FLOPs: torch.utils.flop_counter (matmuls and convolutions, forward + backward). Plan: docs/scaling.md."]
    sections = [intro, measured_section(results), headline_section(results["plan"]), plan_section(results["plan"]),
                snippets_section(results["plan"])]
    return "\n\n".join("\n".join(section) for section in sections) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--plan-only", action="store_true", help="re-plan from results/capacity.json (no measurement)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads for the CPU timings (1 = a pipeline worker)")
    parser.add_argument("--max-load", type=float, default=1.0,
                        help="wait before a timing while the 1-min load is higher")
    parser.add_argument("--max-wait", type=float, default=600.0, help="seconds to wait per timing for a quiet machine")
    parser.add_argument("--scales", type=int, nargs="+", default=[8, 64, 512], help="GPU counts to plan for")
    parser.add_argument("--slack", type=float, default=0.05, help="choose among the options whose run is this close "
                        "to the shortest")
    assumptions = parser.add_argument_group("ASSUMPTIONS of the plan (not measured)")
    assumptions.add_argument("--gpu-tflops", type=float, default=312.0, help="GPU dense bf16 peak (A100: 312)")
    assumptions.add_argument("--gpu-util", type=float, default=0.30, help="share of the peak these conv nets reach")
    assumptions.add_argument("--step-overhead-ms", type=float, default=5.0, help="fixed cost per synthesis or KD "
                             "step (kernel launches, Python, loss sync, optimizer)")
    assumptions.add_argument("--intranode-gbs", type=float, default=100.0,
                             help="all-reduce bandwidth per GPU within a node")
    assumptions.add_argument("--allreduce-gbs", type=float, default=20.0,
                             help="all-reduce bandwidth per GPU across nodes")
    assumptions.add_argument("--storage-gbs", type=float, default=10.0, help="aggregate shared-filesystem bandwidth")
    assumptions.add_argument("--ckpt-gbs", type=float, default=1.0,
                             help="one process (an actor, rank 0) writing to shared FS")
    assumptions.add_argument("--objstore-gbs", type=float, default=2.0, help="Ray object transfer out of one node")
    assumptions.add_argument("--gpus-per-node", type=int, default=8)
    assumptions.add_argument("--min-micro-batch", type=int, default=16,
                             help="KD images per rank (the paper's 128 over 8 GPUs)")
    assumptions.add_argument("--max-merge", type=int, default=4, help="at most this many paper rounds merged into one")
    assumptions.add_argument("--eval-images", type=int, default=50000, help="ImageNet val, evaluated every round")
    assumptions.add_argument("--h2d-gbs", type=float, default=10.0,
                             help="host-to-GPU copy of a batch from a host-held share")
    for key in ("rank_buffer_gb", "rank_buffer_device_gb"):  # not assumptions: the config's keys and defaults
        assumptions.add_argument(f"--{key.replace('_', '-')}", type=float, default=getattr(ClusterConfig, key),
                                 help=f"cluster.{key}")
    args = parser.parse_args()
    start = time.perf_counter()
    json_path = RESULTS / "capacity.json"
    if args.plan_only:
        results = json.loads(json_path.read_text())
    else:
        torch.set_num_threads(args.threads)
        torch.manual_seed(0)
        with tempfile.TemporaryDirectory() as tmp:
            measured = {name: measure_setting(name, spec, args, Path(tmp)) for name, spec in SETTINGS.items()}
        results = {"measured": measured, "runtime_s": time.perf_counter() - start,
                   "machine": f"{os.cpu_count()} CPU cores, torch {torch.__version__}, "
                              f"{time.strftime('%Y-%m-%d %H:%M')}"}
    measuring = ("plan_only", "threads", "max_load", "max_wait", "slack", "scales")
    imagenet = results["measured"]["imagenet"]
    results.update(assumptions={key: value for key, value in vars(args).items() if key not in measuring},
                   cifar_check=cifar_check(results["measured"]["cifar10"]),
                   plan={schedule: plan(imagenet, args, schedule) for schedule in SCHEDULES})
    RESULTS.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(results, indent=2) + "\n")
    report = markdown(results)
    (RESULTS / "capacity.md").write_text(report)
    print(report)


if __name__ == "__main__":
    main()
