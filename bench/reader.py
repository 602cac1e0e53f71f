"""Benchmark: a rank's buffer reader, read once and held (issue 14, benchmark 2) against re-reading every round.

    python -m bench.reader                       # writes bench/results/reader.{md,json}
    python -m bench.reader --sizes 32 --rounds 0

For each image size a synthetic uint8 buffer is written as committed shards (tar of .npy samples, sha256 in the
manifest), then KD steps (10 at 32 px, 4 at 224 px) are timed three ways, all on one core:
- reread: every round the rank reads, verifies and decodes its whole share in the step loop (`shard_batches`,
  synchronous);
- streaming: the same reads behind a prefetch thread (`ahead`): the fallback of a share over cluster.rank_buffer_gb;
- resident: the share was read once when it was committed (`ShareLoader`); a round samples permutations of it.
Two rates each: batches/s over one pass with no step (what the reader alone delivers) and KD steps/s with a real step
(32 px: ResNet-56 teacher -> ResNet-20 student, batch 256; 224 px: torchvision ResNet-50 teacher -> ResNet-18,
batch 32; random weights, fp32: this machine's CPU has no AMX or AVX-512 bf16).
Then (`--rounds`, 30) a real pipeline run (digits, 1 synthesis actor, 2 DeepSpeed ranks, overlapped) compares,
per KD round, the bytes the ranks read (`kd_read_bytes` in metrics.jsonl) with the bytes committed that round.
Run on an idle machine.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from nayer.run_report import read_metrics
from nayer.config import KDConfig
from nayer.kd import KDObjective
from nayer.models import build_model
from nayer.specs import Compute, ImageSpec
from nayer.storage import Storage
from orchestrator.messages import ShardEntry
from orchestrator.resident import ResidentShare, ShareLoader, ahead
from orchestrator.shards import Manifest, shard_batches, write_shards

ROOT = Path(__file__).resolve().parents[1]

SETUPS = {  # size: (images in the buffer, images per shard, KD batch, teacher, student, timed KD steps)
    32: (20000, 5000, 256, "resnet56", "resnet20", 10),
    224: (2000, 250, 32, "tv_resnet50", "tv_resnet18", 4),
}


def write_buffer(root: Path, size: int, count: int, per_shard: int) -> Manifest:
    manifest = Manifest(root)
    generator = torch.Generator().manual_seed(0)
    for w, start in enumerate(range(0, count, per_shard)):
        n = min(per_shard, count - start)
        images = torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=generator)
        manifest.commit(write_shards(manifest.store, 0, w, images, torch.arange(n) % 10, per_shard))
    return manifest


def resident_share(buffer: Storage, entries: list[ShardEntry]) -> tuple[ResidentShare, float]:
    """A share loaded the way a rank loads it (one thread, every shard read and verified once); load seconds."""
    handed = []

    def fetch(after_seq: int) -> list[ShardEntry] | None:
        if handed:
            return None  # the run is over: the thread ends once everything is loaded
        handed.append(True)
        return entries

    start = time.perf_counter()
    loader = ShareLoader(buffer, fetch, rank=0, world=1, policy="fail", host_limit_bytes=float("inf"))
    loader.wait(entries[-1].seq)
    return ResidentShare(loader, torch.device("cpu"), 0), time.perf_counter() - start


def timed(batches, step) -> float:
    start = time.perf_counter()
    count = 0
    for images, _ in batches:
        step(images)
        count += 1
    return count / (time.perf_counter() - start)


def measure(size: int) -> dict:
    count, per_shard, batch, teacher_arch, student_arch, steps = SETUPS[size]
    spec = ImageSpec(tuple(f"c{i}" for i in range(10)), size, (0.5,) * 3, (0.25,) * 3)
    compute = Compute(torch.device("cpu"))
    teacher = build_model(teacher_arch, 10).eval().requires_grad_(False)
    student = build_model(student_arch, 10)
    objective = KDObjective(student, teacher, KDConfig(batch_size=batch), spec, compute)
    optimizer = torch.optim.SGD(student.parameters(), lr=0.01)

    def kd_step(images: torch.Tensor) -> None:
        optimizer.zero_grad()
        objective(images).backward()
        optimizer.step()

    with tempfile.TemporaryDirectory() as root:
        manifest = write_buffer(Path(root), size, count, per_shard)
        entries = manifest.snapshot()
        share, load_s = resident_share(manifest.store, entries)
        readers = {
            "reread": lambda n: shard_batches(manifest.store, entries, batch, n, seed=1),
            "streaming": lambda n: ahead(shard_batches(manifest.store, entries, batch, n, seed=1)),
            "resident": lambda n: share.batches(entries[-1].seq, batch, n, seed=1, shuffle_buffer=0),
        }
        kd_step(next(iter(readers["resident"](1)))[0])  # first-call costs out of the timings
        row = {"size": size, "images": count, "bytes": sum(e.bytes for e in entries), "batch": batch, "steps": steps,
               "teacher": teacher_arch, "student": student_arch, "resident_load_s": load_s}
        for name, reader in readers.items():
            # reader alone: the batches of one pass over the share
            row[f"{name}_batches_per_s"] = timed(reader(count // batch), lambda images: None)
            row[f"{name}_steps_per_s"] = timed(reader(steps), kd_step)
    return row


def bytes_per_round(rounds: int, out: Path) -> dict:
    """Bytes read by all ranks / bytes committed, per KD round of a `rounds`-round overlapped digits run."""
    from nayer.cli_config import parse_config
    from orchestrator.config import PipelineConfig
    from orchestrator.run import run

    settings = {"out_dir": str(out / "runs"), "name": "reader-bytes", "warmup": 1, "epochs": rounds,
                "data.dataset": "digits", "data.eval": "", "teacher.arch": "resnet20", "student.arch": "resnet20",
                "lte.encoder": "onehot", "generator.nz": 64, "generator.ngf": 16, "synthesis.batch_size": 40,
                "synthesis.g_steps": 2, "synthesis.g_loops": 2, "synthesis.warmup_loops": 2, "kd.batch_size": 32,
                "kd.kd_steps": 4, "cluster.synth_workers": 1, "cluster.trainer_workers": 2,
                "cluster.schedule": "overlapped", "cluster.shard_samples": 20}
    run(parse_config(PipelineConfig, [f"{k}={v}" for k, v in settings.items()]))
    records = read_metrics(out / "runs" / "reader-bytes")
    kd = [r for r in records if r["phase"] == "kd"]
    ratios = [r["kd_read_bytes"] / r["committed_bytes"] for r in kd[1:] if r["committed_bytes"]]
    manifest = Manifest.load(out / "runs" / "reader-bytes" / "buffer")
    # re-reading: every KD round, every rank reads its whole share of rounds 0..r
    reread = sum(sum(manifest.round_bytes(s) for s in range(r["epoch"] + 1)) for r in kd)
    return {"kd_rounds": len(kd), "first_kd_round_read": kd[0]["kd_read_bytes"],
            "first_kd_round_committed": kd[0]["committed_bytes"], "buffer_bytes_end": sum(
                r["committed_bytes"] for r in records), "read_over_committed_after_first": ratios,
            "max_ratio": max(ratios), "mean_ratio": sum(ratios) / len(ratios),
            "total_read": sum(r["kd_read_bytes"] for r in kd), "reread_total": reread,
            "per_round": [{k: r[k] for k in ("epoch", "kd_read_bytes", "kd_read_bytes_per_rank", "committed_bytes")}
                          for r in kd]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="32,224")
    ap.add_argument("--rounds", type=int, default=30, help="KD rounds of the bytes-per-round run (0: skip it)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    args = ap.parse_args()
    torch.set_num_threads(1)  # one rank on one core, as in the placement of benchmark 1
    rows = [measure(int(s)) for s in args.sizes.split(",")]
    lines = ["# A rank's buffer reader: read once and held vs re-read every round (one core)", "",
             "| px | buffer | batch | KD models | reader alone, batches/s: reread / streaming / resident | "
             "KD steps/s: reread / streaming / resident | resident vs reread |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['size']} | {r['images']} images, {r['bytes'] / 1e6:.0f} MB (loaded once in "
            f"{r['resident_load_s']:.1f} s) | {r['batch']} | {r['teacher']} -> {r['student']} | "
            f"{r['reread_batches_per_s']:.1f} / {r['streaming_batches_per_s']:.1f} / "
            f"{r['resident_batches_per_s']:.0f} | {r['reread_steps_per_s']:.3f} / {r['streaming_steps_per_s']:.3f} "
            f"/ {r['resident_steps_per_s']:.3f} | {r['resident_steps_per_s'] / r['reread_steps_per_s']:.2f}x |")
    out = Path(args.out)
    result = {"readers": rows}
    if args.rounds:
        with tempfile.TemporaryDirectory() as tmp:
            b = result["bytes_per_round"] = bytes_per_round(args.rounds, Path(tmp))
        lines += ["", f"Bytes read per KD round, {b['kd_rounds']}-round overlapped digits run (1 actor, 2 ranks): "
                  f"all ranks read {b['total_read'] / 1e6:.1f} MB in all, the buffer holds "
                  f"{b['buffer_bytes_end'] / 1e6:.1f} MB at the end; after the first KD round, read / committed per "
                  f"round: mean **{b['mean_ratio']:.3f}**, max **{b['max_ratio']:.3f}** (target <= 1.1). The first "
                  f"KD round read {b['first_kd_round_read'] / 1e6:.2f} MB: the warm-up buffer plus the round's own "
                  f"shards ({b['first_kd_round_committed'] / 1e6:.2f} MB committed in that step). Re-reading every "
                  f"round, the ranks would have read {b['reread_total'] / 1e6:.0f} MB."]
    (out / "reader.md").write_text("\n".join(lines) + "\n")
    (out / "reader.json").write_text(json.dumps(result, indent=1))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
