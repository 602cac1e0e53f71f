"""Benchmark: the driver checkpoint's size and write time with 1, 2 and 4 synthesis actors (issue 14, benchmark 4).

    python -m bench.driver_checkpoint                              # this checkout: bench/results/driver_checkpoint.*
    git worktree add /tmp/before <commit> && python -m bench.driver_checkpoint --checkout /tmp/before --label before

Each run is a short pipeline run of the CIFAR-10 profile (ResNet-56 -> ResNet-20 with random weights: the sizes do
not depend on them; tiny synthesis and KD so that it takes seconds), 1 warm-up round + 2 KD rounds, with N actors
x 1 CPU and 1 rank. Quoted: `checkpoints/driver.pt` bytes after the run, the driver's mean `checkpoint_time` per
round (metrics.jsonl: the time from the round's end to its checkpoint on disk), and the actors' own state files.
`--checkout` runs the code of another checkout (same venv), for the numbers before a change; the results of all
labels are merged into one table. Run on an idle machine.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from nayer.run_report import read_metrics

ROOT = Path(__file__).resolve().parents[1]


def run_once(checkout: Path, actors: int, out: Path) -> dict:
    name = f"ckpt-{actors}"
    argv = [sys.executable, "-m", "orchestrator.run",
            f"config={checkout / 'configs/cifar10.yaml'},{checkout / 'configs/profiles/cpu.yaml'}",
            f"name={name}", f"out_dir={out}", "teacher.arch=resnet56", "student.arch=resnet20", "data.eval=",
            "warmup=1", "epochs=2", f"synthesis.warmup_loops={actors}", f"synthesis.g_loops={actors}",
            "synthesis.batch_size=16", "synthesis.g_steps=1", "kd.kd_steps=2", "kd.batch_size=32",
            f"cluster.synth_workers={actors}", "cluster.trainer_workers=1"]
    subprocess.run(argv, cwd=checkout, check=True, stdout=subprocess.DEVNULL)
    folder = out / name
    records = read_metrics(folder)
    states = sorted((folder / "checkpoints" / "synthesis").glob("worker-*/round-*.pt"))
    return {"actors": actors, "driver_pt_bytes": (folder / "checkpoints" / "driver.pt").stat().st_size,
            "checkpoint_s": sum(r["checkpoint_time"] for r in records) / len(records),
            "actor_state_files": len(states),
            "actor_state_bytes_each": states[-1].stat().st_size if states else 0}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkout", default=str(ROOT))
    ap.add_argument("--label", default="after")
    ap.add_argument("--actors", default="1,2,4")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    args = ap.parse_args()
    results = Path(args.out) / "driver_checkpoint.json"
    table = json.loads(results.read_text()) if results.is_file() else {}
    with tempfile.TemporaryDirectory() as tmp:
        table[args.label] = [run_once(Path(args.checkout).resolve(), int(n), Path(tmp))
                             for n in args.actors.split(",")]
    results.write_text(json.dumps(table, indent=1))
    lines = ["# Driver checkpoint vs synthesis actors (CIFAR-10 profile, ResNet-56 -> ResNet-20)", "",
             "| code | actors | driver.pt | driver checkpoint s per round | actor state files after the run | "
             "each |", "|---|---|---|---|---|---|"]
    for label, rows in table.items():
        for r in rows:
            lines.append(f"| {label} | {r['actors']} | {r['driver_pt_bytes'] / 1e3:.1f} kB | {r['checkpoint_s']:.3f} | "
                         f"{r['actor_state_files']} | {r['actor_state_bytes_each'] / 1e6:.1f} MB |")
    (Path(args.out) / "driver_checkpoint.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
