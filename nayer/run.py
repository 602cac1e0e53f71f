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
checkpoint.pt, student.pt, summary.json, report.md + plots/ (nayer.report).
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
from nayer.models import load_model
from nayer.progress import RoundProgress, progress_bar, tracked
from nayer.report import finish_run
from nayer.run_folder import RunFolder
from nayer.runtime import RunError, save_torch, seed_everything
from nayer.specs import Compute, bf16_fallback_note
from nayer.state import Best, RunState
from nayer.visualize import save_sample_grid


def run(cfg: RunConfig) -> dict:
    """Run Algorithm 1 as configured; returns the summary (final and best student top-1, times)."""
    wall_start = time.perf_counter()
    compute = Compute.select(cfg.device, cfg.bf16, cfg.channels_last, cfg.compile)
    if note := bf16_fallback_note(cfg.bf16, compute.device):
        print(note, flush=True)
    if cfg.num_threads > 0:
        torch.set_num_threads(cfg.num_threads)
    seed_everything(cfg.seed)
    folder = RunFolder(cfg)

    inputs = load_inputs(cfg, compute.device)
    spec, eval_set = inputs.images, inputs.eval_set
    teacher = compute.place(inputs.teacher)
    student = compute.place(load_model(cfg.student.arch, spec.num_classes, cfg.student.checkpoint or None,
                                       cfg.student.weights or None, cfg.student.rename, role="student"))

    synthesizer = build_synthesizer(cfg, teacher, student, inputs.embeddings, spec, compute, cfg.seed)
    trainer = StudentTrainer(student, teacher, cfg.kd, cfg.epochs, spec, compute, cfg.on_nonfinite)
    buffer = InMemoryBuffer()
    sampler = torch.Generator().manual_seed(cfg.seed + 1)
    # KD and evaluation run the synthesizer's forwards: under compile=true its compiled ones, so that each model is
    # compiled once for the run
    kd_model = trainer.objective.student = synthesizer.student_forward
    trainer.objective.teacher = synthesizer.teacher_forward
    start_epoch, best, elapsed_before = 0, Best(), 0.0
    print(inputs.summary(), flush=True)
    folder.create(inputs.provenance)

    if cfg.resume:
        state = RunState.load(folder.checkpoint)
        student.load_state_dict(state.student)
        trainer.load_state_dict(state.trainer)
        synthesizer.load_state_dict(state.synthesizer)
        buffer = InMemoryBuffer.load(folder.buffer, state.buffer_chunks)
        sampler.set_state(state.sampler_rng)
        torch.set_rng_state(state.torch_rng)
        start_epoch, best, elapsed_before = state.epoch + 1, state.best, state.elapsed

    teacher_acc = None
    if eval_set is not None:
        teacher_acc = evaluate(teacher, eval_set, spec, compute, cfg.data.eval_batch_size)["top1"]
        tqdm.write(f"teacher top-1 on {cfg.data.eval}: {teacher_acc:.2f}%")

    metrics = folder.metrics_log()
    total = cfg.warmup + cfg.epochs
    progress = RoundProgress(cfg.name, start_epoch, total, unit="epoch")
    record: dict = {}
    for epoch in range(start_epoch, total):
        round_start = time.perf_counter()
        warm = epoch < cfg.warmup
        result = synthesizer.synthesize(warmup=warm, progress=True)
        buffer.append(result.images, result.labels)
        buffer.save_chunk(folder.buffer, buffer.num_chunks - 1)
        buffer.reset_order()
        save_sample_grid(result.images, result.labels, folder.samples / f"epoch-{epoch:05d}.png",
                         min(spec.num_classes, cfg.grid_classes), cfg.grid_per_class)
        record = {"epoch": epoch, "phase": "warmup" if warm else "kd", "buffer": len(buffer), **result.stats}
        if not warm:
            if len(buffer) == 0:
                raise RunError(f"the memory buffer is empty at KD epoch {epoch}: no synthesis batch was kept so far "
                               f"({result.stats['syn_nonfinite_steps']} non-finite generator steps this epoch); add "
                               "warm-up epochs (warmup=) or synthesis iterations (synthesis.g_loops=)")
            batches = buffer.batches(cfg.kd.batch_size, cfg.kd.kd_steps, sampler)
            record.update(trainer.train_epoch(tracked(batches, progress_bar(cfg.kd.kd_steps, "KD", leave=False)),
                                              epoch))
            if eval_set is not None:
                t0 = time.perf_counter()
                ev = evaluate(kd_model, eval_set, spec, compute, cfg.data.eval_batch_size)
                record.update(top1=ev["top1"], per_class=ev["per_class"], eval_time=time.perf_counter() - t0)
                best.update(ev["top1"], epoch)
        # trainer_start: the first KD epoch of this start (with compile=true its time includes the compilation)
        record.update(round_time=time.perf_counter() - round_start,
                      trainer_start=not warm and epoch == max(start_epoch, cfg.warmup),
                      elapsed=elapsed_before + time.perf_counter() - wall_start)
        metrics.log(record)
        RunState(epoch, student.state_dict(), trainer.state_dict(), synthesizer.state_dict(), buffer.num_chunks,
                 sampler.get_state(), torch.get_rng_state(), best, record["elapsed"]).save(folder.checkpoint)
        progress.round_done(record)
        if cfg.time_budget_s and record["elapsed"] >= cfg.time_budget_s:
            progress.write(f"time budget of {cfg.time_budget_s:.0f}s reached after epoch {epoch}")
            break
    progress.close()
    metrics.close()
    save_torch(student.state_dict(), folder.path / "student.pt")
    summary = {"name": cfg.name, "teacher_top1": teacher_acc, "final_top1": record.get("top1"),
               "best_top1_on_test_set": best.top1 if best.found else None, "best_epoch": best.epoch,
               "epochs_run": record.get("epoch", start_epoch - 1) + 1, "buffer_images": len(buffer),
               "wall_time_s": elapsed_before + time.perf_counter() - wall_start, "device": str(compute.device)}
    return finish_run(folder.path, summary)


def main(argv: Sequence[str] | None = None) -> None:
    cli(run, argv, doc=__doc__, schema=RunConfig)


if __name__ == "__main__":
    main()
