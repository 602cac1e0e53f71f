"""Synthesis workers: Ray actors, each wrapping one synthesizer of `nayer.methods` (NAYER: its own generator, noisy
layers and BN-statistics EMA, its own seed; or a baseline) and writing its kept batches as WebDataset shards.

The driver splits a round's I iterations over the N workers (`split_iterations`); each worker's batches are
class-balanced (`balanced_targets`), so the round is too; or (synthesis.targets=slices) worker w's iterations are
the round's iterations from its `first_iteration` on, slices of one class shuffle that every worker draws alike.
Before the adversarial term is used the worker's student copy is refreshed from the student weights the driver
hands over (through the object store).

Each worker checkpoints its own synthesizer after every round it synthesizes, atomically, in its own file
(`checkpoints/synthesis/worker-WWW/round-RRRRR.pt`), and keeps its files from the round of the driver's last
checkpoint on (a resume continues from there; overlapped, a later round may already be committed). A task says
which round was last committed (`SynthesisTask.after`): a worker whose state is of another round (it was restarted
by Ray, or the run resumed) loads its own file of that round, onto its own device, before it synthesizes.
"""

from __future__ import annotations

import io
import time
from dataclasses import dataclass

import torch

from nayer.methods import build_synthesizer
from nayer.models import build_model
from nayer.progress import LineProgress
from nayer.specs import Compute, ImageSpec
from nayer.storage import Storage
from nayer.visualize import save_sample_grid
from orchestrator.config import PipelineConfig, threads
from orchestrator.faults import FaultPlan
from orchestrator.messages import SynthesisOutput
from orchestrator.shards import write_shards


def split_iterations(total: int, workers: int) -> list[int]:
    """Worker w runs total // N iterations, plus one for the first total % N workers (some may get 0)."""
    return [total // workers + (w < total % workers) for w in range(workers)]


def worker_seed(seed: int, worker: int) -> int:
    return seed + 7919 * worker  # distinct per worker, reproducible per run seed


@dataclass(frozen=True)
class WorkerFiles:
    """Where a worker writes: buffer shards, sample grids, its own state files."""

    buffer: Storage
    samples: Storage
    states: Storage  # checkpoints/synthesis/: one folder per worker


@dataclass(frozen=True)
class SynthesisTask:
    """One worker's share of a round."""

    round: int
    warmup: bool  # no adversarial term
    iterations: int
    min_shards: int  # write at least this many shards (so that every rank gets a shard of the round)
    grid: bool  # also write the round's sample grid
    # the last committed synthesis round, whose state this task continues from; -1: none, or a worker a resumed run
    # added (cluster.synth_workers raised), which starts fresh
    after: int
    keep_from: int  # the synthesis round of the driver's last checkpoint: a resume may continue from it
    first_iteration: int = 0  # the round's iteration this share starts at (synthesis.targets=slices)


class SynthesisWorker:
    """One synthesis actor. Created with `ray.remote(SynthesisWorker).options(num_cpus=..., num_gpus=...)`."""

    def __init__(self, cfg: PipelineConfig, worker: int, teacher_state: dict, embeddings: torch.Tensor,
                 images: ImageSpec, files: WorkerFiles, faults: FaultPlan):
        torch.set_num_threads(threads(cfg.cluster.synth_cpus))  # pinned: co-located actors do not fight over cores
        self.cfg, self.worker, self.faults = cfg, worker, faults
        self.compute = Compute.select(cfg.device, cfg.bf16, cfg.channels_last)
        self.buffer, self.samples = files.buffer, files.samples
        self.states = files.states.sub(f"worker-{worker:03d}")
        torch.manual_seed(worker_seed(cfg.seed, worker))  # the first generator's weights: the same in every run
        k = images.num_classes
        teacher = build_model(cfg.teacher.arch, k)
        teacher.load_state_dict(teacher_state)
        self.teacher = self.compute.place(teacher.eval().requires_grad_(False))
        self.student = self.compute.place(build_model(cfg.student.arch, k))
        self.synthesizer = build_synthesizer(cfg, self.teacher, self.student, embeddings.to(self.compute.device),
                                             images, self.compute, worker_seed(cfg.seed, worker))
        self.state_round = -1  # the round the synthesizer's state is after (-1: fresh)

    @staticmethod
    def state_file(round_index: int) -> str:
        return f"round-{round_index:05d}.pt"

    def _continue_after(self, after: int) -> None:
        """Bring the synthesizer to its state after round `after` (from its own file) unless it is there."""
        if after == self.state_round:
            return
        data = self.states.read_bytes(self.state_file(after))
        if data is None:
            raise FileNotFoundError(f"synthesis worker {self.worker} has no state file "
                                    f"{self.states.location(self.state_file(after))} for the last committed round "
                                    f"{after}; the run folder is incomplete")
        state = torch.load(io.BytesIO(data), map_location=self.compute.device, weights_only=True)
        self.synthesizer.load_state_dict(state)
        self.state_round = after

    def synthesize(self, task: SynthesisTask, student_state: dict | None) -> SynthesisOutput:
        """Run this worker's share of a round, write its shards and its state; returns the shards and statistics."""
        start = time.perf_counter()
        self._continue_after(task.after)
        # Reseeded per round: a resumed run repeats the augmentation and noisy-layer draws of the original.
        torch.manual_seed(worker_seed(self.cfg.seed, self.worker) * 100003 + task.round)
        if student_state is not None:
            self.student.load_state_dict(student_state)
        desc = f"round {task.round} synthesis worker {self.worker}"
        # One worker's progress stands for the round's (they share it evenly); cluster.verbose: every worker's.
        shown = self.worker == 0 or self.cfg.cluster.verbose
        result = self.synthesizer.synthesize(warmup=task.warmup, loops=task.iterations,
                                             first_iteration=task.first_iteration,
                                             progress=(lambda steps: LineProgress(steps, desc)) if shown else False)
        compute = time.perf_counter() - start
        entries = []
        if len(result.labels):
            entries = write_shards(self.buffer, task.round, self.worker, result.images, result.labels,
                                   self.cfg.cluster.shard_samples, task.min_shards,
                                   midway=lambda: self.faults.kill_if("kill_synthesis_writing", round=task.round,
                                                                      worker=self.worker))
            self.faults.corrupt_if(self.buffer, entries[0].path, round=task.round, worker=self.worker)
            if task.grid:
                save_sample_grid(result.images, result.labels, f"round-{task.round:05d}.png",
                                 min(self.synthesizer.num_classes, self.cfg.grid_classes), self.cfg.grid_per_class,
                                 write=self.samples.write_whole)
        t0 = time.perf_counter()
        state = self.synthesizer.state_dict()
        self.states.write_whole(self.state_file(task.round), lambda tmp: torch.save(state, tmp))
        self.state_round = task.round
        for old in self.states.listing("round-*.pt"):
            if int(old[len("round-"):-len(".pt")]) < task.keep_from:
                self.states.remove(old)
        return SynthesisOutput(self.worker, entries, result.stats, compute_time=compute,
                               write_time=t0 - start - compute, state_time=time.perf_counter() - t0)
