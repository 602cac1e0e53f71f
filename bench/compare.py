"""Benchmark: several synthesis methods or generator inputs on the same teacher, student, seed and wall-clock budget.

    python -m bench.compare methods                 # NAYER vs FM vs DeepInversion, 15 min each, with KD
    python -m bench.compare inputs                  # paper Fig. 5: generator inputs, synthesis only (no KD)
    python -m bench.compare methods --budget-min 5 --only nayer,fm synthesis.bf16=false   # subsets, overrides
    python -m bench.compare inputs --replot         # table and plots again from results/compare-inputs.json

Every variant runs `nayer.run` (one process, both cores) with the real CIFAR-10 ResNet-56 teacher of
../shared/data, a ResNet-20 student, configs/cifar10.yaml + configs/profiles/cpu.yaml, seed 0, plus the variant's
own keys. `methods`: each method's reference recipe (configs/methods/*.yaml) scaled for this CPU the way the CPU
profile scales NAYER's (generator batch 200, warm-up 20 -> 2 epochs, DeepInversion's 1000 pixel steps -> 200),
the same KD schedule, and the same budget. `inputs`: the generator-input ablations of Fig. 5 / supplementary B.4
(LTE, one-hot, Z, cat(LTE, Z), sum(OH, Z), LTE + noisy layer 1-to-1, K-to-1), 6 warm-up rounds of 2 iterations
x g = 30 at batch 100 each (the CE-convergence curve and the diversity need no student). The CE columns and curves
average the rounds after the first: in the first the generator itself is still untrained, for every input alike.
Writes bench/results/compare-<preset>.{md,csv,json} and -accuracy.png / -ce.png / -diversity.png. Run by hand.
"""

from __future__ import annotations

import argparse
import csv
import json
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from nayer.run_report import read_metrics  # noqa: E402
from bench.shared_data import TEACHER, TEST_SET, require  # noqa: E402
from nayer.cli_config import parse_config  # noqa: E402
from nayer.config import RunConfig  # noqa: E402
from nayer.run import run  # noqa: E402

METHOD_CPU = ["synthesis.batch_size=200", "warmup=2"]  # the CPU profile's scaling, applied to every method
PRESETS = {
    "methods": {
        "budget_min": 15.0,
        "variants": {
            "nayer": [],
            "fm": [f"config={ROOT / 'configs/methods/fm.yaml'}", *METHOD_CPU],
            "deepinv": [f"config={ROOT / 'configs/methods/deepinv.yaml'}", *METHOD_CPU, "synthesis.g_steps=200"],
        },
    },
    "inputs": {
        "budget_min": 0.0,  # a fixed amount of work instead: 6 rounds x 2 iterations x 30 steps
        "common": ["warmup=6", "epochs=0", "synthesis.batch_size=100", "synthesis.g_steps=30",
                   "synthesis.warmup_loops=2"],
        "variants": {
            "LTE": ["generator.input=lte"],
            "one-hot": ["generator.input=onehot"],
            "Z": ["generator.input=z"],
            "cat(LTE,Z)": ["generator.input=cat_lte_z"],
            "sum(OH,Z)": ["generator.input=sum_oh_z"],
            "LTE+NL 1-to-1": ["generator.input=lte_nl", "generator.noisy.mode=one_to_one"],
            "LTE+NL K-to-1": ["generator.input=lte_nl", "generator.noisy.mode=k_to_1"],
        },
    },
}


def run_variant(preset: str, name: str, extra: list[str], budget_min: float, out: Path) -> dict:
    """One nayer.run; returns its summary and every metrics.jsonl record."""
    files = [f"{ROOT / 'configs/cifar10.yaml'}", f"{ROOT / 'configs/profiles/cpu.yaml'}"]
    files += [e.split("=", 1)[1] for e in extra if e.startswith("config=")]
    run_name = f"compare-{preset}-" + "".join(c if c.isalnum() else "_" for c in name)
    shutil.rmtree(out / "runs" / run_name, ignore_errors=True)  # the bench's own folder from an earlier run
    cfg = parse_config(RunConfig, [
        f"config={','.join(files)}", f"name={run_name}", f"out_dir={out / 'runs'}", "seed=0",
        "teacher.arch=resnet56", f"teacher.checkpoint={TEACHER}", "student.arch=resnet20",
        f"data.eval={TEST_SET}", f"time_budget_s={budget_min * 60}",
        *PRESETS[preset].get("common", []), *(e for e in extra if not e.startswith("config="))])
    start = time.perf_counter()
    summary = run(cfg)
    summary["bench_wall_s"] = time.perf_counter() - start
    records = read_metrics(out / "runs" / run_name)
    return {"name": name, "overrides": extra, "budget_s": budget_min * 60, "summary": summary, "records": records}


def mean(values: list) -> float | None:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def after_first(records: list[dict]) -> list[dict]:
    """The rounds the CE statistics average: all but the first (the generator's own start), if there are more."""
    return records[1:] if len(records) > 1 else records


def row(result: dict) -> dict:
    """The table row of a variant: accuracy, times, and the paper's synthesis metrics over its rounds."""
    records, summary = result["records"], result["summary"]
    converging = after_first(records)
    scored = [r for r in records if "top1" in r]
    first_60 = next((r["elapsed"] for r in scored if r["top1"] >= 60), None)
    # a run stops at the first epoch end past the budget, so its last epoch may overshoot; this is the last within
    in_budget = [r["top1"] for r in scored if r["elapsed"] <= result["budget_s"]] if result["budget_s"] else []
    return {
        "variant": result["name"], "rounds": len(records), "images": summary["buffer_images"],
        "final_top1": summary["final_top1"], "top1_in_budget": in_budget[-1] if in_budget else None,
        "best_top1": summary["best_top1_on_test_set"],
        "minutes_to_60": None if first_60 is None else first_60 / 60,
        "synthesis_s": sum(r["syn_time"] for r in records), "total_s": summary["wall_time_s"],
        "images_per_synthesis_s": summary["buffer_images"] / max(sum(r["syn_time"] for r in records), 1e-9),
        "ce_steps_to_0.1": mean([r.get("syn_ce_steps") for r in converging]),
        "ce_reached": mean([r.get("syn_ce_reached") for r in converging]),
        "final_ce": mean([r["syn_ce_curve"][-1] for r in converging if r.get("syn_ce_curve")]),
        "diversity": mean([r.get("syn_diversity") for r in records]),
        "diversity_min": mean([r.get("syn_diversity_min") for r in records]),
        # the last round's: repeats show as a nearest distance that keeps falling, which a mean over rounds hides
        "diversity_min_last": next((r["syn_diversity_min"] for r in reversed(records)
                                    if r.get("syn_diversity_min") is not None), None),
        "is": mean([r.get("syn_is") for r in records]),
    }


def write_outputs(preset: str, results: list[dict], out: Path, argv: list[str]) -> list[dict]:
    rows = [row(r) for r in results]
    stem = out / f"compare-{preset}"
    (stem.with_suffix(".json")).write_text(json.dumps({"command": "python -m bench.compare " + " ".join(argv),
                                                       "rows": rows, "runs": results}, indent=1))
    with open(stem.with_suffix(".csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    fmt = {"final_top1": ".2f", "top1_in_budget": ".2f", "best_top1": ".2f", "minutes_to_60": ".1f",
           "synthesis_s": ".0f", "total_s": ".0f", "images_per_synthesis_s": ".1f", "ce_steps_to_0.1": ".1f",
           "ce_reached": ".2f", "final_ce": ".3f",
           "diversity": ".3f", "diversity_min": ".3f", "diversity_min_last": ".3f", "is": ".2f"}
    lines = [f"# compare: {preset}", "", f"`python -m bench.compare {' '.join(argv)}`", "",
             "| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
    for r in rows:
        lines.append("| " + " | ".join("-" if v is None else format(v, fmt[k]) if k in fmt else str(v)
                                       for k, v in r.items()) + " |")
    lines += ["", "Variants (on top of configs/cifar10.yaml + configs/profiles/cpu.yaml, seed 0):", ""]
    lines += [f"- {r['name']}: `{' '.join(r['overrides']) or '(none)'}`" for r in results]
    lines += [""] + ([f"![accuracy](compare-{preset}-accuracy.png)"] if any("top1" in x for r in results
                                                                            for x in r["records"]) else [])
    lines += [f"![CE](compare-{preset}-ce.png)", f"![diversity](compare-{preset}-diversity.png)"]
    (stem.with_suffix(".md")).write_text("\n".join(lines) + "\n")
    plot(preset, results, out)
    return rows


def plot(preset: str, results: list[dict], out: Path) -> None:
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for r in results:
        scored = [x for x in r["records"] if "top1" in x]
        if scored:
            ax.plot([x["elapsed"] / 60 for x in scored], [x["top1"] for x in scored], marker="o", ms=3, label=r["name"])
    ax.set(xlabel="wall-clock minutes", ylabel="student top-1 on CIFAR-10 test (%)", title="accuracy vs. time")
    ax.grid(alpha=0.3)
    if ax.lines:  # no student, no accuracy plot (the inputs preset)
        ax.legend(fontsize=8)
        fig.savefig(out / f"compare-{preset}-accuracy.png", dpi=110, bbox_inches="tight")
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6.5, 4))  # Fig. 5a: the teacher's CE after each generator step
    for r in results:
        curves = [x["syn_ce_curve"] for x in after_first(r["records"]) if x.get("syn_ce_curve")]
        if curves:
            length = min(map(len, curves))
            ax.plot(range(1, length + 1), [sum(c[i] for c in curves) / len(curves) for i in range(length)],
                    label=r["name"])
    ax.axhline(0.1, color="gray", ls="--", lw=1)
    ax.set(xlabel="generator step within an iteration", ylabel="teacher CE on the batch (mean, rounds 2+)",
           yscale="log", title="CE convergence")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.savefig(out / f"compare-{preset}-ce.png", dpi=110, bbox_inches="tight")
    plt.close(fig)

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))  # diversity of each round's images against earlier ones
    for r in results:
        rounds = [x for x in r["records"] if x.get("syn_diversity") is not None]
        for ax, key in zip(axes, ("syn_diversity", "syn_diversity_min")):
            ax.plot([x["epoch"] + 1 for x in rounds], [x[key] for x in rounds], marker="o", ms=3, label=r["name"])
    axes[0].set(xlabel="round (1 = the first)", ylabel="mean feature distance to earlier images",
                title="diversity (mean)")
    axes[1].set(xlabel="round (1 = the first)", ylabel="mean distance to the nearest earlier image",
                title="diversity (min)")
    for ax in axes:
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.savefig(out / f"compare-{preset}-diversity.png", dpi=110, bbox_inches="tight")
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("preset", choices=sorted(PRESETS))
    ap.add_argument("--budget-min", type=float, help="wall-clock budget per variant (default: the preset's)")
    ap.add_argument("--only", default="", help="comma-separated variant names")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    ap.add_argument("--replot", action="store_true", help="rewrite table and plots from <out>/compare-<preset>.json")
    ap.add_argument("overrides", nargs="*", help="extra key=value config overrides for every variant")
    args = ap.parse_intermixed_args()
    out = Path(args.out)
    if args.replot:
        saved = out / f"compare-{args.preset}.json"
        if not saved.is_file():
            sys.exit(f"error: --replot needs {saved} (run the preset first)")
        data = json.loads(saved.read_text())
        write_outputs(args.preset, data["runs"], out, data["command"].split()[2:])
        return
    require(TEACHER, TEST_SET)
    preset = PRESETS[args.preset]
    variants = preset["variants"]
    chosen = [v for v in args.only.split(",") if v] or list(variants)
    unknown = [v for v in chosen if v not in variants]
    if unknown:
        sys.exit(f"error: unknown variant(s) {unknown}; {args.preset} has: {', '.join(variants)}")
    budget = preset["budget_min"] if args.budget_min is None else args.budget_min
    out.mkdir(parents=True, exist_ok=True)
    results = []
    for name in chosen:
        print(f"== {args.preset}: {name}", flush=True)
        results.append(run_variant(args.preset, name, [*variants[name], *args.overrides], budget, out))
    rows = write_outputs(args.preset, results, out, sys.argv[1:])
    print(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
