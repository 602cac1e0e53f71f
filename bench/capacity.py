"""Capacity plan for NAYER on ImageNet at 8, 64 and 512 GPUs, built from per-image costs measured on this machine.

    python bench/capacity.py                                   # measure (~1.5 min on 2 idle cores) + plan
    python bench/capacity.py --plan-only --gpu-util 0.2        # re-plan from results/capacity.json, other assumptions
    python bench/capacity.py --threads 1 --max-load 1.0 --max-wait 600 --scales 8 64 512

Writes bench/results/capacity.{json,md}. docs/scaling.md explains the plan.

Measured with the project's own code (random weights: the cost does not depend on them):
  * FLOPs (torch.utils.flop_counter: matmuls and convolutions, forward and backward) of one generator step of a real
    `NayerSynthesizer` (adversarial round), of one `KDObjective` step and of `evaluate`, per image;
  * CPU seconds per image of the same steps (fp32 and bf16 autocast, `--threads` threads), each timing preceded by a
    load check: the 1-min load average must be <= --max-load (polled every 20 s, up to --max-wait s); the load and the
    cores other processes kept busy during the timing (/proc/stat minus this process) are recorded with it;
  * shard bytes per image (`write_shards`), per-rank reader images/s (`shard_batches`), manifest bytes per entry;
  * checkpoint sizes: synthesizer state (generator + noisy layers + BN EMA), student, teacher, student + SGD state.
Settings: configs/imagenet.yaml with the ImageNet config's earlier values (ResNet-50 -> ResNet-18, 224 px) and, as a cross-check against the measured pipeline
round, the CIFAR-10 benchmark's config (configs/cifar10.yaml + profiles/cpu.yaml, ResNet-56 -> ResNet-20, 32 px).
The plan turns the ImageNet numbers into GPU time with the ASSUMPTIONS given as options (GPU peak and utilization,
per-step overhead, bandwidths); nothing in it was measured on a GPU. It models a round of the old pipeline
("before": alternating phases, shard reader in the KD loop, eval on rank 0, actor states in the driver checkpoint)
and of the code now ("after": overlapped rounds, resident buffer shares, per-actor state files, sharded eval; also
with cluster.schedule=alternating), and searches the synthesis : trainer split for each. --plan-only reads the
measured costs from results/capacity.json and only re-plans.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import pickle
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from bench.random_models import BoundedTeacher, calibrate_bn, flops  # noqa: E402
from nayer.cli_config import parse_config  # noqa: E402
from nayer.data import LabeledImages  # noqa: E402
from nayer.evaluate import evaluate  # noqa: E402
from nayer.inputs import resolve_images  # noqa: E402
from nayer.kd import KDObjective, StudentTrainer  # noqa: E402
from nayer.models import build_model  # noqa: E402
from nayer.specs import Compute  # noqa: E402
from nayer.synthesis import NayerSynthesizer  # noqa: E402
from orchestrator.config import ClusterConfig, PipelineConfig  # noqa: E402
from orchestrator.shards import Manifest, shard_batches, write_shards  # noqa: E402

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


def measure_setting(name: str, spec: dict, args: argparse.Namespace, tmp: Path) -> dict:
    cfg = parse_config(PipelineConfig, spec["argv"])
    images, _ = resolve_images(cfg)
    size, k = images.size, images.num_classes
    compute = Compute(torch.device("cpu"), channels_last=cfg.channels_last)
    emb = torch.randn(k, EMB_DIM[cfg.lte.encoder])
    teacher = BoundedTeacher(calibrate_bn(build_model(cfg.teacher.arch, k), size)).eval().requires_grad_(False)
    student = calibrate_bn(build_model(cfg.student.arch, k), size)
    if cfg.channels_last:  # as the synthesis workers and DeepSpeed ranks hold them
        teacher, student = (m.to(memory_format=torch.channels_last) for m in (teacher, student))
    syn, bs = cfg.synthesis, cfg.synthesis.batch_size

    def synthesizer(batch: int, bf16: bool) -> NayerSynthesizer:
        return NayerSynthesizer(teacher, student, emb, images, cfg.generator,
                                dataclasses.replace(syn, batch_size=batch, g_steps=1),
                                dataclasses.replace(compute, bf16=bf16))

    print(f"[{name}] FLOPs", flush=True)
    b = spec["flop_batch"]
    counts = {}
    for batch in (b, 2 * b):  # one adversarial generator step (warmup=False: student forward + its input gradient)
        s = synthesizer(batch, bf16=False)
        counts[batch], adv_parts = flops(lambda: s.synthesize(warmup=False, loops=1))
        s.bn_loss.remove()
    slope = (counts[2 * b] - counts[b]) / b
    syn_step = slope + (counts[b] - slope * b) / bs  # per image at the config's generator batch
    s = synthesizer(2 * b, bf16=False)  # same step without the adversarial term: the student's share is the rest
    no_adv = flops(lambda: s.synthesize(warmup=True, loops=1))[0]
    gen_share = adv_parts["NayerGenerator"] / counts[2 * b]
    ema = s.bn_loss.state_dict()
    s.bn_loss.remove()
    kd_obj = KDObjective(student, teacher, cfg.kd, images, CPU)
    batch = torch.randint(0, 256, (spec["kd_batch"], 3, size, size), dtype=torch.uint8)
    kd_flops = flops(lambda: kd_obj(batch).backward())[0] / len(batch)
    x_eval = LabeledImages(np.random.randint(0, 256, (8, size, size, 3), dtype=np.uint8), np.zeros(8, dtype=np.int64))
    eval_flops = flops(lambda: evaluate(student, x_eval, images, CPU, 8))[0] / 8

    print(f"[{name}] checkpoint sizes", flush=True)
    ck = synthesizer(bs, bf16=False)  # built at the config's batch: the noisy-layer count depends on it
    ck.bn_loss.load_state_dict(ema)  # a filled BN EMA, as after the first iteration of a run
    sizes = {"synthesizer_state": file_bytes(ck.state_dict(), tmp / "syn.pt"),
             "generator_params": sum(p.numel() for p in ck.generator.parameters()),
             "student_state": file_bytes(student.state_dict(), tmp / "student.pt"),
             "teacher_state": file_bytes(teacher.net.state_dict(), tmp / "teacher.pt"),
             "student_params": sum(p.numel() for p in student.parameters())}
    ck.bn_loss.remove()

    print(f"[{name}] CPU timings ({args.threads} thread(s))", flush=True)
    timings = {}
    for bf16 in (False, True):
        tag = "bf16" if bf16 else "fp32"
        s = synthesizer(spec["time_batch"], bf16)
        s.synthesize(warmup=False, loops=1)  # warm-up step (allocations, oneDNN primitive caches)
        s.cfg = dataclasses.replace(s.cfg, g_steps=spec["time_steps"])
        timings[f"synthesis_{tag}"] = timed(lambda: s.synthesize(warmup=False, loops=1),
                                            spec["time_steps"] * spec["time_batch"], args)
        s.bn_loss.remove()
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
    n = spec["reader_images"]
    shard_root = tmp / f"buffer-{name}"
    entries = write_shards(shard_root, 0, 0, torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8),
                           torch.randint(0, k, (n,)), cfg.cluster.shard_samples, min_shards=2)
    manifest = Manifest(shard_root)
    manifest.commit(0, entries)
    nb = 2 * n // spec["reader_batch"]  # two passes: with_epoch repeats, as a rank does when S x mb > its shards
    reader = timed(lambda: sum(1 for _ in shard_batches(manifest.snapshot(), spec["reader_batch"], nb, 0,
                                                        cfg.cluster.shuffle_buffer)), nb * spec["reader_batch"], args)
    many = Manifest(tmp / f"manifest-{name}")  # 100 rounds of 2 entries: bytes and save time per entry
    (many.root / entries[0]["path"]).parent.mkdir(parents=True, exist_ok=True)
    for e in entries:
        (many.root / e["path"]).touch()
    for r in range(100):
        many.commit(r, entries)
    t0 = time.perf_counter()
    many.save()
    save_s = time.perf_counter() - t0
    return {
        "config": " ".join(spec["argv"]).replace(f"{ROOT}/", ""), "image_size": size, "classes": k,
        "teacher": cfg.teacher.arch, "student": cfg.student.arch,
        "synthesis_batch": bs, "g_steps": syn.g_steps, "g_loops": syn.g_loops,
        "kd_batch": cfg.kd.batch_size, "kd_steps": cfg.kd.kd_steps, "epochs": cfg.epochs,
        "shard_samples": cfg.cluster.shard_samples,
        "flops": {"synthesis_per_image_step": syn_step, "synthesis_generator_share": gen_share,
                  "synthesis_student_share": 1 - no_adv / counts[2 * b],
                  "synthesis_per_kept_image": syn_step * syn.g_steps, "kd_per_image": kd_flops,
                  "eval_per_image": eval_flops},
        "bytes": {"shard_per_image": sum(e["bytes"] for e in entries) / n,
                  "manifest_per_entry": (many.root / "manifest.json").stat().st_size / len(many.shards),
                  "snapshot_per_entry_pickled": len(pickle.dumps(many.snapshot())) / len(many.shards),
                  **sizes},
        "manifest_save_s_per_entry": save_s / len(many.shards),
        "cpu": {**timings, "reader": reader, "threads": args.threads},
    }


# ---------------------------------------------------------------------------------------------------- the plan
VARIANTS = {"before": ("before", "alternating"),  # plan -> (code, schedule): the old pipeline (the old headline),
            "after": ("after", "overlapped"),  # the code now with the cluster default (auto: overlapped on GPUs),
            "after_alternating": ("after", "alternating")}  # the code now with cluster.schedule=alternating


def round_model(m: dict, ns: int, nt: int, k: int, a: argparse.Namespace, code: str = "before",
                schedule: str = "alternating") -> dict | None:
    """One round of the pipeline with ns synthesis GPUs and nt trainer GPUs. Each term runs on the synthesis path
    (actors), the KD path (ranks) or serially (driver). alternating: a round is the sum of the terms; overlapped
    (the ranks train round r while the actors synthesize r+1): max(synthesis path, KD path) + serial. code "before":
    the old pipeline (each rank decoded its share inside the KD loop every round, eval on rank 0, the driver pulled
    every actor's state into its checkpoint); "after": the code now (a rank reads each new shard of its share once,
    in a loader thread, and trains from memory; each actor writes its own state; eval sharded over the ranks).
    Recipe rule: keep the paper's KD image-passes per synthesized image (S x B / (I x bs) = 256) and at least
    `--min-micro-batch` images per rank; k > 1 merges k paper rounds into one (I and S x B times k, epochs / k): the
    same total images and KD passes, fewer rounds (fewer per-round costs, fewer student refreshes). Returns None for
    a split the code would reject or that leaves synthesis GPUs idle."""
    f, by = m["flops"], m["bytes"]
    rate, oh, gbs = a.gpu_tflops * 1e12 * a.gpu_util, a.step_overhead_ms / 1e3, 1e9
    if nt <= m["kd_batch"] // a.min_micro_batch:  # the paper's batch fits: keep it
        if m["kd_batch"] % nt:
            return None  # orchestrator/config.py: kd.batch_size must be divisible by cluster.trainer_workers
        mb = m["kd_batch"] // nt
    else:
        mb = a.min_micro_batch
    loops, epochs, batch = m["g_loops"] * k, math.ceil(m["epochs"] / k), mb * nt
    new_images = loops * m["synthesis_batch"]
    if ns > loops or new_images < nt * mb:  # workers.split_iterations gives the extra actors nothing to do;
        return None  # trainer.py: in the first KD round every rank needs a micro-batch of samples
    steps = round(m["kd_steps"] * m["kd_batch"] * k / batch)
    shuffle = min(2000, steps * mb // 10)  # a reader decodes this many images it never uses per round (buffer fill)
    ds = "zero0" if nt <= a.gpus_per_node else "zero2_bf16"  # bf16 gradients halve the cross-node all-reduce
    grad_bytes = by["student_params"] * (2 if ds == "zero2_bf16" else 4)
    ring = a.intranode_gbs if nt <= a.gpus_per_node else a.allreduce_gbs
    reader_rate = 1 / m["cpu"]["reader"]["s_per_unit"]  # one core per rank (measured)
    iters = math.ceil(loops / ns)
    shards_round = ns * max(math.ceil(iters * m["synthesis_batch"] / m["shard_samples"]), math.ceil(nt / ns))
    entries = shards_round * epochs  # at the last round
    new_bytes, image_bytes = new_images * by["shard_per_image"], 3 * m["image_size"] ** 2
    # a rank's share (seq % ranks) at the end: file bytes against cluster.rank_buffer_gb, uint8 image bytes against
    # cluster.rank_buffer_device_gb (GiB, orchestrator/resident.py); beyond both it streams from storage
    share, share_images = epochs * new_bytes / nt, epochs * new_images * image_bytes / nt
    resident = ("device" if share_images <= a.rank_buffer_device_gb * 2 ** 30 else
                "host" if share <= a.rank_buffer_gb * 2 ** 30 else "streams")
    loop = [("KD compute", "KD", steps * mb * f["kd_per_image"] / rate), ("KD step overhead", "KD", steps * oh),
            ("KD all-reduce", "KD", steps * 2 * (nt - 1) / nt * grad_bytes / (ring * gbs))]
    reread = (steps * mb + shuffle) / reader_rate  # a rank decodes its share's batches and the shuffle fill
    terms = [("student broadcast to actors", "synthesis", by["student_state"] * ns / (a.objstore_gbs * gbs)),
             ("synthesis compute", "synthesis",
              iters * m["g_steps"] * m["synthesis_batch"] * f["synthesis_per_image_step"] / rate),
             ("synthesis step overhead", "synthesis", iters * m["g_steps"] * oh),
             ("shard write", "synthesis", new_bytes / (a.storage_gbs * gbs))]
    if code == "before":
        driver_ckpt = ns * by["synthesizer_state"] + by["student_state"] + entries * by["manifest_per_entry"]
        terms += [("manifest commit + publish", "serial", entries * (m["manifest_save_s_per_entry"] + by[
            "snapshot_per_entry_pickled"] * nt / (a.objstore_gbs * gbs))), *loop,
                  ("KD shard reading (1 core/rank)", "KD", reread),  # synchronous, inside the step loop
                  ("eval on rank 0", "KD", a.eval_images * f["eval_per_image"] / rate),
                  ("checkpoints (driver + DeepSpeed)", "serial", ns * by["synthesizer_state"] / (a.objstore_gbs * gbs)
                   + (driver_ckpt + by["student_and_sgd_state"]) / (a.ckpt_gbs * gbs))]
        read_bytes = steps * batch * by["shard_per_image"]
    else:
        driver_ckpt, state = entries * by["manifest_per_entry"], by["synthesizer_state"]
        batches = {"device": 0.0,  # an on-device gather; host: a copy per batch; streams: what the prefetch
                   "host": steps * mb * image_bytes / (a.h2d_gbs * gbs),  # thread cannot hide behind the steps
                   "streams": max(0.0, reread - sum(s for _, _, s in loop))}[resident]
        terms += [("synthesizer states (each actor its file)", "synthesis",  # all at once: the slower limit
                   max(state / (a.ckpt_gbs * gbs), ns * state / (a.storage_gbs * gbs))),
                  ("manifest commit + new entries to the ranks", "synthesis", entries * m["manifest_save_s_per_entry"]
                   + shards_round * by["snapshot_per_entry_pickled"] * (1 + nt) / (a.objstore_gbs * gbs)),
                  # the loader threads read and verify the new shards as they are committed; the next KD round
                  # waits for them, so this ends the synthesis path
                  ("new shards read once (loader thread)", "synthesis",
                   max(new_images / nt / reader_rate, new_bytes / (a.storage_gbs * gbs))), *loop,
                  (f"KD batches ({resident})", "KD", batches),
                  ("eval sharded over the ranks", "KD", a.eval_images / nt * f["eval_per_image"] / rate),
                  ("DeepSpeed checkpoint (ranks)", "KD", by["student_and_sgd_state"] / (a.ckpt_gbs * gbs)),
                  ("driver checkpoint (cursors, manifest)", "serial", driver_ckpt / (a.ckpt_gbs * gbs))]
        read_bytes = new_bytes if resident != "streams" else steps * batch * by["shard_per_image"]
    t, path = {n: s for n, _, s in terms}, {n: p for n, p, _ in terms}
    paths = {p: sum(v for key, v in t.items() if path[key] == p) for p in ("synthesis", "KD", "serial")}
    if schedule == "overlapped":
        binding = max(("synthesis", "KD"), key=paths.get)
        round_s = paths[binding] + paths["serial"]
        run_s = epochs * round_s + min(paths["synthesis"], paths["KD"])  # the first synthesis, last KD run alone
    else:
        binding, round_s = "both", sum(t.values())
        run_s = epochs * round_s
    critical = [key for key in t if path[key] in (binding, "serial") or schedule == "alternating"]
    kd_s = sum(v for key, v in t.items() if key.startswith("KD"))
    useful = (loops * m["g_steps"] * m["synthesis_batch"] * f["synthesis_per_image_step"]
              + steps * batch * f["kd_per_image"] + a.eval_images * f["eval_per_image"]) / rate
    syn_s = t["synthesis compute"] + t["synthesis step overhead"]
    syn_rate = iters * m["synthesis_batch"] / syn_s  # kept images/s of one synthesis GPU
    kd_rate = steps * mb / kd_s  # per trainer GPU
    return {
        "code": code, "schedule": schedule,
        "synth_gpus": ns, "trainer_gpus": nt, "rounds_merged": k, "g_loops": loops, "epochs": epochs,
        "kd_batch": batch, "micro_batch": mb, "kd_steps": steps, "shuffle_buffer": shuffle, "deepspeed": ds,
        "times_s": t, "term_path": path, "path_s": paths, "binding_path": binding,
        "round_s": round_s, "run_h": run_s / 3600, "useful_gpu_s": useful,
        "gpu_compute_util": useful / ((ns + nt) * round_s),
        "synth_images_per_s_per_gpu": syn_rate, "kd_images_per_s_per_gpu": kd_rate, "kd_images_per_s": nt * kd_rate,
        "kd_passes_per_new_image": steps * batch / new_images,
        "overlap_synth_per_trainer_gpu": kd_rate / (steps * batch / new_images * syn_rate),
        "overlap_synth_per_trainer_gpu_flops_only": new_images * f["synthesis_per_kept_image"]
        / (steps * batch * f["kd_per_image"]),
        "buffer_bytes_per_round": new_bytes, "buffer_bytes_end": epochs * new_images * by["shard_per_image"],
        "shard_write_gbs": new_bytes / syn_s / gbs, "kd_read_bytes_per_round": read_bytes,
        "kd_read_gbs_uncached": read_bytes / (kd_s if code == "before" else round_s) / gbs,
        "share_per_rank_end": share, "share_images_per_rank_end": share_images, "share_resident": resident,
        "shards_per_round": shards_round, "manifest_entries_end": entries, "driver_checkpoint_bytes": driver_ckpt,
        "manifest_bytes_end": entries * by["manifest_per_entry"],
        "deepspeed_checkpoint_bytes": by["student_and_sgd_state"],
        "first_bottleneck": max((key for key in critical if "compute" not in key), key=t.get)}


def snippet(r: dict, gpus: int, m: dict, lr: float, a: argparse.Namespace) -> str:
    """The plan as a YAML layered on configs/imagenet.yaml (`plan` validates it with the pipeline's own parser)."""
    lines = [f"# {gpus} GPUs available: {r['synth_gpus']} synthesis actors + {r['trainer_gpus']} DeepSpeed ranks "
             f"(bench/capacity.py model)", "# python -m orchestrator.run config=configs/imagenet.yaml,<this file> ...",
             "bf16: true"]
    if r["rounds_merged"] > 1:
        lines += [f"epochs: {r['epochs']}  # {r['rounds_merged']} paper rounds per round: same images and KD passes",
                  "synthesis:", f"  g_loops: {r['g_loops']}"]
    if r["kd_batch"] != m["kd_batch"]:
        lines += ["kd:", f"  batch_size: {r['kd_batch']}  # {r['micro_batch']} per rank",
                  f"  kd_steps: {r['kd_steps']}",
                  f"  # lr: re-tune for this batch (linear scaling would give "
                  f"{lr * r['kd_batch'] / m['kd_batch']:.2g}; not validated)"]
    lines += ["cluster:", f"  synth_workers: {r['synth_gpus']}", "  synth_gpus: 1",
              f"  trainer_workers: {r['trainer_gpus']}", "  trainer_gpus: 1",
              f"  deepspeed: configs/deepspeed/{r['deepspeed']}.json", f"  schedule: {r['schedule']}"]
    lines += [f"  {key}: {getattr(a, key)}" for key in ("rank_buffer_gb", "rank_buffer_device_gb")
              if getattr(a, key) != getattr(ClusterConfig, key)]
    if r["share_resident"] == "streams":  # only a streamed share uses the shuffle buffer
        lines.append(f"  shuffle_buffer: {r['shuffle_buffer']}")
    return "\n".join(lines) + "\n"


def plan(m: dict, a: argparse.Namespace, code: str, schedule: str) -> dict:
    """For each scale: among the options (not every GPU has to be used) whose modeled run is within --slack of the
    shortest, the one closest to the paper's recipe (fewest merged rounds), then with the fewest GPUs; its config
    (for the code now)."""
    config = f"config={ROOT}/configs/imagenet.yaml"
    lr = parse_config(PipelineConfig, [config]).kd.lr
    out = {}
    for gpus in a.scales:
        options = [r for k in range(1, a.max_merge + 1) for ns in range(1, gpus) for nt in range(1, gpus - ns + 1)
                   if (r := round_model(m, ns, nt, k, a, code, schedule)) is not None]
        fastest = min(r["run_h"] for r in options)
        best = min((r for r in options if r["run_h"] <= fastest * (1 + a.slack)),
                   key=lambda r: (r["rounds_merged"], r["synth_gpus"] + r["trainer_gpus"], r["run_h"]))
        paper = min((r for r in options if r["rounds_merged"] == 1), key=lambda r: r["run_h"])
        best["gpu_compute_util_all"] = best["useful_gpu_s"] / (gpus * best["round_s"])
        best["paper_rounds"] = {key: paper[key] for key in ("synth_gpus", "trainer_gpus", "kd_batch", "round_s",
                                                             "run_h", "gpu_compute_util", "first_bottleneck")}
        if code == "after":
            best["config_yaml"] = snippet(best, gpus, m, lr, a)
            with tempfile.NamedTemporaryFile("w", suffix=".yaml") as f:  # fails loudly if a key or value is invalid
                f.write(best["config_yaml"])
                f.flush()
                parse_config(PipelineConfig, [f"{config},{f.name}"])
        out[str(gpus)] = best
    return out


def cifar_check(c: dict) -> dict:
    """What the per-image CPU costs imply for the measured CIFAR pipeline round (2 one-thread actors, one iteration
    of g=10 steps on 200 images each; 2 one-thread ranks, S=150 steps of 128; bench-cifar10-resnet56-pipeline.md)."""
    cpu = c["cpu"]
    syn = c["g_steps"] * c["synthesis_batch"] * cpu["synthesis_bf16"]["s_per_unit"]
    micro = c["kd_batch"] // 2
    read = (c["kd_steps"] * micro + 2000) * cpu["reader"]["s_per_unit"]
    kd = c["kd_steps"] * micro * cpu["kd_bf16"]["s_per_unit"]
    return {"synthesis_s": {"model": syn, "measured_pipeline": 24.7},
            "kd_compute_s": {"model": kd, "measured_pipeline": 51.0 - 3.67},
            "kd_reading_s": {"model": read, "measured_pipeline": 3.67}}


# ---------------------------------------------------------------------------------------------------- report
def gb(x: float) -> str:
    return f"{x / 1e9:,.2f} GB" if x >= 1e8 else f"{x / 1e6:,.1f} MB"


def markdown(res: dict) -> str:
    ms = res["measured"]
    lines = ["# Capacity plan: per-image costs measured here, ImageNet plan modeled from them", "",
             f"`python bench/capacity.py` on {res['machine']}; measurement runtime {res['runtime_s']:.0f} s. FLOPs: "
             "torch.utils.flop_counter (matmuls and convolutions, forward + backward). Plan: docs/scaling.md.", "",
             "## Measured (this machine)", "", "| per image | " + " | ".join(ms) + " |", "|---|" + "---|" * len(ms)]

    def cpu(key: str, unit: str):
        return lambda c: (f"{c['cpu'][key]['s_per_unit'] * 1e3:.1f} ms/{unit} (load {c['cpu'][key]['load1_before']}, "
                          f"others {c['cpu'][key]['other_cores_busy']})")

    rows = [("setting", lambda c: f"{c['teacher']} -> {c['student']}, {c['image_size']} px"),
            ("synthesis GFLOP per generator step", lambda c: f"{c['flops']['synthesis_per_image_step'] / 1e9:.2f} "
             f"(generator {c['flops']['synthesis_generator_share']:.0%}, student "
             f"{c['flops']['synthesis_student_share']:.0%}, teacher the rest)"),
            ("synthesis GFLOP per kept image", lambda c: f"{c['flops']['synthesis_per_kept_image'] / 1e9:,.0f} "
             f"(g = {c['g_steps']})"),
            ("KD GFLOP", lambda c: f"{c['flops']['kd_per_image'] / 1e9:.2f}"),
            ("eval GFLOP", lambda c: f"{c['flops']['eval_per_image'] / 1e9:.2f}"),
            ("CPU synthesis fp32", cpu("synthesis_fp32", "image-step")),
            ("CPU synthesis bf16", cpu("synthesis_bf16", "image-step")),
            ("CPU KD fp32", cpu("kd_fp32", "image")), ("CPU KD bf16", cpu("kd_bf16", "image")),
            ("shard reader, 1 core", lambda c: f"{1 / c['cpu']['reader']['s_per_unit']:,.0f} images/s "
             f"(load {c['cpu']['reader']['load1_before']}, others {c['cpu']['reader']['other_cores_busy']})"),
            ("shard bytes", lambda c: f"{c['bytes']['shard_per_image']:,.0f}"),
            ("manifest bytes per entry: JSON / pickled snapshot", lambda c: f"{c['bytes']['manifest_per_entry']:.0f} / "
             f"{c['bytes']['snapshot_per_entry_pickled']:.0f}"),
            ("synthesizer state (generator + noisy layers + BN EMA)", lambda c: f"{gb(c['bytes']['synthesizer_state'])}"
             f" ({c['bytes']['generator_params'] / 1e6:.1f} M generator parameters)"),
            ("student state / + SGD momentum", lambda c: f"{gb(c['bytes']['student_state'])} / "
             f"{gb(c['bytes']['student_and_sgd_state'])}"),
            ("teacher state", lambda c: gb(c["bytes"]["teacher_state"]))]
    lines += [f"| {label} | " + " | ".join(fn(c) for c in ms.values()) + " |" for label, fn in rows]
    lines += ["", f"CPU timings with {ms['imagenet']['cpu']['threads']} thread(s); load = 1-min load average before "
              "the timing, others = cores other processes kept busy during it.", "",
              "## CIFAR-10 cross-check: per-image costs vs. the measured pipeline round", "",
              "| seconds per round | from per-image costs | measured (bench-cifar10-resnet56-pipeline) |",
              "|---|---|---|"]
    lines += [f"| {key} | {v['model']:.1f} | {v['measured_pipeline']:.1f} |" for key, v in res["cifar_check"].items()]
    lines += ["", "## ASSUMPTIONS of the plan (not measured)", ""]
    lines += [f"- `--{k.replace('_', '-')} {v}`" + (f" (cluster.{k}: a config key, not an assumption)"
                                                    if k.startswith("rank_buffer") else "")
              for k, v in res["assumptions"].items()]
    before, after, alt = (res["plan"][v] for v in VARIANTS)
    scales = list(after)

    def split(r: dict, gpus: str) -> str:
        idle = int(gpus) - r["synth_gpus"] - r["trainer_gpus"]
        return f"{r['synth_gpus']} : {r['trainer_gpus']}" + (f" ({idle} idle)" if idle else "")

    lines += ["", "## Headline (model): before = the old pipeline, after = the code now", "",
              "| GPUs | | split (synthesis : trainer) | k | s/round | run h | GPU compute utilization | "
              "first bottleneck |", "|---|---|---|---|---|---|---|---|"]
    for g in scales:
        for name, r in (("before", before[g]), ("after", after[g])):
            lines.append(f"| {g} | {name} ({r['schedule']}) | {split(r, g)} | {r['rounds_merged']} | "
                         f"{r['round_s']:.1f} | {r['run_h']:.2f} | {r['gpu_compute_util']:.0%} | "
                         f"{r['first_bottleneck']} |")
    lines += ["", "Target (issue 14): at least 2x the old modeled utilization at 8 and 64 GPUs."]
    for g in scales:
        ratio = after[g]["gpu_compute_util"] / before[g]["gpu_compute_util"]
        verdict = "met" if ratio >= 2 else f"missed by {2 - ratio:.2f}x" if g in ("8", "64") else "no target"
        lines.append(f"- {g} GPUs: {before[g]['gpu_compute_util']:.0%} -> {after[g]['gpu_compute_util']:.0%}, "
                     f"{ratio:.2f}x ({verdict}).")
    columns = [(g, name, r[g]) for g in scales for name, r in (("before", before), ("after", after))]
    lines += ["", "## Plan (model)", "", "| | " + " | ".join(f"{g} GPUs {name}" for g, name, _ in columns) + " |",
              "|---|" + "---|" * len(columns)]
    terms = {key: r["term_path"][key] for _, _, r in columns for key in r["times_s"]}
    table = [("schedule; synthesis : trainer GPUs", "{schedule}; {synth_gpus} : {trainer_gpus}"),
             ("paper rounds per round (k) / g_loops / epochs", "{rounds_merged} / {g_loops} / {epochs}"),
             ("kd.batch_size (per rank) / kd_steps / deepspeed",
              "{kd_batch} ({micro_batch}) / {kd_steps} / {deepspeed}"),
             *[(f"s: {key} [{where}]", lambda r, key=key: f"{r['times_s'][key]:.2f}" if key in r["times_s"] else "-")
               for key, where in terms.items()],
             ("s: synthesis path / KD path / serial; a round is", lambda r: "{synthesis:.1f} / {KD:.1f} / "
              "{serial:.2f}; ".format(**r["path_s"]) + ("the sum" if r["schedule"] == "alternating" else
                                                       f"{r['binding_path']} path + serial")),
             ("round s / whole run h", "{round_s:.1f} / {run_h:.2f}"),
             ("GPU compute utilization: of the GPUs used / of all",
              "{gpu_compute_util:.0%} / {gpu_compute_util_all:.0%}"),
             ("first bottleneck (largest non-compute term on the critical path)", "{first_bottleneck}"),
             ("kept images/s per synthesis GPU; KD images/s per trainer GPU / all trainers",
              "{synth_images_per_s_per_gpu:.1f}; {kd_images_per_s_per_gpu:,.0f} / {kd_images_per_s:,.0f}"),
             ("synthesis GPUs per trainer GPU for balanced paths (FLOPs only)",
              "{overlap_synth_per_trainer_gpu:.2f} ({overlap_synth_per_trainer_gpu_flops_only:.2f})"),
             ("buffer growth per round / after all rounds; shard writes, GB/s",
              lambda r: f"{gb(r['buffer_bytes_per_round'])} / {gb(r['buffer_bytes_end'])}; {r['shard_write_gbs']:.2f}"),
             ("KD reads per round / GB/s if none were cached",
              lambda r: f"{gb(r['kd_read_bytes_per_round'])} / {r['kd_read_gbs_uncached']:.2f}"),
             ("a rank's share at the end: file / image bytes, where it is held",
              lambda r: f"{gb(r['share_per_rank_end'])} / {gb(r['share_images_per_rank_end'])}, "
                        + (r["share_resident"] if r["code"] == "after" else "re-read every round")),
             ("shards per round / manifest entries, bytes (end)", lambda r: f"{r['shards_per_round']} / "
              f"{r['manifest_entries_end']:,}, {gb(r['manifest_bytes_end'])}"),
             ("checkpoints every round: driver / DeepSpeed", lambda r: f"{gb(r['driver_checkpoint_bytes'])} / "
              f"{gb(r['deepspeed_checkpoint_bytes'])}"),
             ("fastest with the paper's rounds (k = 1): split, KD batch, round s, run h, utilization, first bottleneck",
              lambda r: "{synth_gpus} : {trainer_gpus}, {kd_batch}, {round_s:.1f} s, {run_h:.2f} h, "
                        "{gpu_compute_util:.0%}, {first_bottleneck}".format(**r["paper_rounds"]))]
    lines += [f"| {label} | " + " | ".join(fn.format(**r) if isinstance(fn, str) else fn(r) for _, _, r in columns)
              + " |" for label, fn in table]
    lines += ["", "The code now with `cluster.schedule=alternating` (the fixes without the overlap), best split:", ""]
    lines += [f"- {g} GPUs: {split(r, g)}, k = {r['rounds_merged']}, {r['round_s']:.1f} s/round, {r['run_h']:.2f} h, "
              f"{r['gpu_compute_util']:.0%}, first bottleneck {r['first_bottleneck']}" for g, r in alt.items()]
    for gpus, r in after.items():
        lines += ["", f"### {gpus} GPUs (after)", "", "```yaml", r["config_yaml"].rstrip(), "```"]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--plan-only", action="store_true", help="re-plan from results/capacity.json (no measurement)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads for the CPU timings (1 = a pipeline worker)")
    ap.add_argument("--max-load", type=float, default=1.0, help="wait before a timing while the 1-min load is higher")
    ap.add_argument("--max-wait", type=float, default=600.0, help="seconds to wait per timing for a quiet machine")
    ap.add_argument("--scales", type=int, nargs="+", default=[8, 64, 512], help="GPU counts to plan for")
    ap.add_argument("--slack", type=float, default=0.05, help="choose among the options whose run is this close "
                    "to the shortest")
    g = ap.add_argument_group("ASSUMPTIONS of the plan (not measured)")
    g.add_argument("--gpu-tflops", type=float, default=312.0, help="GPU dense bf16 peak (A100: 312)")
    g.add_argument("--gpu-util", type=float, default=0.30, help="share of the peak these conv nets reach")
    g.add_argument("--step-overhead-ms", type=float, default=5.0,
                   help="fixed cost per synthesis or KD step (kernel launches, Python, loss sync, optimizer)")
    g.add_argument("--intranode-gbs", type=float, default=100.0, help="all-reduce bandwidth per GPU within a node")
    g.add_argument("--allreduce-gbs", type=float, default=20.0, help="all-reduce bandwidth per GPU across nodes")
    g.add_argument("--storage-gbs", type=float, default=10.0, help="aggregate shared-filesystem bandwidth")
    g.add_argument("--ckpt-gbs", type=float, default=1.0, help="one process (an actor, rank 0) writing to shared FS")
    g.add_argument("--objstore-gbs", type=float, default=2.0, help="Ray object transfer out of one node")
    g.add_argument("--gpus-per-node", type=int, default=8)
    g.add_argument("--min-micro-batch", type=int, default=16, help="KD images per rank (the paper's 128 over 8 GPUs)")
    g.add_argument("--max-merge", type=int, default=4, help="at most this many paper rounds merged into one")
    g.add_argument("--eval-images", type=int, default=50000, help="ImageNet val, evaluated every round")
    g.add_argument("--h2d-gbs", type=float, default=10.0, help="host-to-GPU copy of a batch from a host-held share")
    for key in ("rank_buffer_gb", "rank_buffer_device_gb"):  # not assumptions: the config's keys and defaults
        g.add_argument(f"--{key.replace('_', '-')}", type=float, default=getattr(ClusterConfig, key),
                       help=f"cluster.{key}")
    args = ap.parse_args()
    start = time.perf_counter()
    out = RESULTS / "capacity.json"
    if args.plan_only:
        res = json.loads(out.read_text())
    else:
        torch.set_num_threads(args.threads)
        torch.manual_seed(0)
        with tempfile.TemporaryDirectory() as tmp:
            measured = {name: measure_setting(name, spec, args, Path(tmp)) for name, spec in SETTINGS.items()}
        res = {"measured": measured, "runtime_s": time.perf_counter() - start,
               "machine": f"{os.cpu_count()} CPU cores, torch {torch.__version__}, {time.strftime('%Y-%m-%d %H:%M')}"}
    measuring = ("plan_only", "threads", "max_load", "max_wait", "slack", "scales")
    assumptions = {k: v for k, v in vars(args).items() if k not in measuring}
    res.update(assumptions=assumptions, cifar_check=cifar_check(res["measured"]["cifar10"]),
               plan={name: plan(res["measured"]["imagenet"], args, *v) for name, v in VARIANTS.items()})
    RESULTS.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2) + "\n")
    (RESULTS / "capacity.md").write_text(markdown(res))
    print(markdown(res))


if __name__ == "__main__":
    main()
