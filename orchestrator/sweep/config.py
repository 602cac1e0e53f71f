"""A sweep file (configs/sweeps/*.yaml) and the command line's sweep items: the schema, its checks, and each trial's
run config (the base run config plus the trial's space values)."""

from __future__ import annotations

import difflib
import json
from dataclasses import dataclass, field
from typing import Any, Dict, Sequence

from ray import tune

from nayer.cli_config import ConfigError, parse_config, schema_keys
from orchestrator.config import PipelineConfig

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


def _as_arg(value: Any) -> str:
    return json.dumps(value) if isinstance(value, (list, dict)) else str(value)
