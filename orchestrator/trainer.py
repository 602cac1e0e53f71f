"""The student's DeepSpeed ranks under Ray Train's `TorchTrainer`, alive for the whole run: the trainer the driver
starts (`make_trainer`) and runs on a thread of its own (`TrainerRun`). What each rank does is `orchestrator.rank`.
"""

from __future__ import annotations

import logging
import threading

from nayer.runtime import RunError, first_line
from orchestrator.cluster import ray_log_level, root_cause
from orchestrator.config import PipelineConfig
from orchestrator.rank import RankSetup


class TrainerRun:
    """`TorchTrainer.fit()` on a driver thread: the ranks live for the whole run while the driver's round loop
    goes on; `failure()` turns a trainer that ended early into the error the driver raises."""

    def __init__(self, trainer):
        self.trainer = trainer
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._fit, name="student-trainer", daemon=True)

    def _fit(self) -> None:
        try:
            self.trainer.fit()
        except BaseException as exc:  # noqa: BLE001 - re-raised on the driver thread (failure(), join())
            self.error = exc

    def start(self) -> "TrainerRun":
        self.thread.start()
        return self

    def join(self, timeout: float = 120.0) -> None:
        self.thread.join(timeout)
        if self.error is not None:
            raise self.failure()

    def failure(self) -> BaseException:
        """The ranks' own error (a non-finite loss, a corrupt shard, a full disk) if one raised, else a RunError
        saying the ranks died, e.g. killed, out of memory or out of Ray Train restarts."""
        cause = root_cause(self.error) if self.error is not None else None
        if isinstance(cause, (ValueError, OSError, RunError)):
            return cause
        first = first_line(cause) if cause is not None else "no error"
        return RunError(f"the DeepSpeed ranks stopped ({type(cause).__name__}: {first}); "
                        "cluster.trainer_max_failures=N lets Ray Train restart them from their last checkpoint")


def make_trainer(cfg: PipelineConfig, storage_path: str, name: str, setup: RankSetup):
    """Ray Train's TorchTrainer of the run's ranks: experiment `name` under `storage_path` (the run folder's
    trainer/), each rank handed `setup`."""
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from orchestrator.rank import train_loop_per_worker

    c = cfg.cluster
    resources = {"CPU": c.trainer_cpus, **({"GPU": c.trainer_gpus} if c.trainer_gpus > 0 else {})}
    return TorchTrainer(
        train_loop_per_worker, train_loop_config={"setup": setup},
        scaling_config=ScalingConfig(num_workers=c.trainer_workers, use_gpu=c.trainer_gpus > 0,
                                     resources_per_worker=resources),
        run_config=RunConfig(name=name, storage_path=storage_path,
                             checkpoint_config=CheckpointConfig(num_to_keep=c.keep_checkpoints),
                             failure_config=FailureConfig(max_failures=c.trainer_max_failures),
                             # every rank's report and the worker group's start-up: INFO lines, kept in Ray's logs
                             logging_config=LoggingConfig(log_level=logging.getLevelName(ray_log_level(c.verbose)))))
