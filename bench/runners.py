"""Benchmark: the pipeline's student is as good as the single-process runner's, same seed and config.

    python -m bench.runners                  # ~20 min on 2 cores: results/runners.{md,json}
    python -m bench.runners --report-only    # the table from results/runners.json

Trains the digits teacher (configs/teacher/digits.yaml), then distills it twice with configs/digits.yaml (the
config `make run` runs): once with `nayer.run` (one process, Algorithm 1 as written) and once with
`orchestrator.run` (a local Ray: 2 synthesis actors, WebDataset buffer, 2 DeepSpeed ranks). Same seed, same
synthesis and KD budget; the pipeline's schedule is what `auto` picks on the machine (alternating on 2 cores,
Algorithm 1's order). A short schedule is too noisy to compare (4 epochs gave 65% against 55%), so both run the
example's full one. Targets: the same teacher top-1 and buffer size, both students above 90%, and their top-1 within
3 points of each other.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
CONFIGS = ROOT / "configs"
TARGET_GAP = 3.0  # top-1 points between the two students
TARGET_TOP1 = 90.0


def distill_both(tmp: Path) -> dict:
    """Train the teacher, then one run of each runner; their summaries and wall times."""
    from nayer.cli_config import parse_config
    from nayer.config import RunConfig
    from nayer.run import run as run_single
    from nayer.train_teacher import TeacherTrainConfig, train_teacher
    from orchestrator.config import PipelineConfig
    from orchestrator.run import run as run_pipeline

    teacher = tmp / "teacher.pt"
    train_teacher(parse_config(TeacherTrainConfig, [f"config={CONFIGS / 'teacher' / 'digits.yaml'}", f"out={teacher}"]))
    common = [f"config={CONFIGS / 'digits.yaml'}", f"teacher.checkpoint={teacher}", f"out_dir={tmp}",
              f"lte.cache_dir={tmp / 'lte'}"]
    runs = {}
    for name, schema, runner in (("single", RunConfig, run_single), ("pipeline", PipelineConfig, run_pipeline)):
        start = time.perf_counter()
        summary = runner(parse_config(schema, common + [f"name={name}"]))
        runs[name] = {**summary, "bench_wall_s": time.perf_counter() - start}
    return runs


def verdicts(runs: dict) -> dict[str, bool]:
    single, pipeline = runs["single"], runs["pipeline"]
    return {"same teacher top-1": single["teacher_top1"] == pipeline["teacher_top1"],
            "same buffer size": single["buffer_images"] == pipeline["buffer_images"],
            f"both students > {TARGET_TOP1:.0f}%": min(single["final_top1"], pipeline["final_top1"]) > TARGET_TOP1,
            f"top-1 within {TARGET_GAP:.0f} points": abs(single["final_top1"] - pipeline["final_top1"]) < TARGET_GAP}


def report(runs: dict, when: str) -> str:
    lines = ["# The two runners on the digits example: single process vs pipeline", "",
             f"`python -m bench.runners`, {when}. configs/digits.yaml, the same seed; the pipeline on a local Ray "
             "(2 actors, 2 DeepSpeed ranks).", "",
             "| runner | teacher top-1 | student top-1 (last round) | best (test-selected) | buffer images | wall s |",
             "|---|---|---|---|---|---|"]
    for name, s in runs.items():
        lines.append(f"| {name} | {s['teacher_top1']:.2f} | {s['final_top1']:.2f} | "
                     f"{s['best_top1_on_test_set']:.2f} | {s['buffer_images']} | {s['bench_wall_s']:.0f} |")
    lines += ["", "| target | met |", "|---|---|"]
    lines += [f"| {target} | {'yes' if ok else 'no'} |" for target, ok in verdicts(runs).items()]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--report-only", action="store_true", help="rewrite the table from results/runners.json")
    args = ap.parse_args()
    saved = RESULTS / "runners.json"
    if args.report_only:
        data = json.loads(saved.read_text())
    else:
        with tempfile.TemporaryDirectory() as tmp:
            data = {"runs": distill_both(Path(tmp)), "when": time.strftime("%Y-%m-%d")}
        RESULTS.mkdir(parents=True, exist_ok=True)
        saved.write_text(json.dumps(data, indent=1) + "\n")
    text = report(data["runs"], data["when"])
    (RESULTS / "runners.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
