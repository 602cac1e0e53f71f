"""Which trials of a sweep run at once: each trial's needs counted from its own config (its driver, its synthesis
actors and its DeepSpeed ranks), and Tune's variant generator gated so that a trial starts only when it fits beside
the trials already running."""

from __future__ import annotations

from typing import Sequence

import ray
from ray import tune
from ray.tune.search.basic_variant import BasicVariantGenerator

from orchestrator.config import PipelineConfig
from orchestrator.sweep.config import trial_config


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
