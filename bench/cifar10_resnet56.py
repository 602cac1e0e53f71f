"""Benchmark: distill the real CIFAR-10 ResNet-56 teacher into a ResNet-20 for a fixed wall-clock budget on CPU.

    python -m bench.cifar10_resnet56                      # 60 min budget, writes bench/results/cifar10_resnet56.*
    python -m bench.cifar10_resnet56 --budget-min 10 --name quick synthesis.g_steps=5   # extra key=value overrides
    python -m bench.cifar10_resnet56 --pipeline       # the same run on the distributed pipeline (issue 3):
                                                      # local Ray, 2 synthesis actors, 2 DeepSpeed ranks
    python -m bench.cifar10_resnet56 --pipeline --name bench-cifar10-resnet56-overlapped cluster.schedule=overlapped \
        cluster.synth_workers=1 cluster.trainer_workers=1 kd.kd_steps=<balanced> epochs=<rounds that fit>  # issue 14

Target (issues 2 and 3): student top-1 >= 60% on ../shared/data/cifar10_test.npz within 60 minutes on 2 CPU cores.
Reports top-1 after every epoch and each epoch's time split into synthesis, KD and evaluation; the budget counts
everything (set-up, synthesis, KD, evaluation, checkpoints). Not a test: run it by hand; it needs ../shared/data.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

from nayer.run_report import read_metrics  # noqa: E402
from bench.shared_data import TEACHER, TEST_SET, require  # noqa: E402
from nayer.cli_config import parse_config  # noqa: E402
from nayer.config import RunConfig  # noqa: E402
from nayer.run import run  # noqa: E402
from orchestrator.config import PipelineConfig  # noqa: E402
from orchestrator.run import run as run_pipeline  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budget-min", type=float, default=60.0)
    ap.add_argument("--name", default="bench-cifar10-resnet56")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    ap.add_argument("--pipeline", action="store_true", help="run orchestrator.run instead of nayer.run")
    ap.add_argument("overrides", nargs="*", help="extra key=value config overrides")
    args = ap.parse_args()
    teacher, test = TEACHER, TEST_SET
    require(teacher, test)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    schema, runner = (PipelineConfig, run_pipeline) if args.pipeline else (RunConfig, run)
    cfg = parse_config(schema, [
        f"config={ROOT / 'configs/cifar10.yaml'},{ROOT / 'configs/profiles/cpu.yaml'}",
        f"name={args.name}", f"out_dir={out / 'runs'}",
        "teacher.arch=resnet56", f"teacher.checkpoint={teacher}", "student.arch=resnet20",
        f"data.eval={test}", f"time_budget_s={args.budget_min * 60}", *args.overrides,
    ])
    start = time.perf_counter()
    summary = runner(cfg)
    summary["bench_wall_s"] = time.perf_counter() - start
    metrics = read_metrics(out / "runs" / args.name)
    write_report(out / args.name, cfg, summary, metrics, args.budget_min)


def write_report(stem: Path, cfg: RunConfig, summary: dict, metrics: list[dict], budget_min: float) -> None:
    rows = ["| epoch | phase | elapsed min | synthesis s | KD s | eval s | buffer | top-1 % |",
            "|---|---|---|---|---|---|---|---|"]
    for m in metrics:
        rows.append(f"| {m['epoch']} | {m['phase']} | {m['elapsed'] / 60:.1f} | {m['syn_time']:.1f} | "
                    f"{m.get('kd_time', 0):.1f} | {m.get('eval_time', 0):.1f} | {m['buffer']} | "
                    f"{m['top1']:.2f} |" if "top1" in m else
                    f"| {m['epoch']} | {m['phase']} | {m['elapsed'] / 60:.1f} | {m['syn_time']:.1f} | - | - | "
                    f"{m['buffer']} | - |")
    kd = [m for m in metrics if m["phase"] == "kd"]
    mean = lambda key, ms: sum(m[key] for m in ms) / max(len(ms), 1)  # noqa: E731
    reached = next((m for m in kd if m["top1"] >= 60.0), None)
    text = [
        f"# CIFAR-10 ResNet-56 -> ResNet-20, {budget_min:.0f} min CPU budget",
        "",
        f"- teacher top-1: {summary['teacher_top1']:.2f}%; final student top-1: {summary['final_top1']}; "
        f"best epoch (test-set selected, optimistic): {summary['best_top1_on_test_set']}",
        f"- 60% reached: {'epoch %d at %.1f min' % (reached['epoch'], reached['elapsed'] / 60) if reached else 'no'}",
        f"- wall time {summary['bench_wall_s'] / 60:.1f} min, {summary.get('epochs_run', summary.get('rounds_run'))} "
        f"epochs, {summary['buffer_images']} synthetic images in the buffer, "
        + (f"device {summary['device']}" if "device" in summary else
           f"pipeline: {summary['synth_workers']} synthesis actors, {summary['trainer_workers']} DeepSpeed ranks"),
        f"- mean per KD epoch: synthesis {mean('syn_time', kd):.1f} s, KD {mean('kd_time', kd):.1f} s, "
        f"eval {mean('eval_time', kd):.1f} s",
        *([f"- pipeline, mean per KD round: {mean('round_time', kd):.1f} s = synthesis {mean('syn_time', kd):.1f} s "
           f"(actors' compute {mean('syn_compute_time', kd):.1f} s) + commit {mean('commit_time', kd):.3f} s + "
           f"KD phase {mean('kd_phase_time', kd):.1f} s (steps {mean('kd_time', kd):.1f} s of which reading "
           f"{mean('kd_read_time', kd):.2f} s, eval {mean('eval_time', kd):.1f} s, DeepSpeed save "
           f"{mean('save_time', kd):.2f} s) + driver checkpoint {mean('checkpoint_time', kd):.2f} s; "
           f"outside compute {100 * mean('outside_compute', kd):.1f}% of the round"]
          if kd and "round_time" in kd[0] and kd[0].get("schedule") != "overlapped" else []),
        *([f"- pipeline, overlapped, mean per KD round: {mean('round_time', kd):.1f} s, while the actors "
           f"synthesized the next round for {mean('step_synthesis_time', kd):.1f} s (busy "
           f"{100 * mean('synth_busy', kd):.0f}%) and the ranks' KD phase took {mean('kd_phase_time', kd):.1f} s "
           f"(busy {100 * mean('kd_busy', kd):.0f}%; steps {mean('kd_time', kd):.1f} s of which waiting for "
           f"batches {mean('kd_read_time', kd):.2f} s, eval {mean('eval_time', kd):.1f} s); driver checkpoint "
           f"{mean('checkpoint_time', kd):.2f} s; rank reads per round {mean('kd_read_bytes', kd[1:] or kd) / 1e6:.1f}"
           f" MB against {mean('committed_bytes', kd[1:] or kd) / 1e6:.1f} MB committed"]
          if kd and kd[0].get("schedule") == "overlapped" else []),
        f"- config: g_steps={cfg.synthesis.g_steps} g_loops={cfg.synthesis.g_loops} "
        f"bs_gen={cfg.synthesis.batch_size} warmup={cfg.warmup}x{cfg.synthesis.warmup_loops} "
        f"kd_steps={cfg.kd.kd_steps} bs_kd={cfg.kd.batch_size} epochs={cfg.epochs} lte={cfg.lte.encoder} "
        f"bf16={cfg.bf16} compile={cfg.compile}",
        "",
        *rows,
    ]
    stem.with_suffix(".md").write_text("\n".join(text) + "\n")
    stem.with_suffix(".json").write_text(json.dumps({"summary": summary, "metrics": [
        {k: v for k, v in m.items() if k != "per_class"} for m in metrics]}, indent=1))
    plot(stem.with_suffix(".png"), metrics)
    print("\n".join(text[:8]))


def plot(path: Path, metrics: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kd = [m for m in metrics if "top1" in m]
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    a.plot([m["elapsed"] / 60 for m in kd], [m["top1"] for m in kd], marker="o")
    a.axhline(60, color="gray", ls="--", label="target 60%")
    a.set(xlabel="wall-clock minutes", ylabel="student top-1 (%)", title="accuracy vs time")
    a.legend()
    epochs = [m["epoch"] for m in metrics]
    b.bar(epochs, [m["syn_time"] for m in metrics], label="synthesis")
    b.bar(epochs, [m.get("kd_time", 0) for m in metrics], bottom=[m["syn_time"] for m in metrics], label="KD")
    b.set(xlabel="epoch", ylabel="seconds", title="time per epoch")
    b.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


if __name__ == "__main__":
    main()
