"""NAYER on Ray: the round loop of Algorithm 1 spread over synthesis actors and DeepSpeed student ranks.

    python -m orchestrator.run config=configs/digits.yaml teacher.checkpoint=runs/digits-teacher/teacher.pt
    python -m orchestrator.run config=configs/cifar10.yaml,configs/profiles/cpu.yaml \\
        teacher.checkpoint=../shared/data/cifar10_resnet56.pt data.eval=../shared/data/cifar10_test.npz
    ray job submit --address http://<head>:8265 --working-dir . --runtime-env configs/ray/runtime_env.yaml -- \\
        python -m orchestrator.run config=... out_dir=/shared/runs cluster.synth_workers=8 cluster.synth_gpus=1 \\
        cluster.trainer_workers=8 cluster.trainer_gpus=1
    python -m orchestrator.run config=... name=<existing run> resume=true      # continue a killed run
    python -m orchestrator.run --help                                         # every key, its default

Without cluster.address (and no RAY_ADDRESS) a local Ray is started on this machine. Each round:
synthesize on N actors -> commit their shards to the manifest -> S DeepSpeed steps on M ranks -> evaluate ->
checkpoint (student via DeepSpeed + ray.train.report; generators, noisy layers, BN EMA, RNG, manifest and round
in checkpoints/driver.pt). Warm-up rounds synthesize only. `resume=true` continues from the last committed round
and drops shards a killed round left behind. SIGTERM / SIGUSR1 stop the run after the round in progress is
checkpointed (slurm/ray_cluster_requeue.sbatch relies on it).
Run folder `runs/<name>/`: config.yaml, metrics.jsonl, tb/, samples/round-XXXXX.png, buffer/manifest.json +
buffer/round-XXXXX/worker-YYY-ZZZZZZ.tar, trainer/student-SSSSS/round-XXXXX/ (DeepSpeed; a Ray Train experiment
per driver start S), checkpoints/driver.pt,
student.pt, summary.json, report.md + plots/ (nayer.report).
"""

from __future__ import annotations

import dataclasses
import math
import shutil
import signal
import threading
import time
from pathlib import Path
from typing import Callable, Sequence

import ray
import torch

from nayer.cli import cli
from nayer.evaluate import evaluate
from nayer.inputs import load_inputs
from nayer.progress import RoundProgress
from nayer.report import write_report
from nayer.run_folder import RunFolder
from nayer.runtime import RunError, save_json, save_torch, seed_everything
from nayer.specs import Compute
from nayer.state import Best
from orchestrator.cluster import check_capacity, connect, last_error_line, root_cause
from orchestrator.config import PipelineConfig, load_deepspeed_config
from orchestrator.faults import FaultPlan
from orchestrator.shards import Manifest, rank_samples
from orchestrator.trainer import RoundBoard, TrainerRun, make_trainer
from orchestrator.workers import SynthesisWorker, split_iterations

SUMMED_STATS = ("syn_steps", "syn_nonfinite_steps")


class PipelineFolder(RunFolder):
    """The single-process run folder plus the Ray Train storage (trainer/) and the driver checkpoint."""

    CHECKPOINT = "checkpoints/driver.pt"

    def __init__(self, cfg: PipelineConfig):
        super().__init__(cfg)
        self.trainer = self.path / "trainer"

    def outputs(self) -> list[Path]:
        return [*super().outputs(), self.trainer, self.checkpoint.parent, self.path / "faults"]


def synthesize_round(workers: list, calls: list) -> list[dict]:
    """Wait for a round's synthesis tasks; an actor's own error (a non-finite loss, a full disk) comes out as
    itself, a dead actor (killed, out of memory, out of restarts) as a RunError naming it."""
    try:
        return ray.get(calls)
    except ray.exceptions.RayActorError as exc:
        dead = next((w for w, call in enumerate(calls) if _died(call)), "?")
        if exc.actor_init_failed:
            raise RunError(f"synthesis worker {dead} could not start: {last_error_line(str(exc))}") from None
        first = (str(exc).strip().splitlines() or ["died"])[0]
        raise RunError(f"synthesis worker {dead} died ({first}); cluster.synth_max_restarts=N lets Ray restart it "
                       "from the last checkpoint and retry its round") from None
    except ray.exceptions.RayTaskError as exc:
        raise root_cause(exc) from None


def _died(call: ray.ObjectRef) -> bool:
    """True if the call has ended with its actor's death (not still running, not another error)."""
    if not ray.wait([call], timeout=0)[0]:
        return False
    try:
        ray.get(call)
    except ray.exceptions.RayActorError:
        return True
    except Exception:  # noqa: BLE001 - another failure: not a death
        return False
    return False


def round_record(r: int, warm: bool, outputs: list[dict]) -> dict:
    """Synthesis statistics of a round: losses and the paper's metrics averaged over the workers' iterations
    (curves step by step), counts summed, the slowest worker's time. A worker's diversity is measured against
    its own earlier images."""
    iterations = sum(o["stats"]["syn_iterations"] for o in outputs)
    record: dict = {"epoch": r, "phase": "warmup" if warm else "kd", "syn_iterations": iterations}
    for key in outputs[0]["stats"]:
        if key in SUMMED_STATS:
            record[key] = sum(o["stats"][key] for o in outputs)
            continue
        weighted = [(o["stats"][key], o["stats"]["syn_iterations"]) for o in outputs
                    if o["stats"].get(key) is not None and o["stats"]["syn_iterations"] > 0]
        if key in ("syn_iterations", "syn_time", "metrics_time"):
            continue
        if not weighted:  # e.g. diversity in the first round: nothing earlier to compare with
            record[key] = None
            continue
        weight = sum(w for _, w in weighted)
        if isinstance(weighted[0][0], list):
            length = min(len(v) for v, _ in weighted)
            record[key] = [sum(v[i] * w for v, w in weighted) / weight for i in range(length)]
        else:
            record[key] = sum(v * w for v, w in weighted) / weight
    record["syn_compute_time"] = max(o["compute_time"] for o in outputs)
    record["shard_write_time"] = max(o["write_time"] for o in outputs)
    return record


class StopOnSignal:
    """SIGTERM or SIGUSR1 (a scheduler's preemption notice; SLURM's `--signal` before the time limit) -> finish
    the round in progress, checkpoint it and stop, so `resume=true` continues after it. Installed on the main
    thread only (Python's rule); a Tune trial runs the driver on another thread and Tune stops it itself."""

    SIGNALS = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGUSR1") if hasattr(signal, name))

    def __init__(self):
        self.received: str | None = None
        self.previous: dict = {}

    def _handle(self, signum, frame) -> None:
        self.received = signal.Signals(signum).name

    def arm(self) -> None:
        """Called after ray.init: Ray's core worker installs a SIGTERM handler of its own that aborts the process."""
        if threading.current_thread() is threading.main_thread():
            self.previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}

    def disarm(self) -> None:
        for s, handler in self.previous.items():
            if handler is not None:  # None: a handler installed outside Python, which cannot be put back
                signal.signal(s, handler)
        self.previous = {}


def run(cfg: PipelineConfig, on_round: Callable[[dict], None] | None = None) -> dict:
    """Run Algorithm 1 on Ray as configured; returns the summary (final and best student top-1, times).
    `on_round(record)` is called with each round's metrics after its checkpoint (Tune reports them)."""
    stop = StopOnSignal()
    try:
        return _run(cfg, on_round, stop)
    finally:
        stop.disarm()


def _run(cfg: PipelineConfig, on_round: Callable[[dict], None] | None, stop: StopOnSignal) -> dict:
    wall_start = time.perf_counter()
    folder = PipelineFolder(cfg)
    ds_config = load_deepspeed_config(cfg)
    faults = FaultPlan.from_env(folder.path / "faults")
    seed_everything(cfg.seed)  # a teacher without a checkpoint is random: the same one in every run of a seed
    inputs = load_inputs(cfg, torch.device("cpu"))
    folder.create()
    state = torch.load(folder.checkpoint, map_location="cpu", weights_only=True) if cfg.resume else None
    manifest = Manifest(folder.buffer, state["manifest"] if state else [])
    if state:  # the committed buffer only: a round killed before its commit leaves shards nobody may read
        for message in manifest.verify(cfg.cluster.on_corrupt_shard):
            print(f"resume: excluded {message} (moved to buffer/quarantine/)", flush=True)
        dropped = manifest.discard_uncommitted()
        if dropped:
            print(f"resume: dropped {len(dropped)} uncommitted shard file(s) of the killed round", flush=True)
    manifest.save()

    teacher_top1 = state["teacher_top1"] if state else None
    if inputs.eval_set is not None and state is None:
        teacher_top1 = evaluate(inputs.teacher, inputs.eval_set, inputs.images, Compute(bf16=cfg.bf16),
                                cfg.data.eval_batch_size)["top1"]
        print(f"teacher top-1 on {cfg.data.eval}: {teacher_top1:.2f}%", flush=True)

    started_ray = connect(cfg)
    stop.arm()
    board, trainer_run, workers = None, None, []
    try:
        check_capacity(cfg)
        c = cfg.cluster
        teacher_ref = ray.put(inputs.teacher.state_dict())
        embeddings_ref = ray.put(inputs.embeddings.cpu())
        # A crashed actor is restarted (state: the last checkpoint) and its round's task retried; its shards
        # are rewritten under the same names, and nothing of a round is visible before the driver commits it.
        actor = ray.remote(SynthesisWorker).options(num_cpus=c.synth_cpus, num_gpus=c.synth_gpus,
                                                    max_restarts=c.synth_max_restarts,
                                                    max_task_retries=c.synth_max_restarts)
        workers = [actor.remote(cfg, w, teacher_ref, embeddings_ref, inputs.images,
                                str(folder.buffer.resolve()), str(folder.samples.resolve()),
                                str(folder.checkpoint.resolve()), faults)
                   for w in range(c.synth_workers)]
        student_ref, student_state = None, state["student"] if state else None
        if state and state["student"] is not None:
            student_ref = ray.put(state["student"])
        board = RoundBoard.remote()
        loop_config = {"cfg": cfg, "board": board, "images": inputs.images, "deepspeed": ds_config,
                       "teacher": teacher_ref, "resume_from": None, "faults": faults,
                       "eval_set": ray.put(inputs.eval_set) if inputs.eval_set is not None else None}
        trainer_storage = folder.trainer.resolve()
        if state and state["student_checkpoint"]:  # the DeepSpeed checkpoint of the last committed KD round
            loop_config["resume_from"] = str(trainer_storage / state["student_checkpoint"])

        start = state["round"] + 1 if state else 0
        experiment = trainer_experiment(trainer_storage, start, state["student_checkpoint"] if state else None)
        best = Best(**state["best"]) if state else Best()
        elapsed_before = state["elapsed"] if state else 0.0
        checkpoint_name = state["student_checkpoint"] if state else None
        metrics = folder.metrics_log()
        total = cfg.warmup + cfg.epochs
        progress = RoundProgress(cfg.name, start, total)
        record: dict = {}
        for r in range(start, total):
            t0 = time.perf_counter()
            warm = r < cfg.warmup
            shares = split_iterations(cfg.synthesis.warmup_loops if warm else cfg.synthesis.g_loops, c.synth_workers)
            active = sum(1 for s in shares if s > 0)
            min_shards = math.ceil(c.trainer_workers / max(active, 1))  # every rank gets a shard of every round
            outputs = synthesize_round(workers, [
                w.synthesize.remote(r, warm, share, None if warm else student_ref, min_shards, i == 0)
                for i, (w, share) in enumerate(zip(workers, shares))])
            t_synth = time.perf_counter()
            excluded = manifest.commit(r, [entry for o in outputs for entry in o["shards"]], c.on_corrupt_shard)
            manifest.remove_temporaries(r)
            t_commit = time.perf_counter()
            record = round_record(r, warm, outputs)
            record.update(syn_time=t_synth - t0, commit_time=t_commit - t_synth)
            if not warm:
                check_readable(manifest, r, c.trainer_workers, ds_config["train_micro_batch_size_per_gpu"])
                if trainer_run is None:  # started at the first KD round: warm-up rounds keep all cores for synthesis
                    trainer_run = TrainerRun(make_trainer(cfg, str(trainer_storage), experiment, loop_config)).start()
                board.publish.remote({"round": r, "shards": manifest.snapshot()})
                result = trainer_run.wait(board.result.remote(r))
                student_ref = result.pop("student")[0]
                checkpoint_name = f"{experiment}/{result.pop('checkpoint')}"
                corrupt = result.pop("corrupt_shards")
                excluded += [f"buffer shard {url}: failed its checksum when read" for url in corrupt]
                manifest.exclude(manifest.relative(url) for url in corrupt)
                record.update(result)
                record["kd_phase_time"] = time.perf_counter() - t_commit
                best.update(record.get("top1"), r)
            for message in excluded:
                progress.write(f"round {r}: excluded {message} (moved to buffer/quarantine/, never trained on)")
            record.update(buffer=manifest.samples, shards=len(manifest.shards), excluded_shards=len(excluded))
            t_ckpt = time.perf_counter()
            student_state = ray.get(student_ref) if student_ref is not None else None
            elapsed = elapsed_before + time.perf_counter() - wall_start
            save_torch({"round": r, "synthesizers": ray.get([w.state_dict.remote() for w in workers]),
                        "manifest": manifest.shards, "student": student_state, "student_checkpoint": checkpoint_name,
                        "best": dataclasses.asdict(best), "elapsed": elapsed,
                        "teacher_top1": teacher_top1}, folder.checkpoint)
            now = time.perf_counter()
            compute = record["syn_compute_time"] + record.get("kd_time", 0.0) - record.get("kd_read_time", 0.0) \
                + record.get("eval_time", 0.0)
            record.update(checkpoint_time=now - t_ckpt, round_time=now - t0,
                          outside_compute=1.0 - compute / (now - t0), elapsed=elapsed_before + now - wall_start)
            metrics.log(record)
            progress.round_done(record)
            if on_round is not None:
                on_round(record)
            if stop.received:
                progress.write(f"{stop.received}: stopped after round {r} (checkpointed); continue with resume=true")
                break
            if cfg.time_budget_s and record["elapsed"] >= cfg.time_budget_s:
                progress.write(f"time budget of {cfg.time_budget_s:.0f}s reached after round {r}")
                break
        progress.close()
        metrics.close()
        ray.get(board.stop.remote())
        if trainer_run is not None:
            trainer_run.join()
        if student_state is not None:
            save_torch(student_state, folder.path / "student.pt")
    finally:  # also after a failure: on a cluster that outlives this run, release what it holds
        if board is not None:
            ray.get(board.stop.remote())
        if trainer_run is not None and trainer_run.thread.is_alive():
            trainer_run.thread.join(60)  # the ranks leave their loop once the board has stopped
        for worker in workers:
            ray.kill(worker)
        if started_ray:
            ray.shutdown()
    summary = {"name": cfg.name, "teacher_top1": teacher_top1, "final_top1": record.get("top1"),
               "best_top1_on_test_set": best.top1 if best.found else None, "best_epoch": best.epoch,
               "rounds_run": record.get("epoch", start - 1) + 1, "buffer_images": manifest.samples,
               "shards": len(manifest.shards), "synth_workers": cfg.cluster.synth_workers,
               "trainer_workers": cfg.cluster.trainer_workers, "stopped_by": stop.received,
               "wall_time_s": elapsed_before + time.perf_counter() - wall_start}
    save_json(summary, folder.path / "summary.json")
    write_report(folder.path)
    return summary


def trainer_experiment(storage: Path, start: int, referenced: str | None) -> str:
    """The Ray Train experiment of a driver start: `student-<first round>`, new each start, so Ray Train never
    restores its own state of a run that died (it is written in place: a crash or a full disk can truncate it);
    the ranks resume from the driver's checkpoint instead. Experiments of earlier starts other than the one holding
    that checkpoint are removed, and so is a leftover of this name (an attempt that committed no round)."""
    name = f"student-{start:05d}"
    keep = referenced.split("/")[0] if referenced else None
    for old in storage.glob("student-*") if storage.is_dir() else []:
        if old.name != keep:
            shutil.rmtree(old)
    return name


def check_readable(manifest: Manifest, r: int, ranks: int, micro_batch: int) -> None:
    """Before a KD round: every rank must have a micro-batch of samples to read (split_by_node gives rank q the
    shards q, q + M, ...), else the ranks would fall out of step."""
    per_rank = rank_samples(manifest.snapshot(), ranks)
    if not manifest.samples:
        raise RunError(f"the memory buffer is empty at KD round {r}: no synthesis batch was kept so far; add warm-up "
                       "rounds (warmup=) or synthesis iterations (synthesis.g_loops=)")
    if min(per_rank) < micro_batch:
        raise RunError(f"round {r}: the buffer's {len(manifest.shards)} shards give the {ranks} ranks {per_rank} "
                       f"samples, fewer than a micro-batch of {micro_batch}; lower kd.batch_size or add warm-up rounds")


def main(argv: Sequence[str] | None = None) -> None:
    cli(run, argv, doc=__doc__, schema=PipelineConfig, explain=root_cause)


if __name__ == "__main__":
    main()
