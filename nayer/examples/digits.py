"""The self-contained example in one process (`make run` runs it on the pipeline: orchestrator.examples.digits):

    python -m nayer.examples.digits                    # train the digits teacher if needed, then distill
    python -m nayer.examples.digits name=digits-2 synthesis.g_steps=20   # any nayer.run key=value override
    python -m nayer.examples.digits --help             # every key, its default

1. Train a ResNet-32 teacher on scikit-learn's bundled digits (train split), unless runs/digits-teacher has one.
2. Distill it data-free (NAYER, SBERT label embeddings) into a ResNet-20 with configs/digits.yaml.
3. Print teacher and student top-1 on the held-out digits, the student/teacher ratio and the run's verdict.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable, Sequence

from nayer.cli import cli
from nayer.cli_config import parse_config
from nayer.config import RunConfig
from nayer.run import run
from nayer.train_teacher import TeacherTrainConfig, train_teacher

TEACHER = Path("runs/digits-teacher/teacher.pt")
CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs"


def distill(cfg: Any, runner: Callable[[Any], dict]) -> dict:
    """Train the teacher if missing, then distill with `runner` (the single-process run, or the orchestrator's)."""
    start = time.perf_counter()
    if not TEACHER.is_file():
        teacher_cfg = parse_config(TeacherTrainConfig, [f"config={CONFIG_DIR / 'teacher' / 'digits.yaml'}",
                                                        f"out={TEACHER}", f"arch={cfg.teacher.arch}"])
        TEACHER.parent.mkdir(parents=True, exist_ok=True)
        train_teacher(teacher_cfg)
    summary = runner(cfg)
    ratio = summary["final_top1"] / summary["teacher_top1"] if summary["teacher_top1"] else float("nan")
    folder = Path(cfg.out_dir) / cfg.name
    return {"teacher_top1": summary["teacher_top1"], "student_top1": summary["final_top1"],
            "student_over_teacher": round(ratio, 4), "wall_time_s": round(time.perf_counter() - start, 1),
            "run_folder": str(folder), "report": str(folder / "report.md"), "verdict": summary["verdict"]}


def main(argv: Sequence[str] | None = None, schema: type = RunConfig, runner: Callable[[Any], dict] = run,
         doc: str = __doc__, explain: Callable[[BaseException], BaseException] = lambda exc: exc) -> None:
    """configs/digits.yaml and the teacher's path first, then the command line's key=value items."""
    fixed = [f"config={CONFIG_DIR / 'digits.yaml'}", f"teacher.checkpoint={TEACHER}"]
    cli(lambda cfg: distill(cfg, runner), argv, doc=doc, schema=schema,
        parse=lambda args: parse_config(schema, [*fixed, *args]), explain=explain)


if __name__ == "__main__":
    main()
