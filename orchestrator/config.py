"""The pipeline's config: every key of a NAYER run (`nayer.config.RunConfig`) plus a `cluster` section that
sizes the Ray synthesis workers, the DeepSpeed student ranks and the WebDataset buffer.

The same YAML files serve both runners (a `cluster` key in a YAML read by `nayer.run` is a typo there).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import ClassVar
from pathlib import Path

from nayer.cli_config import ConfigError
from nayer.config import RunConfig, check_choice

CORRUPT_SHARD_POLICIES = ("fail", "exclude")
SCHEDULES = ("auto", "alternating", "overlapped")
DS_BATCH_KEYS = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps")


@dataclass
class ClusterConfig:
    # "" = attach to the cluster in RAY_ADDRESS (set by `ray job submit`) if there is one,
    # else start a local Ray on this machine (the embedded default). "auto" or host:port = attach to that cluster.
    address: str = ""
    synth_workers: int = 2  # N Ray actors, each with its own generator, noisy layers and BN EMA
    synth_cpus: float = 1.0  # Ray CPUs per synthesis actor; also its torch thread count (at least 1)
    synth_gpus: float = 0.0  # Ray GPUs per synthesis actor (fractions share a GPU)
    trainer_workers: int = 2  # M DeepSpeed data-parallel ranks (Ray Train workers)
    trainer_cpus: float = 1.0  # Ray CPUs per rank; also its torch thread count (at least 1)
    trainer_gpus: float = 0.0  # > 0: ranks run on GPUs (ScalingConfig use_gpu)
    deepspeed: str = "configs/deepspeed/zero0.json"  # DeepSpeed JSON; batch sizes are filled in from kd.batch_size
    shard_samples: int = 5000  # at most this many images per WebDataset shard
    # alternating: synthesize round r, then train KD round r (Algorithm 1 exactly; each pool idles while the other
    # works). overlapped: the actors synthesize round r+1 while the ranks train round r; round r+1's adversarial
    # term then uses the student after KD round r-1 (a fixed staleness of one round). auto: overlapped where the
    # two pools have processors of their own (GPUs for both, an attached cluster, or a local machine with a core
    # for every worker), alternating where they would share cores.
    schedule: str = "auto"
    rank_buffer_gb: float = 8.0  # host memory a rank may hold its share of the buffer in; beyond it, it streams
    rank_buffer_device_gb: float = 4.0  # on a GPU: a share up to this size is held in device memory
    shuffle_buffer: int = 2000  # per-rank sample shuffle buffer when a share streams from storage
    object_store_mb: int = 1024  # local Ray only: the object store's size
    keep_checkpoints: int = 2  # student (DeepSpeed) checkpoints Ray Train keeps
    synth_max_restarts: int = 0  # Ray restarts a dead synthesis actor this often (from the last checkpoint)
    trainer_max_failures: int = 0  # Ray Train restarts the DeepSpeed ranks this often (from the last checkpoint)
    # A committed shard that fails its manifest check (size, sha256) when read or on resume: fail = stop the run
    # naming it; exclude = drop it from the buffer (moved to buffer/quarantine/) and go on. Never trained on.
    on_corrupt_shard: str = "fail"
    # false: the console holds the driver's round lines, the project's progress lines, and Ray's, Ray Train's, Ray
    # Tune's and DeepSpeed's warnings and errors; each rank's metrics go to ranks/rank-QQQ.jsonl in the run folder.
    # true: their full logs too (Ray's INFO lines, every rank's report, DeepSpeed's start-up, every actor's progress).
    verbose: bool = False
    # out_dir on an object store (s3://bucket/prefix): the local folder where the driver writes its own files
    # (config, metrics, TensorBoard, its checkpoint, the report) before uploading each; "" = <system temp>/nayer-staging
    staging_dir: str = ""

    def total(self, resource: str) -> float:
        """CPUs ("CPU") or GPUs ("GPU") the run holds for its whole length: its synthesis actors and its DeepSpeed
        ranks live at the same time."""
        synth, trainer = {"CPU": (self.synth_cpus, self.trainer_cpus), "GPU": (self.synth_gpus, self.trainer_gpus)}[resource]
        return self.synth_workers * synth + self.trainer_workers * trainer


@dataclass
class PipelineConfig(RunConfig):
    """A NAYER run on Ray: synthesis actors -> WebDataset buffer -> DeepSpeed ranks under Ray Train."""

    # A requeued SLURM job resumes on another head address; a run resubmitted with resume=true may have more or fewer
    # workers (the pools resize: see `Driver._resize` and `orchestrator.resize`); restart and corruption policies
    # may be raised.
    RESUME_MAY_CHANGE: ClassVar[tuple[str, ...]] = RunConfig.RESUME_MAY_CHANGE + (
        "cluster.address", "cluster.object_store_mb", "cluster.keep_checkpoints", "cluster.synth_max_restarts",
        "cluster.trainer_max_failures", "cluster.on_corrupt_shard", "cluster.rank_buffer_gb",
        "cluster.rank_buffer_device_gb", "cluster.verbose", "cluster.synth_workers", "cluster.synth_cpus",
        "cluster.synth_gpus", "cluster.trainer_workers", "cluster.trainer_cpus", "cluster.trainer_gpus",
        "cluster.staging_dir")

    cluster: ClusterConfig = field(default_factory=ClusterConfig)

    def validate(self) -> None:
        super().validate()
        c = self.cluster
        check_choice("cluster.on_corrupt_shard", c.on_corrupt_shard, CORRUPT_SHARD_POLICIES)
        check_choice("cluster.schedule", c.schedule, SCHEDULES)
        for key, value in [("cluster.synth_workers", c.synth_workers), ("cluster.trainer_workers", c.trainer_workers),
                           ("cluster.shard_samples", c.shard_samples), ("cluster.shuffle_buffer", c.shuffle_buffer),
                           ("cluster.keep_checkpoints", c.keep_checkpoints)]:
            if value < 1:
                raise ConfigError(f"{key} must be >= 1, got {value}")
        for key, value in [("cluster.synth_max_restarts", c.synth_max_restarts),
                           ("cluster.trainer_max_failures", c.trainer_max_failures)]:
            if value < -1:
                raise ConfigError(f"{key} must be >= 0 (or -1: without limit), got {value}")
        for key, value in [("cluster.synth_cpus", c.synth_cpus), ("cluster.synth_gpus", c.synth_gpus),
                           ("cluster.trainer_cpus", c.trainer_cpus), ("cluster.trainer_gpus", c.trainer_gpus),
                           ("cluster.rank_buffer_gb", c.rank_buffer_gb),
                           ("cluster.rank_buffer_device_gb", c.rank_buffer_device_gb)]:
            if value < 0:
                raise ConfigError(f"{key} must be >= 0, got {value}")
        if self.kd.batch_size % c.trainer_workers:
            raise ConfigError(f"kd.batch_size={self.kd.batch_size} must be divisible by cluster.trainer_workers="
                              f"{c.trainer_workers} (each rank takes an equal share of the global batch)")
        if self.device.startswith("cuda") and c.synth_gpus == 0:
            raise ConfigError(f"device={self.device} but cluster.synth_gpus=0: the synthesis actors would get no GPU; "
                              "set cluster.synth_gpus (and cluster.trainer_gpus) or device=auto")
        if self.compile:
            raise ConfigError("compile=true is single-process only (nayer.run); the DeepSpeed ranks run eager")


def threads(cpus: float) -> int:
    """Torch threads for a worker holding `cpus` Ray CPUs: pinned, so co-located workers do not oversubscribe."""
    return max(1, int(cpus))


def load_deepspeed_config(cfg: PipelineConfig) -> dict:
    """The DeepSpeed JSON with the batch keys set from the run: global batch kd.batch_size split over the ranks."""
    path = Path(cfg.cluster.deepspeed)
    if not path.is_file():
        raise ConfigError(f"cluster.deepspeed={cfg.cluster.deepspeed!r}: no such file (see configs/deepspeed/*.json)")
    try:
        ds = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ConfigError(f"cluster.deepspeed={cfg.cluster.deepspeed!r} is not valid JSON: {exc}") from None
    stage = ds.get("zero_optimization", {}).get("stage", 0)
    if stage not in (0, 1, 2):
        raise ConfigError(f"{path}: zero_optimization.stage={stage} is not supported; choose 0, 1 or 2")
    if "optimizer" in ds or "scheduler" in ds:
        raise ConfigError(f"{path}: remove 'optimizer'/'scheduler'; the student's SGD and per-epoch cosine come from "
                          f"the kd.* keys (the spec's schedule)")
    world = cfg.cluster.trainer_workers
    wanted = {"train_batch_size": cfg.kd.batch_size, "train_micro_batch_size_per_gpu": cfg.kd.batch_size // world,
              "gradient_accumulation_steps": 1}
    given = {key: ds[key] for key in DS_BATCH_KEYS if key in ds}
    if given:  # the batch comes from kd.batch_size; a JSON that says otherwise is refused, not overridden
        train, micro, accumulation = (given.get(k, wanted[k]) for k in DS_BATCH_KEYS)
        if train != micro * accumulation * world:
            raise ConfigError(f"{path}: train_batch_size={train} != train_micro_batch_size_per_gpu={micro} x "
                              f"gradient_accumulation_steps={accumulation} x {world} ranks; drop the batch keys "
                              "(they are set from kd.batch_size and cluster.trainer_workers)")
        if given != {k: wanted[k] for k in given}:
            raise ConfigError(f"{path}: {', '.join(f'{k}={v}' for k, v in given.items())} disagrees with kd.batch_size="
                              f"{cfg.kd.batch_size} over {world} ranks ({', '.join(f'{k}={wanted[k]}' for k in given)});"
                              " drop the batch keys or make them agree")
    ds.update(wanted)
    ds["zero_allow_untested_optimizer"] = True  # the client torch SGD under ZeRO >= 1
    return ds
