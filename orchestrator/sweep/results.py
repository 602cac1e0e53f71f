"""A finished sweep as a table (results.csv, results.md: one row per trial, its space values, how it ended, its
accuracy and times) and a plot of accuracy against wall time per trial (accuracy_vs_time.png)."""

from __future__ import annotations

import csv
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from nayer.cli import one_line  # noqa: E402
from orchestrator.config import PipelineConfig  # noqa: E402
from nayer.runtime import atomic_write, save_text  # noqa: E402
from orchestrator.cluster import root_cause  # noqa: E402
from orchestrator.sweep.config import SweepConfig  # noqa: E402

def results_table(results, sweep: SweepConfig, base: PipelineConfig) -> list[dict]:
    """One row per trial: its space values, how it ended, and its accuracy and times."""
    rows = []
    for result in results:
        run_folder = Path(result.path)  # named by trial id (trial_dirname_creator)
        history = result.metrics_dataframe
        # one report per KD round: a round a restarted trial reported again (it died before its checkpoint) counts once
        reported = list({r["kd_round"]: r for r in ([] if history is None else history.to_dict("records"))}.values())
        summary_path = run_folder / "summary.json"
        if result.error is not None:
            status = "error"
        elif summary_path.is_file() or len(reported) == base.epochs:
            # trial_run reports the last KD round only after the run has written its summary
            status = "completed"
        else:  # stopped by Tune before the run finished: the scheduler (ASHA) cut it
            status = f"stopped early by {sweep.scheduler.type.upper()}"
        row = {"trial": run_folder.name, **{k: result.config.get(k) for k in sweep.space}, "status": status,
               "kd_rounds": len(reported), "of_rounds": base.epochs,
               "final_top1": reported[-1]["top1"] if reported else None,
               "best_top1": max(r["top1"] for r in reported) if reported else None,
               "synthesis_time_s": reported[-1]["synthesis_time"] if reported else None,
               "elapsed_s": reported[-1]["elapsed"] if reported else None,
               "run_folder": str(run_folder), "error": one_line(root_cause(result.error)) if result.error else ""}
        row["history"] = [(r["elapsed"], r[sweep.metric]) for r in reported]  # for the plot
        rows.append(row)
    return sorted(rows, key=lambda r: r["trial"])


def write_results(rows: list[dict], sweep: SweepConfig, folder: Path) -> None:
    columns = [c for c in rows[0] if c != "history"] if rows else []

    def write_csv(tmp: str) -> None:
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, columns, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(rows)

    atomic_write(folder / "results.csv", write_csv)
    shown = [c for c in columns if c not in ("run_folder", "error")]
    lines = ["| " + " | ".join(shown) + " |", "|" + "---|" * len(shown)]
    for row in rows:
        lines.append("| " + " | ".join(f"{row[c]:.2f}" if isinstance(row[c], float) else str(row[c]) for c in shown) + " |")
    save_text("\n".join(lines) + "\n", folder / "results.md")

    fig, ax = plt.subplots(figsize=(7, 4))
    for row in rows:
        if not row["history"]:
            continue
        t, acc = zip(*row["history"])
        label = ", ".join(f"{k.split('.')[-1]}={row[k]}" for k in sweep.space)
        line, = ax.plot([x / 60 for x in t], acc, marker="o", ms=3, label=f"{label} ({row['status']})")
        if row["status"].startswith("stopped"):
            ax.plot(t[-1] / 60, acc[-1], "x", color=line.get_color(), ms=10, mew=2)
    ax.set(xlabel="wall-clock minutes (per trial)", ylabel=f"student {sweep.metric}", title="accuracy vs. time per trial"
           if sweep.metric == "top1" else f"{sweep.metric} vs. time per trial")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    atomic_write(folder / "accuracy_vs_time.png", lambda tmp: fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight"))
    plt.close(fig)
