"""Synthesis workers: Ray actors, each wrapping one synthesizer of `nayer.methods` (NAYER: its own generator, noisy
layers and BN-statistics EMA, its own seed; or a baseline) and writing its kept batches as WebDataset shards.

The driver splits a round's I iterations over the N workers (`split_iterations`); each worker's batches are
class-balanced (`balanced_targets`), so the round is too. Before the adversarial term is used the worker's
student copy is refreshed from the latest student weights (handed over through the object store).
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from nayer.methods import build_synthesizer
from nayer.models import build_model
from nayer.progress import LineProgress
from nayer.specs import Compute, ImageSpec
from nayer.visualize import save_sample_grid
from orchestrator.config import PipelineConfig, threads
from orchestrator.faults import FaultPlan
from orchestrator.shards import write_shards


def split_iterations(total: int, workers: int) -> list[int]:
    """Worker w runs total // N iterations, plus one for the first total % N workers (some may get 0)."""
    return [total // workers + (w < total % workers) for w in range(workers)]


def worker_seed(seed: int, worker: int) -> int:
    return seed + 7919 * worker  # distinct per worker, reproducible per run seed


class SynthesisWorker:
    """One synthesis actor. Created with `ray.remote(SynthesisWorker).options(num_cpus=..., num_gpus=...)`."""

    def __init__(self, cfg: PipelineConfig, worker: int, teacher_state: dict, embeddings: torch.Tensor,
                 images: ImageSpec, buffer_root: str, samples_dir: str, driver_checkpoint: str, faults: FaultPlan):
        torch.set_num_threads(threads(cfg.cluster.synth_cpus))  # pinned: co-located actors do not fight over cores
        self.cfg, self.worker, self.faults = cfg, worker, faults
        compute = Compute.select(cfg.device, cfg.bf16, cfg.channels_last)
        self.buffer_root, self.samples_dir = Path(buffer_root), Path(samples_dir)
        torch.manual_seed(worker_seed(cfg.seed, worker))  # the first generator's weights: the same in every run
        k = images.num_classes
        teacher = build_model(cfg.teacher.arch, k)
        teacher.load_state_dict(teacher_state)
        self.teacher = compute.place(teacher.eval().requires_grad_(False))
        self.student = compute.place(build_model(cfg.student.arch, k))
        self.synthesizer = build_synthesizer(cfg, self.teacher, self.student, embeddings.to(compute.device), images,
                                             compute, worker_seed(cfg.seed, worker))
        # A resumed run, or this actor restarted by Ray after a crash (cluster.synth_max_restarts): continue from
        # the state of the last committed round, which is what the driver's checkpoint holds.
        if Path(driver_checkpoint).is_file():
            state = torch.load(driver_checkpoint, map_location=compute.device, weights_only=True)
            self.synthesizer.load_state_dict(state["synthesizers"][worker])

    def synthesize(self, round_index: int, warmup: bool, iterations: int, student_state: dict | None,
                   min_shards: int, grid: bool) -> dict:
        """Run this worker's share of a round, write its shards; returns manifest entries and statistics."""
        start = time.perf_counter()
        # Reseeded per round: a resumed run repeats the augmentation and noisy-layer draws of the original.
        torch.manual_seed(worker_seed(self.cfg.seed, self.worker) * 100003 + round_index)
        if student_state is not None:
            self.student.load_state_dict(student_state)
        desc = f"round {round_index} synthesis worker {self.worker}"
        result = self.synthesizer.synthesize(warmup=warmup, loops=iterations,
                                             progress=lambda steps: LineProgress(steps, desc))
        compute = time.perf_counter() - start
        entries = []
        if len(result.labels):
            entries = write_shards(self.buffer_root, round_index, self.worker, result.images, result.labels,
                                   self.cfg.cluster.shard_samples, min_shards,
                                   midway=lambda: self.faults.kill_if("kill_synthesis_writing", round=round_index,
                                                                      worker=self.worker))
            if grid:
                save_sample_grid(result.images, result.labels, self.samples_dir / f"round-{round_index:05d}.png",
                                 min(self.synthesizer.num_classes, self.cfg.grid_classes), self.cfg.grid_per_class)
        return {"worker": self.worker, "shards": entries, "stats": result.stats, "compute_time": compute,
                "write_time": time.perf_counter() - start - compute}

    def state_dict(self) -> dict:
        return self.synthesizer.state_dict()
