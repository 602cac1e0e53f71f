"""One trial of a sweep: a full pipeline run (its own synthesis actors and DeepSpeed ranks) in the trial's folder,
reporting the student's top-1 and the synthesis time so far after every KD round, so ASHA can stop weak trials
early."""

from __future__ import annotations

import os
from pathlib import Path

from ray import tune

from orchestrator.faults import ENV as FAULTS_ENV
from orchestrator.folder import PipelineFolder
from orchestrator.run import run
from orchestrator.sweep.config import trial_config


def trial_run(config: dict, sweep_dir: str, base_args: list[str], faults: str) -> None:
    """One trial: the base run config plus this trial's space values -> orchestrator.run, reporting per KD round.
    Its run folder is its Tune trial folder, <sweep>/<trial id>/. `faults`: the sweep driver's NAYER_FAULTS, for
    drills (each trial fires them once, in its own run folder)."""
    if faults:
        os.environ[FAULTS_ENV] = faults
    cfg = trial_config(base_args, config, f"out_dir={sweep_dir}", f"name={tune.get_context().get_trial_id()}")
    # A trial Tune restarts after a failure (max_failures) continues its own run from the last round it finished.
    cfg.resume = (Path(sweep_dir) / cfg.name / PipelineFolder.CHECKPOINT).is_file()
    synthesis_time, last_round, final = 0.0, cfg.warmup + cfg.epochs - 1, {}

    def report(record: dict) -> None:
        nonlocal synthesis_time
        synthesis_time += record["syn_time"]
        if record["phase"] != "kd":  # warm-up rounds train no student: nothing to rank trials by yet
            return
        # kd_round, ASHA's time attribute: Tune's own training_iteration starts at 1 again when Tune restarts a
        # trial, while its run resumes at the round after its checkpoint
        metrics = {"top1": record.get("top1", float("nan")), "kd_loss": record["kd_loss"], "round": record["epoch"],
                   "kd_round": record["epoch"] - cfg.warmup + 1, "synthesis_time": synthesis_time,
                   "elapsed": record["elapsed"]}
        if record["epoch"] == last_round:
            final.update(metrics)  # reported once the run has written its student, summary and report
        else:
            tune.report(metrics)

    run(cfg, on_round=report)
    if final:  # a scheduler that stops the trial at this report stops nothing that is left to do
        tune.report(final)
