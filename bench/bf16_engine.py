"""Benchmark: DeepSpeed's bf16 engine (bf16 weights, fp32 BatchNorm statistics) against bf16 autocast (fp32
weights), same seed, same ZeRO stage 2, on the digits example and on the real CIFAR-10 ResNet-56 teacher.

    python -m bench.bf16_engine                          # both cases, both precisions (~25 + 30 min on 2 cores)
    python -m bench.bf16_engine --cases digits           # the digits example only (make run's config)
    python -m bench.bf16_engine --cases cifar10 --budget-min 15
    python -m bench.bf16_engine --report-only            # rewrite the table from the saved runs

autocast: cluster.deepspeed=configs/deepspeed/zero2.json bf16=true (fp32 weights and optimizer, bf16 compute).
engine:   cluster.deepspeed=configs/deepspeed/zero2_bf16.json (bf16 weights and gradients, fp32 master weights in
          the optimizer, bf16 gradient reduction; orchestrator.precision keeps BatchNorm statistics fp32).
Writes bench/results/bf16-engine.{md,json}: student top-1 per KD round of each run. CIFAR-10 needs ../shared/data.
Run by hand, alone on the machine: the CIFAR-10 runs have a wall-clock budget.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from nayer.run_report import read_metrics

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
RUNS = RESULTS / "runs"
PRECISIONS = {"autocast": ["cluster.deepspeed=configs/deepspeed/zero2.json", "bf16=true"],
              "engine": ["cluster.deepspeed=configs/deepspeed/zero2_bf16.json"]}


def command(case: str, precision: str, budget_min: float) -> list[str]:
    name = f"bf16-{case}-{precision}"
    if case == "digits":  # make run's example on the pipeline, its own config
        return [sys.executable, "-m", "orchestrator.examples.digits", f"name={name}", f"out_dir={RUNS}",
                *PRECISIONS[precision]]
    return [sys.executable, "-m", "bench.cifar10_resnet56", "--pipeline", "--budget-min", str(budget_min),
            "--name", name, "--out", str(RESULTS), *PRECISIONS[precision]]


def shown(argv: list[str]) -> str:
    """A command as a user types it from the repository root."""
    return " ".join("python" if a == sys.executable else str(Path(a).relative_to(ROOT)) if a.startswith(str(ROOT))
                    else a.replace(str(ROOT) + "/", "") for a in argv)


def rounds(case: str, precision: str) -> list[dict]:
    folder = RUNS / f"bf16-{case}-{precision}"
    return read_metrics(folder) if (folder / "metrics.jsonl").is_file() else []


def report(cases: list[str], argv: list[str], budget_min: float) -> None:
    data, lines = {}, ["# bf16 engine vs bf16 autocast (ZeRO-2, same seed)", "", f"`python -m bench.bf16_engine "
                                                                                 f"{' '.join(argv)}`", ""]
    for case in cases:
        lines += [f"- {case} {p}: `{shown(command(case, p, budget_min))}`" for p in PRECISIONS]
    lines.append("")
    for case in cases:
        runs = {p: [r for r in rounds(case, p) if r["phase"] == "kd"] for p in PRECISIONS}
        data[case] = {p: [{k: r.get(k) for k in ("epoch", "elapsed", "top1", "kd_loss")} for r in rs]
                      for p, rs in runs.items()}
        lines += [f"## {case}", "", "| KD round | autocast top-1 | engine top-1 | autocast KD loss | engine KD loss |"
                  " autocast min | engine min |", "|---|---|---|---|---|---|---|"]
        for i in range(max(len(rs) for rs in runs.values())):
            cells = []
            for key, fmt in (("top1", "{:.2f}"), ("kd_loss", "{:.4f}"), ("elapsed", "{:.1f}")):
                for p in PRECISIONS:
                    value = runs[p][i].get(key) if i < len(runs[p]) else None
                    cells.append("-" if value is None else fmt.format(value / 60 if key == "elapsed" else value))
            lines.append(f"| {i + 1} | " + " | ".join(cells) + " |")
        finals = {p: rs[-1]["top1"] for p, rs in runs.items() if rs and rs[-1].get("top1") is not None}
        if len(finals) == 2:
            lines += ["", f"Last round: autocast {finals['autocast']:.2f}%, engine {finals['engine']:.2f}% "
                          f"(engine - autocast = {finals['engine'] - finals['autocast']:+.2f} points)."]
        lines.append("")
    (RESULTS / "bf16-engine.md").write_text("\n".join(lines))
    (RESULTS / "bf16-engine.json").write_text(json.dumps({"command": argv, "cases": data}, indent=1) + "\n")
    print("\n".join(lines))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", default="digits,cifar10", help="comma-separated: digits, cifar10")
    ap.add_argument("--precisions", default="autocast,engine")
    ap.add_argument("--budget-min", type=float, default=15.0, help="wall-clock budget of each CIFAR-10 run")
    ap.add_argument("--report-only", action="store_true")
    args = ap.parse_args()
    cases = [c for c in args.cases.split(",") if c]
    for case in cases if not args.report_only else []:
        for precision in args.precisions.split(","):
            print(f"== {case}: {precision}", flush=True)
            subprocess.run(command(case, precision, args.budget_min), cwd=ROOT, check=True)
    report(cases, sys.argv[1:], args.budget_min)


if __name__ == "__main__":
    main()
