"""The end of a run and its report: metrics.jsonl -> report.md + plots/*.png, for either runner's run folder.

Both runners call `finish_run` when they finish (the verdict joins the summary, then summary.json and the report);
`python -m nayer.report` rebuilds the report for a run that was stopped or is still going. What a person looks at
first: the verdict (`nayer.verdict`: the student against the teacher, how the teacher rates the synthetic images,
where the time went, what looks unhealthy, with each threshold) and the latest synthetic-sample grid; then top-1
per round, each round's time split (synthesis / commit / KD / checkpoint) and the per-class accuracy of the final
student.
"""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display on cluster nodes
import matplotlib.pyplot as plt  # noqa: E402

from omegaconf import OmegaConf  # noqa: E402

from nayer.data import preset  # noqa: E402
from nayer.runtime import atomic_write, save_json, save_text  # noqa: E402
from nayer.state import Best  # noqa: E402
from nayer.verdict import judge  # noqa: E402

# Round time split, in the order a round runs. KD covers the whole student phase (steps, evaluation, the
# trainers' checkpoint); a single-process run has no commit step and times KD and evaluation separately.
TIME_PARTS = (("synthesis", ("syn_time",)), ("commit", ("commit_time",)),
              ("KD + eval", ("kd_phase_time",)), ("checkpoint", ("checkpoint_time",)))


def read_metrics(folder: Path) -> list[dict]:
    path = folder / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: {folder} is not a run folder (or no round has finished)")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def round_times(record: dict) -> dict[str, float]:
    """Seconds per part of one round (see TIME_PARTS); single-process runs: KD = kd_time + eval_time. In an
    overlapped pipeline round synthesis (of the next round) and KD run at the same time: synthesis is the wall
    time the actors worked during this round, and the parts add up to more than the round."""
    times = {part: sum(record.get(k, 0.0) for k in keys) for part, keys in TIME_PARTS}
    if "kd_phase_time" not in record:
        times["KD + eval"] = record.get("kd_time", 0.0) + record.get("eval_time", 0.0)
    if overlapped(record):
        times["synthesis"] = record.get("step_synthesis_time", 0.0)
    return times


def overlapped(record: dict) -> bool:
    return record.get("schedule") == "overlapped"


def _save_figure(fig, path: Path) -> Path:
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight"))
    plt.close(fig)
    return path


def plot_accuracy(records: list[dict], teacher_top1: float | None, path: Path) -> Path | None:
    scored = [r for r in records if "top1" in r]
    if not scored:
        return None
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([r["epoch"] for r in scored], [r["top1"] for r in scored], marker="o", ms=3, label="student")
    if teacher_top1 is not None:
        ax.axhline(teacher_top1, color="gray", ls="--", label=f"teacher {teacher_top1:.2f}%")
    ax.set(xlabel="round", ylabel="top-1 on the test set (%)", title="student accuracy per round")
    ax.grid(alpha=0.3)
    ax.legend()
    return _save_figure(fig, path)


def plot_round_times(records: list[dict], path: Path) -> Path:
    """Stacked parts per round; overlapped rounds: the synthesis and KD walls side by side under the round time."""
    fig, ax = plt.subplots(figsize=(6, 3.5))
    rounds = [r["epoch"] for r in records]
    if any(overlapped(r) for r in records):
        times = [round_times(r) for r in records]
        ax.bar([x - 0.2 for x in rounds], [t["synthesis"] for t in times], width=0.4, label="synthesis (actors)")
        ax.bar([x + 0.2 for x in rounds], [t["KD + eval"] for t in times], width=0.4, label="KD + eval (ranks)")
        ax.plot(rounds, [r.get("round_time", 0.0) for r in records], "k.-", label="round")
    else:
        bottom = [0.0] * len(records)
        for part, _ in TIME_PARTS:
            values = [round_times(r)[part] for r in records]
            if any(values):
                ax.bar(rounds, values, bottom=bottom, label=part)
                bottom = [b + v for b, v in zip(bottom, values)]
    ax.set(xlabel="round (warm-up rounds synthesize only)", ylabel="seconds", title="time per round")
    ax.grid(alpha=0.3, axis="y")
    ax.legend()
    return _save_figure(fig, path)


def plot_per_class(per_class: list[float], names: list[str] | None, path: Path) -> Path:
    k = len(per_class)
    fig, ax = plt.subplots(figsize=(max(6, min(0.35 * k, 24)), 3.5))
    ax.bar(range(k), per_class)
    if names and len(names) == k and k <= 40:
        ax.set_xticks(range(k), names, rotation=60, ha="right", fontsize=8)
    ax.set(xlabel="class", ylabel="top-1 (%)", ylim=(0, 100), title="final student: accuracy per class")
    ax.grid(alpha=0.3, axis="y")
    return _save_figure(fig, path)


def where_the_time_went(records: list[dict], total: dict[str, float], spent: float) -> str:
    if not any(overlapped(r) for r in records):
        return "Where the time went: " + ", ".join(f"{part} {total[part]:.0f} s ({100 * total[part] / spent:.0f}%)"
                                                   for part, _ in TIME_PARTS if total[part])
    wall = sum(r.get("round_time", 0.0) for r in records) or 1.0
    return (f"Rounds overlapped (cluster.schedule=overlapped): {wall:.0f} s of rounds; the actors synthesized "
            f"{100 * total['synthesis'] / wall:.0f}% of it and the ranks trained and evaluated "
            f"{100 * total['KD + eval'] / wall:.0f}% of it, at the same time; commit + checkpoints "
            f"{total['commit'] + total['checkpoint']:.0f} s")


def _class_names(folder: Path) -> list[str] | None:
    """The class names of the run's config: its own list, else its dataset preset's (None: indices)."""
    config = folder / "config.yaml"
    data = OmegaConf.load(config).get("data", {}) if config.is_file() else {}
    if data.get("class_names"):
        return list(data["class_names"])
    try:
        return list(preset(data.get("dataset", "")).class_names or []) or None
    except ValueError:
        return None


def _status(summary: dict) -> str:
    if not summary:
        return "no summary: the run is in progress or was killed (resume=true continues it)"
    if summary.get("stopped_by"):
        return f"stopped by {summary['stopped_by']} after a checkpoint (resume=true continues it)"
    return "finished"


def _fmt(value, spec: str = ".2f") -> str:
    return "-" if value is None else format(value, spec)


def write_report(folder: str | Path, records: list[dict] | None = None, summary: dict | None = None) -> Path:
    """Write `report.md` and `plots/*.png` in the run folder from its metrics.jsonl (and summary.json if the run
    finished), or from the `records` and `summary` a finishing runner already holds; returns the report's path."""
    folder = Path(folder)
    if records is None:
        records = read_metrics(folder)
    if summary is None:
        summary_path = folder / "summary.json"
        summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
    plots = folder / "plots"
    scored = [r for r in records if "top1" in r]
    teacher = summary.get("teacher_top1")
    accuracy = plot_accuracy(records, teacher, plots / "accuracy.png")
    times = plot_round_times(records, plots / "round_time.png")
    per_class = plot_per_class(scored[-1]["per_class"], _class_names(folder), plots / "per_class.png") \
        if scored and scored[-1].get("per_class") else None
    grids = sorted((folder / "samples").glob("*.png"))

    last = records[-1]
    best = max(scored, key=lambda r: r["top1"]) if scored else None
    total = {part: sum(round_times(r)[part] for r in records) for part, _ in TIME_PARTS}
    spent = sum(total.values()) or 1.0
    inputs_path = folder / "inputs.json"
    inputs = json.loads(inputs_path.read_text()) if inputs_path.is_file() else {}
    time_split = where_the_time_went(records, total, spent)
    lines = [f"# Run `{folder.name}`", "", *judge(records, summary, time_split).markdown()]
    if grids:
        lines += [f"![last synthetic samples, {grids[-1].stem}]({grids[-1].relative_to(folder).as_posix()})", "",
                  f"The last synthetic samples ({grids[-1].stem}), one row per class.", ""]
    lines += [
        "## The run", "",
        "| | |", "|---|---|",
        *([f"| teacher | {inputs['teacher']} ({inputs['weights']}); L_BN hooks {inputs['bn_layers_hooked']} "
           f"BatchNorm2d layers; class names from {inputs['class_names']}, mean/std from {inputs['mean']} |"]
          if inputs else []),
        f"| teacher top-1 | {_fmt(teacher)}% |",
        f"| student top-1, last round | {_fmt(scored[-1]['top1'] if scored else None)}% |",
        f"| best round (test set) | {_fmt(best['top1'] if best else None)}% at round {best['epoch'] if best else '-'} |",
        f"| rounds | {len(records)} ({sum(r['phase'] == 'warmup' for r in records)} warm-up) |",
        f"| synthetic images in the buffer | {last.get('buffer', '-')} |",
        f"| wall time | {_fmt(last.get('elapsed'), '.0f')} s |",
        f"| status | {_status(summary)} |", "",
    ]
    for title, image in (("Accuracy per round", accuracy), ("Time per round", times),
                         ("Per-class accuracy of the final student", per_class)):
        if image is not None:
            lines += [f"## {title}", "", f"![{title}]({image.relative_to(folder).as_posix()})", ""]
    # teacher CE / agreement: on the kept images as the buffer holds them; BN share: of the generator loss
    lines += ["## Rounds", "", "| round | phase | top-1 % | teacher agreement % | teacher CE | BN share | KD loss | "
              + " | ".join(f"{p} s" for p, _ in TIME_PARTS) + " |", "|" + "---|" * (7 + len(TIME_PARTS))]
    for r in records:
        t = round_times(r)
        lines.append(f"| {r['epoch']} | {r['phase']} | {_fmt(r.get('top1'))} | {_fmt(r.get('syn_agreement'), '.1f')} | "
                     f"{_fmt(r.get('syn_teacher_ce'), '.3f')} | {_fmt(r.get('syn_bn_share'), '.2f')} | "
                     f"{_fmt(r.get('kd_loss'), '.3f')} | " + " | ".join(f"{t[p]:.1f}" for p, _ in TIME_PARTS) + " |")
    return save_text("\n".join(lines) + "\n", folder / "report.md")


def run_summary(name: str, teacher_top1: float | None, final_top1: float | None, best: Best, buffer_images: int,
                wall_time_s: float, **more) -> dict:
    """What both runners' summary.json holds (`more`: each runner's own counts), before the verdict joins it. The
    best round is selected on the test set, and named so."""
    return {"name": name, "teacher_top1": teacher_top1, "final_top1": final_top1,
            "best_top1_on_test_set": best.top1 if best.found else None, "best_epoch": best.epoch,
            "buffer_images": buffer_images, "wall_time_s": wall_time_s, **more}


def finish_run(folder: str | Path, summary: dict) -> dict:
    """The end of either runner: the verdict joins the summary (`healthy`, `verdict`: its one line), then
    summary.json and the report are written; returns the summary."""
    folder = Path(folder)
    records = read_metrics(folder) if (folder / "metrics.jsonl").is_file() else []  # [] : stopped before a round
    verdict = judge(records, summary)
    summary = {**summary, "healthy": verdict.healthy, "verdict": verdict.line}
    save_json(summary, folder / "summary.json")
    if records:
        write_report(folder, records, summary)
    return summary
