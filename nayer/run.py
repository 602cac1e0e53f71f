"""Single-process NAYER: Algorithm 1 end to end (the reference for the distributed orchestrator).

    python -m nayer.run config=configs/cifar10.yaml teacher.checkpoint=../shared/data/cifar10_resnet56.pt \\
        data.eval=../shared/data/cifar10_test.npz
    python -m nayer.run config=configs/cifar10.yaml,configs/profiles/cpu.yaml name=quick   # a CPU-sized look
    python -m nayer.run config=configs/digits.yaml teacher.checkpoint=runs/digits-teacher/teacher.pt  # self-contained
    python -m nayer.run config=... name=<existing run> resume=true                       # continue a killed run
    python -m nayer.run --help                                                           # every key, its default

Each epoch: synthesize (warm-up: no adversarial term, no student training) -> append to the memory buffer ->
S KD steps -> evaluate on the real test set -> metrics.jsonl / TensorBoard / sample grid -> checkpoint.
Run folder `runs/<name>/`: config.yaml, metrics.jsonl, tb/, samples/epoch-XXXXX.png, buffer/chunk-*.pt,
checkpoint.pt, student.pt, summary.json, report.md + plots/ (nayer.run_report).
"""

from __future__ import annotations

import time
from typing import Sequence

import torch
from tqdm import tqdm

from nayer.buffer import InMemoryBuffer
from nayer.cli import cli
from nayer.config import RunConfig
from nayer.evaluate import evaluate
from nayer.inputs import load_inputs
from nayer.kd import StudentTrainer
from nayer.methods import build_synthesizer
from nayer.progress import RoundProgress, progress_bar, tracked
from nayer.run_report import finish_run, run_summary
from nayer.run_folder import RunFolder
from nayer.runtime import RunError, save_torch, seed_everything
from nayer.specs import Compute, bf16_fallback_note
from nayer.state import Best, RunState
from nayer.visualize import save_sample_grid


def run(cfg: RunConfig) -> dict:
    """Run Algorithm 1 as configured; returns the summary (final and best student top-1, times)."""
    return SingleProcessRun(cfg).train()


class SingleProcessRun:
    """One start of a single-process run, as named steps: its inputs, models, synthesizer, KD trainer and memory
    buffer on creation (restored from the checkpoint on resume); `train()` runs the remaining epochs."""

    def __init__(self, cfg: RunConfig):
        self.cfg, self.wall_start = cfg, time.perf_counter()
        self.compute = compute = Compute.select(cfg.device, cfg.bf16, cfg.channels_last, cfg.compile)
        if note := bf16_fallback_note(cfg.bf16, compute.device):
            print(note, flush=True)
        if cfg.num_threads > 0:
            torch.set_num_threads(cfg.num_threads)
        seed_everything(cfg.seed)
        self.folder = RunFolder(cfg)
        inputs = load_inputs(cfg, compute.device)
        self.spec, self.eval_set = inputs.images, inputs.eval_set
        self.teacher = compute.place(inputs.teacher)
        self.student = compute.place(cfg.student.build(num_classes=self.spec.num_classes, role="student"))
        self.synthesizer = build_synthesizer(cfg, self.teacher, self.student, inputs.embeddings, self.spec, compute,
                                             cfg.seed)
        self.trainer = StudentTrainer(self.student, self.teacher, cfg.kd, cfg.epochs, self.spec, compute,
                                      cfg.on_nonfinite)
        self.buffer = InMemoryBuffer()
        self.sampler = torch.Generator().manual_seed(cfg.seed + 1)
        # KD and evaluation run the synthesizer's forwards: under compile=true its compiled ones, so that each model
        # is compiled once for the run
        self.kd_model = self.trainer.objective.student = self.synthesizer.student_forward
        self.trainer.objective.teacher = self.synthesizer.teacher_forward
        self.start_epoch, self.best, self.elapsed_before = 0, Best(), 0.0
        print(inputs.summary(), flush=True)
        self.folder.create(inputs.provenance)
        if cfg.resume:
            self._restore()

    def _restore(self) -> None:
        state = RunState.load(self.folder.checkpoint)
        self.student.load_state_dict(state.student)
        self.trainer.load_state_dict(state.trainer)
        self.synthesizer.load_state_dict(state.synthesizer)
        self.buffer = InMemoryBuffer.load(self.folder.buffer, state.buffer_chunks)
        self.sampler.set_state(state.sampler_rng)
        torch.set_rng_state(state.torch_rng)
        self.start_epoch, self.best, self.elapsed_before = state.epoch + 1, state.best, state.elapsed

    def train(self) -> dict:
        cfg = self.cfg
        teacher_top1 = self._rate_teacher()
        metrics = self.folder.metrics_log()
        total = cfg.warmup + cfg.epochs
        progress = RoundProgress(cfg.name, self.start_epoch, total, unit="epoch")
        record: dict = {}
        for epoch in range(self.start_epoch, total):
            record = self.epoch(epoch)
            metrics.log(record)
            self.checkpoint(epoch, record)
            progress.round_done(record)
            if cfg.time_budget_s and record["elapsed"] >= cfg.time_budget_s:
                progress.write(f"time budget of {cfg.time_budget_s:.0f}s reached after epoch {epoch}")
                break
        progress.close()
        metrics.close()
        return self.finish(record, teacher_top1)

    def _rate_teacher(self) -> float | None:
        if self.eval_set is None:
            return None
        top1 = evaluate(self.teacher, self.eval_set, self.spec, self.compute, self.cfg.data.eval_batch_size)["top1"]
        tqdm.write(f"teacher top-1 on {self.cfg.data.eval}: {top1:.2f}%")
        return top1

    def epoch(self, epoch: int) -> dict:
        """Synthesize an epoch's images into the buffer (and its sample grid); after warm-up, S KD steps on the
        buffer and an evaluation. Returns the epoch's metrics line."""
        cfg, start = self.cfg, time.perf_counter()
        warm = epoch < cfg.warmup
        result = self.synthesizer.synthesize(warmup=warm, progress=True)
        self.buffer.append(result.images, result.labels)
        self.buffer.save_chunk(self.folder.buffer, self.buffer.num_chunks - 1)
        self.buffer.reset_order()
        save_sample_grid(result.images, result.labels, self.folder.samples / f"epoch-{epoch:05d}.png",
                         min(self.spec.num_classes, cfg.grid_classes), cfg.grid_per_class)
        record = {"epoch": epoch, "phase": "warmup" if warm else "kd", "buffer": len(self.buffer), **result.stats}
        if not warm:
            record.update(self._distill(epoch, result.stats["syn_nonfinite_steps"]))
        # trainer_start: the first KD epoch of this start (with compile=true its time includes the compilation)
        record.update(round_time=time.perf_counter() - start,
                      trainer_start=not warm and epoch == max(self.start_epoch, cfg.warmup),
                      elapsed=self.elapsed_before + time.perf_counter() - self.wall_start)
        return record

    def _distill(self, epoch: int, nonfinite_steps: int) -> dict:
        cfg = self.cfg
        if len(self.buffer) == 0:
            raise RunError(f"the memory buffer is empty at KD epoch {epoch}: no synthesis batch was kept so far "
                           f"({nonfinite_steps} non-finite generator steps this epoch); add warm-up epochs (warmup=) "
                           "or synthesis iterations (synthesis.g_loops=)")
        batches = self.buffer.batches(cfg.kd.batch_size, cfg.kd.kd_steps, self.sampler)
        record = self.trainer.train_epoch(tracked(batches, progress_bar(cfg.kd.kd_steps, "KD", leave=False)), epoch)
        if self.eval_set is not None:
            t0 = time.perf_counter()
            ev = evaluate(self.kd_model, self.eval_set, self.spec, self.compute, cfg.data.eval_batch_size)
            record.update(top1=ev["top1"], per_class=ev["per_class"], eval_time=time.perf_counter() - t0)
            self.best.update(ev["top1"], epoch)
        return record

    def checkpoint(self, epoch: int, record: dict) -> None:
        RunState(epoch, self.student.state_dict(), self.trainer.state_dict(), self.synthesizer.state_dict(),
                 self.buffer.num_chunks, self.sampler.get_state(), torch.get_rng_state(), self.best,
                 record["elapsed"]).save(self.folder.checkpoint)

    def finish(self, record: dict, teacher_top1: float | None) -> dict:
        """The student saved, the summary with the verdict, the report."""
        save_torch(self.student.state_dict(), self.folder.path / "student.pt")
        summary = run_summary(self.cfg.name, teacher_top1, record.get("top1"), self.best, len(self.buffer),
                              self.elapsed_before + time.perf_counter() - self.wall_start,
                              epochs_run=record.get("epoch", self.start_epoch - 1) + 1, device=str(self.compute.device))
        return finish_run(self.folder.path, summary)


def main(argv: Sequence[str] | None = None) -> None:
    cli(run, argv, doc=__doc__, schema=RunConfig)


if __name__ == "__main__":
    main()
