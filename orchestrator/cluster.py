"""Where the pipeline runs: a local Ray started by the program itself (the embedded default), or an existing
cluster (`cluster.address=`, or RAY_ADDRESS as `ray job submit` sets it for the job's driver)."""

from __future__ import annotations

import logging
import math
import os
import re
import socket

import ray

from nayer.cli_config import ConfigError
from orchestrator.config import PipelineConfig


def local_cpus(cfg: PipelineConfig) -> int:
    """Logical CPUs for the local Ray. Synthesis and KD alternate within a round, so both pools are declared at
    once even when that exceeds the physical cores; each worker pins its torch threads to its own CPU share."""
    return max(os.cpu_count() or 1, math.ceil(cfg.cluster.total("CPU")))


def connect(cfg: PipelineConfig, cpus: float = 0) -> bool:
    """Attach to or start Ray; returns True when this call did (so the caller shuts it down again). A local Ray
    gets at least `cpus` logical CPUs (a sweep's largest trial with its driver)."""
    if ray.is_initialized():  # a caller (a test session, a notebook) already connected
        return False
    address = cfg.cluster.address or os.environ.get("RAY_ADDRESS", "")
    if address:
        check_reachable(address, "cluster.address" if cfg.cluster.address else "RAY_ADDRESS")
        ray.init(address=address, log_to_driver=True, logging_level=ray_log_level(cfg.cluster.verbose))
        return True
    start_local_ray(max(local_cpus(cfg), math.ceil(cpus)), cfg.cluster.object_store_mb << 20, cfg.cluster.verbose)
    return True


def ray_log_level(verbose: bool) -> int:
    """The level of Ray's own logs on this process (and of Ray Train's, see orchestrator.trainer): INFO with
    cluster.verbose, else warnings and errors only."""
    return logging.INFO if verbose else logging.WARNING


def check_reachable(address: str, source: str, timeout: float = 5.0) -> None:
    """Fail at once, naming the address, when nothing listens at a host:port (Ray itself retries for minutes)."""
    host, sep, port = address.rpartition(":")
    if not sep or address.startswith(("ray://", "http")) or not port.isdigit():
        return  # "auto", a Ray client or a job-server URL: Ray resolves those itself
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except OSError as exc:
        raise ConfigError(f"{source}={address}: no Ray head answers there ({exc.strerror or exc}); start one with "
                          "`ray start --head --port=<port>` or fix the address") from None


def start_local_ray(num_cpus: int, object_store_bytes: int, verbose: bool = False) -> None:
    """A single-machine Ray whose every socket (GCS, raylets, workers, agents, dashboard) listens on 127.0.0.1.

    Ray binds all interfaces unless RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0, which it reads once, at `import ray`
    (measured: setting the variable later changes nothing); so the constant it sets is set here too, and the
    variable for the processes Ray starts. Attaching to a cluster (`connect` with an address) is left as is:
    there the nodes must reach each other. The dashboard stays: it serves the state API Ray Train's
    placement-group cleaner polls. Ray Train's preemption watcher is left out (unless the variable is set): one
    machine has no other node to lose, and the watcher's start logs a core-worker error line on every run."""
    from ray._private import ray_constants

    os.environ[ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR] = "0"
    ray_constants.ENABLE_RAY_CLUSTER = False
    os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
    ray.init(num_cpus=num_cpus, object_store_memory=object_store_bytes, include_dashboard=True,
             dashboard_host="127.0.0.1", log_to_driver=True, logging_level=ray_log_level(verbose))


def resolve_schedule(cfg: PipelineConfig) -> str:
    """`cluster.schedule=auto` -> overlapped where synthesis and KD can compute at once without sharing a processor:
    both pools on GPUs, or a cluster of several nodes, or one machine with a core for every worker's CPUs; else
    alternating (on a laptop the two pools would only take cores from each other)."""
    c = cfg.cluster
    if c.schedule != "auto":
        return c.schedule
    if c.synth_gpus > 0 and c.trainer_gpus > 0:
        return "overlapped"
    if len([n for n in ray.nodes() if n.get("Alive")]) > 1:
        return "overlapped"
    return "overlapped" if c.total("CPU") <= (os.cpu_count() or 1) else "alternating"


def check_capacity(cfg: PipelineConfig) -> None:
    """The synthesis actors and the DeepSpeed ranks live at the same time: a cluster without the CPUs or GPUs for
    all of them would leave one waiting forever. (An autoscaling cluster that adds nodes on demand is not seen.)"""
    c, total = cfg.cluster, ray.cluster_resources()
    for resource, synth, trainer in (("CPU", c.synth_cpus, c.trainer_cpus), ("GPU", c.synth_gpus, c.trainer_gpus)):
        need, have = c.total(resource), total.get(resource, 0.0)
        if need > have:
            raise ConfigError(f"{c.synth_workers} synthesis actors x cluster.synth_{resource.lower()}s={synth:g} + "
                              f"{c.trainer_workers} ranks x cluster.trainer_{resource.lower()}s={trainer:g} = "
                              f"{need:g} {resource}s, but the Ray cluster has {have:g}; lower them or add nodes")


def last_error_line(text: str) -> str:
    """The `SomeError: message` line a remote traceback ends with (Ray's actor errors carry only text)."""
    lines = [line.strip() for line in text.splitlines() if re.match(r"^\s*[\w.]+(Error|Exception): ", line)]
    return lines[-1] if lines else (text.strip().splitlines() or [""])[0]


def root_cause(exc: BaseException) -> BaseException:
    """The error a user can act on inside Ray's wrappers: a task's or actor method's own exception
    (RayTaskError.cause) and a Ray Train worker's (WorkerGroupError.worker_failures, lowest rank first)."""
    seen: set[int] = set()
    while id(exc) not in seen:
        seen.add(id(exc))
        failures = getattr(exc, "worker_failures", None)
        if isinstance(failures, dict) and failures:
            exc = failures[min(failures)]
            continue
        cause = getattr(exc, "cause", None)
        if isinstance(cause, BaseException):
            exc = cause
            continue
        break
    return exc
