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

import csv
import dataclasses
import difflib
import json
import functools
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import ray  # noqa: E402
from ray import tune  # noqa: E402
from ray.tune.schedulers import ASHAScheduler  # noqa: E402
from ray.tune.search.basic_variant import BasicVariantGenerator  # noqa: E402

from nayer.cli import cli, one_line  # noqa: E402
from nayer.cli_config import ConfigError, parse_config, schema_keys  # noqa: E402
from nayer.runtime import atomic_write, save_text  # noqa: E402
from orchestrator.cluster import connect, root_cause  # noqa: E402
from orchestrator.config import PipelineConfig  # noqa: E402
from orchestrator.faults import ENV as FAULTS_ENV  # noqa: E402
from orchestrator.folder import PipelineFolder  # noqa: E402
from orchestrator.run import run  # noqa: E402
from orchestrator.storage import is_url  # noqa: E402

# Search-space forms of a sweep file: `<config key>: {<form>: <arguments>}`.
SPACE_FORMS = {
    "grid": lambda v: tune.grid_search(list(v)),  # every value, each repeated num_samples times
    "choice": lambda v: tune.choice(list(v)),
    "uniform": lambda v: tune.uniform(*v),
    "loguniform": lambda v: tune.loguniform(*v),
    "randint": lambda v: tune.randint(*v),  # [low, high)
}
RANGE_FORMS = ("uniform", "loguniform", "randint")
METRICS = {"top1": "max", "kd_loss": "min"}  # what a trial reports after each KD round, and its direction
TUNE_ONLY_KEYS = ("resume",)  # run keys a trial must not inherit: it resumes iff its own run folder has a checkpoint


@dataclass
class SchedulerConfig:
    type: str = "asha"  # asha: stop trials below the reduction_factor quantile at each rung | fifo: run all to the end
    grace_period: int = 2  # KD rounds every trial runs before ASHA may stop it
    reduction_factor: float = 2.0  # rungs at grace_period * rf^k rounds; the top 1/rf go on


@dataclass
class SweepConfig:
    """A sweep file (configs/sweeps/*.yaml)."""

    metric: str = "top1"  # top1 (needs data.eval) | kd_loss
    num_samples: int = 1  # samples of `space`; a grid is repeated this many times
    max_concurrent_trials: int = 0  # at most this many trials at once; 0 = as many as fit (each trial's own cluster.*)
    driver_cpus: float = 1.0  # Ray CPUs each trial's driver (its round loop, commits, checkpoints) reserves
    max_failures: int = 0  # trial level: Tune restarts a failed trial this often; it resumes from its checkpoint
    seed: int = 0  # of the random search over `space`
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    space: Dict[str, Any] = field(default_factory=dict)  # run config key -> {grid|choice|uniform|loguniform|randint: ...}


def check_space(space: dict) -> None:
    """Every key must be a run config key, every value one `{form: arguments}`; errors name what is allowed."""
    if not space:
        raise ConfigError("the sweep's `space` is empty: give at least one run config key, e.g. "
                          "synthesis.g_steps: {grid: [2, 5, 10]}")
    valid = schema_keys(PipelineConfig)
    for key, spec in space.items():
        if key not in valid:
            close = difflib.get_close_matches(key, valid, n=1)
            raise ConfigError(f"sweep space key '{key}' is not a run config key"
                              + (f" (did you mean '{close[0]}'?)" if close else "") + "; e.g. synthesis.g_steps, "
                              "synthesis.g_loops, synthesis.a_adv, synthesis.a_bn, synthesis.a_cls")
        if key in TUNE_ONLY_KEYS or key in ("name", "out_dir"):
            raise ConfigError(f"sweep space key '{key}' is set by the sweep itself and cannot be searched")
        if not isinstance(spec, dict) or len(spec) != 1 or next(iter(spec)) not in SPACE_FORMS:
            raise ConfigError(f"sweep space '{key}: {spec}' must be one of "
                              + ", ".join(f"{{{form}: ...}}" for form in SPACE_FORMS))
        form, values = next(iter(spec.items()))
        if not isinstance(values, list) or not values:
            raise ConfigError(f"sweep space '{key}: {{{form}: {values}}}' needs a non-empty list")
        if form in RANGE_FORMS and len(values) != 2:
            raise ConfigError(f"sweep space '{key}: {{{form}: {values}}}' needs [low, high]")


def parse_sweep(argv: Sequence[str]) -> tuple[SweepConfig, PipelineConfig, list[str]]:
    """Split argv into the sweep (`sweep=<file>`, `sweep.<key>=`) and the base run config; returns both and the
    base's key=value items (each trial parses them again with its own space values on top)."""
    sweep_args, run_args = [], []
    for item in argv:
        key = item.split("=", 1)[0]
        if key == "sweep":
            sweep_args.append("config=" + item.split("=", 1)[1])
        elif key.startswith("sweep."):
            sweep_args.append(item[len("sweep."):])
        else:
            run_args.append(item)
    if not any(a.startswith("config=") for a in sweep_args):
        raise ConfigError("no sweep file: pass sweep=configs/sweeps/<name>.yaml")
    sweep = parse_config(SweepConfig, sweep_args)
    check_space(sweep.space)
    if sweep.metric not in METRICS:
        raise ConfigError(f"sweep metric={sweep.metric!r} is not allowed; choose one of: {', '.join(METRICS)}")
    if sweep.scheduler.type not in ("asha", "fifo"):
        raise ConfigError(f"sweep scheduler.type={sweep.scheduler.type!r} is not allowed; choose asha or fifo")
    for key, value in [("num_samples", sweep.num_samples), ("scheduler.grace_period", sweep.scheduler.grace_period)]:
        if value < 1:
            raise ConfigError(f"sweep {key} must be >= 1, got {value}")
    if sweep.driver_cpus < 0:
        raise ConfigError(f"sweep driver_cpus must be >= 0, got {sweep.driver_cpus}")
    if sweep.scheduler.reduction_factor <= 1:
        raise ConfigError(f"sweep scheduler.reduction_factor must be > 1, got {sweep.scheduler.reduction_factor}")
    base = parse_config(PipelineConfig, run_args)
    if sweep.metric == "top1" and not base.data.eval:
        raise ConfigError("sweep metric=top1 needs a labeled test set: pass data.eval=<.npz | folder | digits:test>")
    return sweep, base, [a for a in run_args if a.split("=", 1)[0] not in TUNE_ONLY_KEYS]


def trial_config(base_args: Sequence[str], config: dict, *extra: str) -> PipelineConfig:
    """A trial's run config: the base items, then its space values (then `extra`)."""
    return parse_config(PipelineConfig, [*base_args, *(f"{k}={_as_arg(v)}" for k, v in config.items()), *extra])


def trial_needs(cfg: PipelineConfig, driver_cpus: float) -> dict[str, float]:
    """What a trial holds while it runs: its driver's CPUs, its synthesis actors and its DeepSpeed ranks."""
    return {"CPU": driver_cpus + cfg.cluster.total("CPU"), "GPU": cfg.cluster.total("GPU")}


def trial_resources(base_args: Sequence[str], driver_cpus: float, config: dict) -> tune.PlacementGroupFactory:
    """Per trial, from its own config: a head bundle for the driver plus one bundle per synthesis actor, which the
    trial's placement group captures. Ray Train reserves the ranks' own placement group (FittingTrials counts them)."""
    c = trial_config(base_args, config).cluster
    actor = {"CPU": c.synth_cpus, **({"GPU": c.synth_gpus} if c.synth_gpus else {})}
    head = {"CPU": driver_cpus} if driver_cpus else {}
    return tune.PlacementGroupFactory([head] + [dict(actor) for _ in range(c.synth_workers)])


class FittingTrials(BasicVariantGenerator):
    """Tune's grid/random variant generator that starts a trial only when the cluster holds it next to the trials
    already running, each counted by its own config (trial_needs). A trial's placement group covers its driver and
    actors but not the ranks Ray Train places itself, so without this gate Tune would start trials whose ranks then
    wait for another trial to end. A trial larger than the whole cluster starts once nothing else runs (its run's
    capacity check then names what is missing). `limit` > 0 caps the count as well."""

    def __init__(self, base_args: Sequence[str], driver_cpus: float, limit: int, seed: int):
        super().__init__(random_state=seed)  # max_concurrent 0: the gate below decides
        self.base_args, self.driver_cpus, self.limit = list(base_args), driver_cpus, limit
        self.capacity = cluster_capacity()
        self.running: dict[str, dict[str, float]] = {}  # trial id -> its needs
        self.waiting, self.waiting_needs = None, {}  # the next trial, generated but not yet started, and its needs

    def next_trial(self):  # Tune asks at every step of its loop: a waiting trial's config is parsed once
        if self.waiting is None:
            self.waiting = super().next_trial()
            if self.waiting is None:
                return None
            self.waiting_needs = trial_needs(trial_config(self.base_args, self.waiting.config), self.driver_cpus)
        needs = self.waiting_needs
        if self.running and (len(self.running) >= self.limit > 0 or not fits(needs, self.running.values(),
                                                                             self.capacity)):
            return None
        trial, self.waiting = self.waiting, None
        self.running[trial.trial_id] = needs
        return trial

    def on_trial_complete(self, trial_id: str, result=None, error: bool = False):
        super().on_trial_complete(trial_id, result, error)
        self.running.pop(trial_id, None)

    def set_state(self, state):  # a resumed sweep may run on another cluster (a requeued job's nodes)
        super().set_state(state)
        self.capacity = cluster_capacity()


def cluster_capacity() -> dict[str, float]:
    return {k: ray.cluster_resources().get(k, 0.0) for k in ("CPU", "GPU")}


def fits(needs: dict[str, float], running, capacity: dict[str, float]) -> bool:
    return all(needs[k] + sum(r[k] for r in running) <= capacity[k] + 1e-9 for k in needs)


def largest_trial(base_args: Sequence[str], space: dict) -> PipelineConfig:
    """The base with each `cluster.*` key of the space at its largest value (what a local Ray must hold)."""
    largest = {key: max(values if form in ("grid", "choice") else values[-1:])
               for key, spec in space.items() if key.startswith("cluster.") for form, values in spec.items()}
    return trial_config(base_args, largest)


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


def _as_arg(value: Any) -> str:
    return json.dumps(value) if isinstance(value, (list, dict)) else str(value)


def results_table(results, sweep: SweepConfig, base: PipelineConfig) -> list[dict]:
    """One row per trial: its space values, how it ended, and its accuracy and times."""
    rows = []
    for result in results:
        run_folder = Path(result.path)  # named by trial id (trial_dirname_creator)
        history = result.metrics_dataframe
        # one report per KD round: a round a restarted trial reported again (it died before its checkpoint) counts once
        reported = list({r.get("kd_round", r["training_iteration"]): r  # (sweeps from before kd_round: iterations)
                         for r in ([] if history is None else history.to_dict("records"))}.values())
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


def sweep_main(argv: Sequence[str]) -> list[dict]:
    """Run the sweep of `argv` (see the module docstring); returns the results table, one row per trial."""
    sweep, base, base_args = parse_sweep(argv)
    if is_url(base.out_dir):
        raise ConfigError(f"out_dir={base.out_dir!r}: a sweep's folder (Tune's experiment state, the results table) "
                          "is a POSIX path; a single run (python -m orchestrator.run) takes an object store URL")
    folder = (Path(base.out_dir) / base.name).resolve()
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
