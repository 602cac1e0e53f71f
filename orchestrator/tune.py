"""Ray Tune sweeps: every trial is a full pipeline run (its own synthesis actors and DeepSpeed ranks), reporting
the student's top-1 and the synthesis time so far after every KD round, so ASHA can stop weak trials early.

    python -m orchestrator.tune config=configs/digits.yaml sweep=configs/sweeps/digits_g_adv.yaml \\
        teacher.checkpoint=runs/digits-teacher/teacher.pt name=sweep-1
    python -m orchestrator.tune config=configs/cifar10.yaml,configs/profiles/cpu.yaml \\
        sweep=configs/sweeps/cifar10_g.yaml teacher.checkpoint=... data.eval=... name=g-sweep   # paper Table 6
    python -m orchestrator.tune ... name=g-sweep resume=true       # continue an interrupted sweep
    python -m orchestrator.tune ... sweep.max_concurrent_trials=1  # any sweep key, as sweep.<key>=<value>
    python -m orchestrator.tune --help                             # every run and sweep key, its default

Every item but `sweep=` and `sweep.<key>=` is a key of the run config (`orchestrator.config.PipelineConfig`): the
base every trial starts from; the sweep file's `space` sets some of its keys per trial. The sweep lives in
`<out_dir>/<name>/` (Tune's storage_path and experiment name): one folder per trial, `<trial id>/` (Tune's
result files and the trial's pipeline run folder, with its report), and at the end `results.csv`, `results.md`
and `accuracy_vs_time.png`.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from typing import Sequence

import ray
from ray import tune
from ray.tune.schedulers import ASHAScheduler

from nayer.cli import cli
from nayer.cli_config import ConfigError
from nayer.runtime import save_text
from nayer.storage import open_storage
from orchestrator.cluster import connect, root_cause
from orchestrator.config import PipelineConfig
from orchestrator.faults import ENV as FAULTS_ENV
from orchestrator.sweep.admission import FittingTrials, largest_trial, trial_needs, trial_resources
from orchestrator.sweep.config import METRICS, SPACE_FORMS, SweepConfig, parse_sweep
from orchestrator.sweep.results import results_table, write_results
from orchestrator.sweep.trial import trial_run


def sweep_main(argv: Sequence[str]) -> list[dict]:
    """Run the sweep of `argv` (see the module docstring); returns the results table, one row per trial."""
    sweep, base, base_args = parse_sweep(argv)
    folder = open_storage(base.out_dir).require_local(
        f"out_dir={base.out_dir!r}: a sweep's folder (Tune's experiment state, the results table) is a POSIX path; "
        "a single run (python -m orchestrator.run) takes an object store URL") / base.name
    if base.resume and not tune.Tuner.can_restore(str(folder)):
        raise ConfigError(f"resume=true but {folder} holds no sweep to continue; drop resume or check name=")
    if not base.resume and folder.exists() and tune.Tuner.can_restore(str(folder)):
        raise ConfigError(f"{folder} already holds a sweep; pass resume=true to continue it or name=<new name>")
    # Trials run in this working directory (not Tune's trial folders), so the config's relative paths resolve as
    # on the command line; with `ray job submit --working-dir` that is the job's copy of the project.
    os.environ["RAY_CHDIR_TO_TRIAL_DIR"] = "0"
    largest = largest_trial(base_args, sweep.space)
    started_ray = connect(base, cpus=trial_needs(largest, sweep.driver_cpus)["CPU"])
    try:
        trainable = tune.with_resources(
            tune.with_parameters(trial_run, sweep_dir=str(folder), base_args=base_args,
                                 faults=os.environ.get(FAULTS_ENV, "")),
            functools.partial(trial_resources, base_args, sweep.driver_cpus))
        if base.resume:
            tuner = tune.Tuner.restore(str(folder), trainable, resume_unfinished=True, resume_errored=True)
        else:
            folder.mkdir(parents=True, exist_ok=True)
            save_text(json.dumps({"argv": list(argv), "sweep": dataclasses.asdict(sweep)}, indent=2) + "\n",
                      folder / "sweep.json")
            scheduler = ASHAScheduler(
                # A trial's last report comes after its run has finished (trial_run), so a rung or max_t at the last
                # KD round cannot cut a run short of its summary, student and report.
                time_attr="kd_round", max_t=base.epochs, grace_period=sweep.scheduler.grace_period,
                reduction_factor=sweep.scheduler.reduction_factor) if sweep.scheduler.type == "asha" else None
            space = {key: SPACE_FORMS[form](values) for key, spec in sweep.space.items() for form, values in spec.items()}
            tuner = tune.Tuner(
                trainable, param_space=space,
                tune_config=tune.TuneConfig(
                    metric=sweep.metric, mode=METRICS[sweep.metric], scheduler=scheduler, num_samples=sweep.num_samples,
                    # The limit goes to the search algorithm: Tune ignores max_concurrent_trials next to one.
                    search_alg=FittingTrials(base_args, sweep.driver_cpus, sweep.max_concurrent_trials, sweep.seed),
                    trial_dirname_creator=lambda trial: trial.trial_id),
                run_config=tune.RunConfig(name=base.name, storage_path=str(folder.parent),
                                          failure_config=tune.FailureConfig(max_failures=sweep.max_failures),
                                          # quiet: no status tables; each trial's round lines still show
                                          verbose=None if base.cluster.verbose else 0))
        results = tuner.fit()
        rows = results_table(results, sweep, base)
    finally:
        if started_ray:
            ray.shutdown()
    write_results(rows, sweep, folder)
    return rows


def main(argv: Sequence[str] | None = None) -> None:
    def sweep(args: list[str]) -> list[dict]:
        return [{k: v for k, v in r.items() if k != "history"} for r in sweep_main(args)]

    cli(sweep, argv, doc=__doc__, schema=PipelineConfig, parse=list, more_keys=[("sweep.", SweepConfig)],
        explain=root_cause)


if __name__ == "__main__":
    main()
