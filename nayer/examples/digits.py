"""The self-contained example in one process (`make run` runs it on the pipeline: orchestrator.examples.digits):

    python -m nayer.examples.digits                    # train the digits teacher if needed, then distill
    python -m nayer.examples.digits name=digits-2 synthesis.g_steps=20   # any nayer.run key=value override

1. Train a ResNet-32 teacher on scikit-learn's bundled digits (train split), unless runs/digits-teacher has one.
2. Distill it data-free (NAYER, SBERT label embeddings) into a ResNet-20 with configs/digits.yaml.
3. Print teacher and student top-1 on the held-out digits and the student/teacher ratio.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from nayer.cli_config import ConfigError, parse_config
from nayer.config import RunConfig
from nayer.run import run
from nayer.train_teacher import TeacherTrainConfig, train_teacher

TEACHER = Path("runs/digits-teacher/teacher.pt")
CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs"


def main(argv: list[str] | None = None, schema=RunConfig, runner=run) -> None:
    """Train the teacher if missing, then distill with `runner` (the single-process run, or the orchestrator's)."""
    start = time.perf_counter()
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        cfg = parse_config(schema, [f"config={CONFIG_DIR / 'digits.yaml'}", f"teacher.checkpoint={TEACHER}", *args])
        if not TEACHER.is_file():
            teacher_cfg = parse_config(TeacherTrainConfig, [f"config={CONFIG_DIR / 'teacher' / 'digits.yaml'}",
                                                            f"out={TEACHER}", f"arch={cfg.teacher.arch}"])
            TEACHER.parent.mkdir(parents=True, exist_ok=True)
            train_teacher(teacher_cfg)
        summary = runner(cfg)
    except (ConfigError, FileNotFoundError, ValueError) as exc:
        sys.exit(f"error: {exc}")
    ratio = summary["final_top1"] / summary["teacher_top1"] if summary["teacher_top1"] else float("nan")
    result = {"teacher_top1": summary["teacher_top1"], "student_top1": summary["final_top1"],
              "student_over_teacher": round(ratio, 4), "wall_time_s": round(time.perf_counter() - start, 1),
              "run_folder": str(Path(cfg.out_dir) / cfg.name), "report": str(Path(cfg.out_dir) / cfg.name / "report.md")}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
