"""Where the pipeline runs: a local Ray started by the program itself (the embedded default), or an existing
cluster (`cluster.address=`, or RAY_ADDRESS as `ray job submit` sets it for the job's driver)."""

from __future__ import annotations

import os

import ray

from orchestrator.config import PipelineConfig


def local_cpus(cfg: PipelineConfig) -> int:
    """Logical CPUs for the local Ray. Synthesis and KD alternate within a round, so both pools are declared at
    once even when that exceeds the physical cores; each worker pins its torch threads to its own CPU share."""
    c = cfg.cluster
    need = c.synth_workers * c.synth_cpus + c.trainer_workers * c.trainer_cpus
    return max(os.cpu_count() or 1, int(need + 0.999))


def connect(cfg: PipelineConfig) -> bool:
    """Attach to or start Ray; returns True when this call did (so the caller shuts it down again)."""
    if ray.is_initialized():  # a caller (a test session, a notebook) already connected
        return False
    address = cfg.cluster.address or os.environ.get("RAY_ADDRESS", "")
    if address:
        ray.init(address=address, log_to_driver=True)
        return True
    # Every socket of the local instance binds 127.0.0.1 (measured: without this Ray also binds the external
    # address). The dashboard stays: it serves the state API Ray Train's placement-group cleaner polls.
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    ray.init(num_cpus=local_cpus(cfg), object_store_memory=cfg.cluster.object_store_mb << 20,
             include_dashboard=True, dashboard_host="127.0.0.1", log_to_driver=True)
    return True
