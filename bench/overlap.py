"""Benchmark: the cluster effect of overlapped rounds, measured on this machine (issue 14, benchmark 1).

    python -m bench.overlap                          # both schedules, writes bench/results/overlap.{md,json,png}
    python -m bench.overlap --kd-rounds 4 --kd-steps 30 synthesis.batch_size=100   # extra overrides for both runs
    python -m bench.overlap --replot                 # rewrite the .md and .png from overlap.json

The placement is what a cluster gives: 1 synthesis actor x 1 CPU and 1 DeepSpeed rank x 1 CPU, each pool on its own
core of this 2-core machine. CIFAR-10 profile with the real ResNet-56 teacher (-> ResNet-20), sized down to rounds
of about half a minute (fp32: this machine's CPU has no AMX or AVX-512 bf16, so bf16 autocast would be slower; a
generator batch of 64, one iteration per round; KD batch 128; evaluation on a fixed random 1000 of the test images), and
`--kd-steps` set so that a KD phase (steps + sharded eval) takes about as long as a synthesis round; 12 KD rounds
after one warm-up
round, once alternating (Algorithm 1: synthesize, then train) and once overlapped (train round r while round r+1 is
synthesized). Per KD round it quotes the round time, the synthesis and KD phase wall times and each pool's busy
share. Target: overlapped round <= 1.1 x max(synthesis, KD) of the same run; alternating round ~ synthesis + KD.
Needs ../shared/data. Run on an idle machine.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from statistics import mean

ROOT = Path(__file__).resolve().parents[1]

from nayer.run_report import read_metrics  # noqa: E402
from bench.shared_data import TEACHER, TEST_SET, require  # noqa: E402
from nayer.cli_config import parse_config  # noqa: E402
from orchestrator.config import PipelineConfig  # noqa: E402
from orchestrator.run import run  # noqa: E402

SCHEDULES = ("alternating", "overlapped")
DEFAULTS = ("bf16=false", "synthesis.batch_size=64", "kd.batch_size=128", "data.eval_limit=1000")


def run_schedule(schedule: str, args: argparse.Namespace, out: Path) -> dict:
    name = f"overlap-{schedule}"
    cfg = parse_config(PipelineConfig, [
        f"config={ROOT / 'configs/cifar10.yaml'},{ROOT / 'configs/profiles/cpu.yaml'}",
        f"name={name}", f"out_dir={out / 'runs'}", "teacher.arch=resnet56", f"teacher.checkpoint={TEACHER}",
        "student.arch=resnet20", f"data.eval={TEST_SET}", f"cluster.schedule={schedule}",
        "cluster.synth_workers=1", "cluster.trainer_workers=1", "warmup=1", "synthesis.warmup_loops=2",
        "synthesis.g_loops=1", f"kd.kd_steps={args.kd_steps}", f"epochs={args.kd_rounds}", *DEFAULTS, *args.overrides])
    summary = run(cfg)
    records = read_metrics(out / "runs" / name)
    kd = [r for r in records if r["phase"] == "kd"]
    row = {"schedule": schedule, "final_top1": summary["final_top1"], "wall_s": summary["wall_time_s"]}
    row["config"] = run_config(out, row)
    row["rounds"] = [{k: r.get(k) for k in ("epoch", "round_time", "step_synthesis_time", "kd_phase_time",
                                            "synth_busy", "kd_busy", "adv_student_round", "top1")} for r in kd]
    return summarize(row)


def summarize(row: dict) -> dict:
    """Means over the steady rounds: KD rounds in which both pools had their work. The first KD round of an
    overlapped run synthesizes its own images before it trains (nothing ran ahead of it), and its last synthesizes
    nothing (no next round)."""
    steady = [r for r in row["rounds"][1:] if r["step_synthesis_time"] > 0]
    row.update(kd_rounds=len(row["rounds"]), steady_rounds=len(steady),
               round_s=mean(r["round_time"] for r in steady), synthesis_s=mean(r["step_synthesis_time"] for r in steady),
               kd_phase_s=mean(r["kd_phase_time"] for r in steady), synth_busy=mean(r["synth_busy"] for r in steady),
               kd_busy=mean(r["kd_busy"] for r in steady))
    row["max_s"] = max(row["synthesis_s"], row["kd_phase_s"])
    row["sum_s"] = row["synthesis_s"] + row["kd_phase_s"]
    row["round_over_max"] = row["round_s"] / row["max_s"]
    row["round_over_sum"] = row["round_s"] / row["sum_s"]
    return row


def run_config(out: Path, row: dict) -> dict:
    """The sizes a run used, from its run folder's resolved config.yaml."""
    import yaml

    cfg = yaml.safe_load((out / "runs" / f"overlap-{row['schedule']}" / "config.yaml").read_text())
    return {"synthesis.batch_size": cfg["synthesis"]["batch_size"], "synthesis.g_steps": cfg["synthesis"]["g_steps"],
            "kd.batch_size": cfg["kd"]["batch_size"], "kd.kd_steps": cfg["kd"]["kd_steps"], "bf16": cfg["bf16"],
            "data.eval_limit": cfg["data"]["eval_limit"]}


def write_results(rows: list[dict], stem: Path) -> None:
    lines = ["# Overlapped vs alternating rounds: 1 synthesis actor x 1 CPU + 1 DeepSpeed rank x 1 CPU", "",
             "CIFAR-10 profile, real ResNet-56 -> ResNet-20, one generator iteration per round, "
             + ", ".join(f"{k}={v}" for k, v in (rows[0].get("config") or run_config(stem.parent, rows[0])).items())
             + f", {rows[0]['kd_rounds']} KD rounds after 1 warm-up round. Means over the steady KD rounds (both "
             "pools at work: not the first, which overlapped synthesizes its own images before it trains, nor an "
             "overlapped last one, with no next round to make). Command: `python -m bench.overlap`.", "",
             "| schedule | steady rounds | round s | synthesis s | KD phase s | max s | sum s | round / max | "
             "round / sum | synthesis busy | KD busy | final top-1 |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['schedule']} | {r['steady_rounds']} | {r['round_s']:.1f} | {r['synthesis_s']:.1f} | "
                     f"{r['kd_phase_s']:.1f} | {r['max_s']:.1f} | {r['sum_s']:.1f} | {r['round_over_max']:.3f} | "
                     f"{r['round_over_sum']:.3f} | {100 * r['synth_busy']:.0f}% | {100 * r['kd_busy']:.0f}% | "
                     f"{r['final_top1']:.2f} |")
    lines += [
        "", "Top-1 per KD round (on the fixed 1000 test images; the overlapped adversarial term of round r used "
        "the student after round r-2):", "",
        "| round | " + " | ".join(str(x["epoch"]) for x in rows[0]["rounds"]) + " |",
        "|---|" + "---|" * len(rows[0]["rounds"]),
        *(f"| {r['schedule']} | " + " | ".join(f"{x['top1']:.1f}" for x in r["rounds"]) + " |" for r in rows)]
    by = {r["schedule"]: r for r in rows}
    if len(by) == 2:
        o, a = by["overlapped"], by["alternating"]
        lines += ["", f"- overlapped round / max(synthesis, KD): **{o['round_over_max']:.3f}** (target <= 1.1)",
                  f"- alternating round / (synthesis + KD): **{a['round_over_sum']:.3f}** (target ~1)",
                  f"- alternating round / overlapped round: **{a['round_s'] / o['round_s']:.2f}x**",
                  f"- overlapping costs each pool some speed (the two cores share caches and memory bandwidth): "
                  f"synthesis {o['synthesis_s'] / a['synthesis_s']:.2f}x, KD phase {o['kd_phase_s'] / a['kd_phase_s']:.2f}x "
                  "its alternating time"]
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    stem.with_suffix(".json").write_text(json.dumps(rows, indent=1))
    plot(rows, stem.with_suffix(".png"))
    print("\n".join(lines))


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(rows), figsize=(5.5 * len(rows), 3.8), sharey=True, squeeze=False)
    for ax, row in zip(axes[0], rows):
        rounds = row["rounds"]
        x = [r["epoch"] for r in rounds]
        ax.bar([i - 0.2 for i in x], [r["step_synthesis_time"] for r in rounds], width=0.4, label="synthesis wall")
        ax.bar([i + 0.2 for i in x], [r["kd_phase_time"] for r in rounds], width=0.4, label="KD phase wall")
        ax.plot(x, [r["round_time"] for r in rounds], "k.-", label="round")
        ax.set(title=row["schedule"], xlabel="round", ylabel="seconds")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kd-rounds", type=int, default=12)
    ap.add_argument("--kd-steps", type=int, default=14)  # balanced with synthesis here (fp32)
    ap.add_argument("--schedules", default=",".join(SCHEDULES))
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    ap.add_argument("--replot", action="store_true", help="rewrite the .md and .png from the .json")
    ap.add_argument("overrides", nargs="*", help="extra key=value config overrides for both runs")
    args = ap.parse_args()
    out = Path(args.out)
    if args.replot:
        write_results([summarize(row) for row in json.loads((out / "overlap.json").read_text())], out / "overlap")
        return
    require(TEACHER, TEST_SET)
    out.mkdir(parents=True, exist_ok=True)
    rows = [run_schedule(s, args, out) for s in args.schedules.split(",")]
    write_results(rows, out / "overlap")


if __name__ == "__main__":
    main()
