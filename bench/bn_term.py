"""Benchmark (issue 18): the paper's BN-statistics term against the scale-free forms, on the three shared teachers.

    python -m bench.bn_term                                  # every teacher x loss, then bench/results/bn-term.*
    python -m bench.bn_term --teachers cifar100 --losses paper,kl   # a subset; finished runs are reused
    python -m bench.bn_term --report-only                    # the tables and plot from the run folders there
    python -m bench.bn_term --probe --losses paper,normalized,kl synthesis.a_bn=10   # short runs to pick candidates
    python -m bench.bn_term --ratios                         # L_paper / L_relative per teacher: relative's weight
    python -m bench.bn_term --report-only --losses paper,relative --stored bench/results/bn-term-bf16.json
                                                             # runs whose folders are gone, from an earlier report

Per teacher and loss, one run with the same seed and budget:
- digits: the `make run` example (configs/digits.yaml on the pipeline: local Ray, 2 actors, 2 DeepSpeed ranks);
- cifar10: ../shared/data/cifar10_resnet56.pt -> ResNet-20, configs/cifar10.yaml + the CPU profile, 12 KD rounds;
- cifar100: ../shared/data/cifar100_resnet20.pt -> ResNet-20, configs/cifar100.yaml + the CPU profile, 12 KD
  rounds, with the normalization of that teacher's README.
Per round it tabulates the teacher's CE and target agreement on the kept batches, the BN term's share of the
generator loss and the student's top-1. Run folders: bench/results/runs/bn-<teacher>-<loss>. Not a test: it
needs ../shared/data and takes about 25 minutes per loss on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

from bench.shared_data import SHARED, require  # noqa: E402
from nayer.config import SynthesisConfig  # noqa: E402
from nayer.losses import RELATIVE_A_BN_PER_A_CLS  # noqa: E402

CONFIGS = ROOT / "configs"
CPU_PROFILE = CONFIGS / "profiles" / "cpu.yaml"
TEACHERS = {
    "digits": [f"config={CONFIGS / 'digits.yaml'}", "teacher.checkpoint=runs/digits-teacher/teacher.pt"],
    "cifar10": [f"config={CONFIGS / 'cifar10.yaml'},{CPU_PROFILE}", "epochs=12",
                "teacher.arch=resnet56", f"teacher.checkpoint={SHARED / 'cifar10_resnet56.pt'}",
                "student.arch=resnet20", f"data.eval={SHARED / 'cifar10_test.npz'}"],
    "cifar100": [f"config={CONFIGS / 'cifar100.yaml'},{CPU_PROFILE}", "epochs=12",
                 "teacher.arch=resnet20", f"teacher.checkpoint={SHARED / 'cifar100_resnet20.pt'}",
                 "student.arch=resnet20", f"data.eval={SHARED / 'cifar100_test.npz'}",
                 "data.mean=[0.5070,0.4865,0.4409]", "data.std=[0.2673,0.2564,0.2761]"],
}
RUNS = ROOT / "bench" / "results" / "runs"
# Each form's own weight: `relative`'s a_bn follows from a_cls by its rule (every teacher here has a_cls = 0.5)
FORM_OVERRIDES = {"relative": [f"synthesis.a_bn={RELATIVE_A_BN_PER_A_CLS * SynthesisConfig.a_cls:g}"]}


def run_one(teacher: str, loss: str, name: str, overrides: list[str], pipeline: bool) -> Path:
    """The run folder `name`, running (teacher, loss) first unless its summary.json is there."""
    folder = RUNS / name
    if (folder / "summary.json").is_file():
        return folder
    args = [*TEACHERS[teacher], f"name={name}", f"out_dir={RUNS}", f"synthesis.bn_loss={loss}",
            *FORM_OVERRIDES.get(loss, []), *overrides]
    if (folder / "checkpoint.pt").is_file() or (folder / "checkpoints").is_dir():
        args.append("resume=true")  # a run stopped earlier continues from its last checkpoint
    elif folder.is_dir():
        shutil.rmtree(folder)  # stopped before its first checkpoint: nothing to keep
    os.chdir(ROOT)
    from nayer.cli_config import parse_config
    from nayer.config import RunConfig
    from nayer.run import run as run_single
    if teacher != "digits":
        run_single(parse_config(RunConfig, args))
        return folder
    from nayer.examples.digits import distill  # trains the digits teacher on first use, as `make run` does
    from orchestrator.config import PipelineConfig
    from orchestrator.run import run as run_pipeline
    schema, runner = (PipelineConfig, run_pipeline) if pipeline else (RunConfig, run_single)
    distill(parse_config(schema, args), runner)
    return folder


def rounds(folder: Path) -> list[dict]:
    """One row per round (the last record of a round logged twice), from the run's metrics.jsonl."""
    from nayer.run_report import read_metrics
    from nayer.verdict import latest_rounds
    rows = [r for r in latest_rounds(read_metrics(folder)) if "phase" in r]
    if rows and not (folder / "summary.json").is_file():  # a run stopped before its last round
        rows[-1] = {**rows[-1], "finished": False}
    return rows


def cell(value, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def form_weights(results: dict[str, dict[str, list[dict]]]) -> str:
    """The per-form overrides of the losses in `results`, e.g. 'relative synthesis.a_bn=300'."""
    losses = dict.fromkeys(loss for by_loss in results.values() for loss in by_loss)
    return ", ".join(f"{loss} {' '.join(FORM_OVERRIDES[loss])}" for loss in losses if loss in FORM_OVERRIDES) or "none"


def write_report(results: dict[str, dict[str, list[dict]]], stem: Path, overrides: list[str]) -> None:
    command = " ".join(["python -m bench.bn_term", *sys.argv[1:]])
    text = ["# The BN-statistics term: paper loss against scale-free forms (issue 18)", "",
            f"`{command}` (run folders under bench/results/runs/bn-*; overrides: {' '.join(overrides) or 'none'}; "
            f"per form: {form_weights(results)}). "
            "Per round: the teacher's CE "
            "and target agreement (%) on the kept synthetic batches as the buffer holds them, the weighted BN "
            "term's share of the generator loss on the kept steps, and the student's top-1 (%). `(stopped)`: the run "
            "was stopped before its last round, and the rows end where it stopped.", ""]
    summary = ["| teacher | loss | rounds | last CE | last agree % | mean BN share | last top-1 | mean top-1 (KD rounds) |",
               "|---|---|---|---|---|---|---|---|"]
    for teacher, by_loss in results.items():
        for loss, rows in by_loss.items():
            kd = [r for r in rows if r.get("top1") is not None]
            shares = [r["syn_bn_share"] for r in rows if r.get("syn_bn_share") is not None]
            last = rows[-1]
            finished = "" if rows[-1].get("finished", True) else " (stopped)"
            summary.append(f"| {teacher} | {loss} | {len(rows)}{finished} | {cell(last.get('syn_teacher_ce'), '.3f')} | "
                           f"{cell(last.get('syn_agreement'), '.1f')} | "
                           f"{cell(sum(shares) / len(shares) if shares else None, '.3f')} | "
                           f"{cell(kd[-1]['top1'] if kd else None, '.2f')} | "
                           f"{cell(sum(r['top1'] for r in kd) / len(kd) if kd else None, '.2f')} |")
    text += summary + [""]
    for teacher, by_loss in results.items():
        text += [f"## {teacher}", "", "| round | phase | " + " | ".join(
            f"{loss} CE | {loss} agree % | {loss} BN share | {loss} top-1" for loss in by_loss) + " |",
            "|---|---|" + "---|---|---|---|" * len(by_loss)]
        for i, row in enumerate(next(iter(by_loss.values()))):
            cells = []
            for rows in by_loss.values():
                r = rows[i] if i < len(rows) else {}
                cells += [cell(r.get("syn_teacher_ce"), ".3f"), cell(r.get("syn_agreement"), ".1f"),
                          cell(r.get("syn_bn_share"), ".3f"), cell(r.get("top1"), ".2f")]
            text.append(f"| {row['epoch']} | {row['phase']} | " + " | ".join(cells) + " |")
        text.append("")
    stem.with_suffix(".md").write_text("\n".join(text))
    stem.with_suffix(".json").write_text(json.dumps(results, indent=1))
    plot(results, stem.with_suffix(".png"))


def plot(results: dict[str, dict[str, list[dict]]], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fields = [("syn_teacher_ce", "teacher CE on kept batches"), ("syn_agreement", "target agreement %"),
              ("top1", "student top-1 %")]
    fig, axes = plt.subplots(len(results), len(fields), figsize=(4 * len(fields), 3 * len(results)), squeeze=False)
    for row, (teacher, by_loss) in enumerate(results.items()):
        for col, (key, title) in enumerate(fields):
            ax = axes[row][col]
            for loss, rows in by_loss.items():
                pts = [(r["epoch"], r[key]) for r in rows if r.get(key) is not None]
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=".", label=loss)
            ax.set_title(f"{teacher}: {title}", fontsize=9)
            ax.set_xlabel("round")
            if key == "syn_teacher_ce":
                ax.set_yscale("log")
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def scale_ratios(teachers: list[str]) -> None:
    """L_paper / L_relative per teacher on 200 real test images, uniform noise and near-gray images (seed 0): the
    constant that `relative`'s weight takes out. Writes bench/results/bn-term-ratios.md."""
    import numpy as np
    import torch
    from nayer.augment import Normalize
    from nayer.cli_config import parse_config
    from nayer.config import RunConfig
    from nayer.inputs import load_inputs
    from nayer.losses import BNStatisticsLoss
    torch.manual_seed(0)
    rows = ["| teacher | BN layers | input | L_paper | L_relative | ratio |", "|---|---|---|---|---|---|"]
    for teacher in teachers:
        inputs = load_inputs(parse_config(RunConfig, [*TEACHERS[teacher], "name=ratios"]), torch.device("cpu"))
        pick = np.random.default_rng(0).permutation(len(inputs.eval_set.x))[:200]
        real = torch.tensor(inputs.eval_set.x[pick]).permute(0, 3, 1, 2).float() / 255
        batches = {"real": real, "uniform": torch.rand_like(real), "gray": 0.5 + 0.05 * torch.randn_like(real)}
        normalize = Normalize(inputs.images.mean, inputs.images.std)
        forms = {form: BNStatisticsLoss(inputs.teacher, 0.0, form) for form in ("paper", "relative")}
        for kind, pixels in batches.items():
            with torch.no_grad(), forms["paper"].capture(), forms["relative"].capture():
                inputs.teacher(normalize(pixels))
            paper, relative = forms["paper"].loss().item(), forms["relative"].loss().item()
            rows.append(f"| {teacher} | {len(forms['paper'])} | {kind} | {paper:.2f} | {relative:.4f} | "
                        f"{paper / relative:.1f} |")
    text = ["# L_paper / L_relative on the shared teachers (issue 18)", "",
            f"`python -m bench.bn_term --ratios --teachers {','.join(teachers)}`: 200 test images, the same count of "
            "uniform-noise and near-gray (0.5 + 0.05 N(0, 1)) images, BN statistics of one batch (no EMA).", "",
            *rows, ""]
    (ROOT / "bench" / "results" / "bn-term-ratios.md").write_text("\n".join(text))
    print("\n".join(rows))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--teachers", default="digits,cifar10,cifar100")
    ap.add_argument("--losses", default="paper,relative")
    ap.add_argument("--report-only", action="store_true", help="tabulate the run folders already there")
    ap.add_argument("--probe", action="store_true",
                    help="2 warm-up rounds and 1 KD round per run, in one process: for choosing the candidates")
    ap.add_argument("--in-process", action="store_true",
                    help="digits with nayer.run (python -m nayer.examples.digits) instead of the pipeline")
    ap.add_argument("--tag", default="", help="appended to the run names and the results' file name")
    ap.add_argument("--stored", default="", help="a results .json of an earlier report: its rows stand in for the "
                                                 "(teacher, loss) runs whose folder is not there (with --report-only)")
    ap.add_argument("overrides", nargs="*", help="extra key=value config overrides for every run")
    ap.add_argument("--ratios", action="store_true", help="only L_paper / L_relative per teacher (seconds)")
    args = ap.parse_args()
    if args.ratios:
        scale_ratios(args.teachers.split(","))
        return
    overrides = [*(["epochs=1", "warmup=2"] if args.probe else []), *args.overrides]
    suffix = ("-probe" if args.probe else "") + (f"-{args.tag}" if args.tag else "")
    require(SHARED / "cifar10_resnet56.pt", SHARED / "cifar100_resnet20.pt")
    results: dict[str, dict[str, list[dict]]] = {}
    stored = json.loads(Path(args.stored).read_text()) if args.stored else {}
    for teacher in args.teachers.split(","):
        if teacher not in TEACHERS:
            sys.exit(f"error: unknown teacher '{teacher}'; choose from {', '.join(TEACHERS)}")
        for loss in args.losses.split(","):
            name = f"bn-{teacher}-{loss}{suffix}"
            folder = RUNS / name if args.report_only else run_one(teacher, loss, name, overrides,
                                                                         not (args.probe or args.in_process))
            if (folder / "metrics.jsonl").is_file():
                results.setdefault(teacher, {})[loss] = rounds(folder)
            elif loss in stored.get(teacher, {}):
                results.setdefault(teacher, {})[loss] = stored[teacher][loss]
    write_report(results, ROOT / "bench" / "results" / f"bn-term{suffix}", [*args.overrides])


if __name__ == "__main__":
    main()
