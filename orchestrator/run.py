"""NAYER on Ray: the round loop of Algorithm 1 spread over synthesis actors and DeepSpeed student ranks.

    python -m orchestrator.run config=configs/digits.yaml teacher.checkpoint=runs/digits-teacher/teacher.pt
    python -m orchestrator.run config=configs/cifar10.yaml,configs/profiles/cpu.yaml \\
        teacher.checkpoint=../shared/data/cifar10_resnet56.pt data.eval=../shared/data/cifar10_test.npz
    ray job submit --address http://<head>:8265 --working-dir . --runtime-env configs/ray/runtime_env.yaml -- \\
        python -m orchestrator.run config=... out_dir=/shared/runs cluster.synth_workers=8 cluster.synth_gpus=1 \\
        cluster.trainer_workers=8 cluster.trainer_gpus=1
    python -m orchestrator.run config=... cluster.schedule=alternating   # Algorithm 1 exactly (see below)
    python -m orchestrator.run config=... name=<existing run> resume=true      # continue a killed run
    python -m orchestrator.run --help                                         # every key, its default

Without cluster.address (and no RAY_ADDRESS) a local Ray is started on this machine. A round: synthesize on N
actors -> commit their shards to the manifest (the ranks' loaders read their new shards at once) -> S DeepSpeed
steps on M ranks -> sharded evaluation -> checkpoints (the ranks': DeepSpeed + ray.train.report; each actor's:
its own file; the driver's: `checkpoints/driver.pt`, small). Warm-up rounds synthesize only.
`cluster.schedule=overlapped`: while the ranks train round r, the actors synthesize round r+1 (its adversarial term
uses the student after round r-1), so a round costs max(synthesis, KD) instead of their sum; `alternating`: one
after the other. `resume=true` continues from the last checkpointed round and drops shards a killed round left
behind. SIGTERM / SIGUSR1 stop the run after the round in progress is checkpointed (slurm/ray_cluster_requeue.sbatch).
Run folder `runs/<name>/`: config.yaml, metrics.jsonl, tb/, samples/round-XXXXX.png, buffer/manifest.json +
buffer/round-XXXXX/worker-YYY-ZZZZZZ.tar, trainer/student-SSSSS/round-XXXXX/ (DeepSpeed; a Ray Train experiment
per driver start S), ranks/rank-QQQ.jsonl (each rank's own metrics), checkpoints/driver.pt +
checkpoints/synthesis/worker-YYY/round-XXXXX.pt, student.pt, summary.json (with the verdict), report.md + plots/
(nayer.run_report). The console: one line per round, progress lines of long phases, the verdict last (cluster.verbose
brings back Ray's, Ray Train's and DeepSpeed's full logs).
"""

from __future__ import annotations

import io
import math
import os
import shutil
import time
from typing import Callable, Sequence

import ray
import torch
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from nayer.cli import cli
from nayer.run_report import finish_run, run_summary
from nayer.inputs import load_inputs
from nayer.progress import RoundProgress
from nayer.runtime import RunError, save_torch, seed_everything
from nayer.specs import bf16_fallback_note
from nayer.storage import Storage
from orchestrator.board import RoundBoard
from orchestrator.cluster import check_capacity, connect, resolve_schedule, root_cause
from orchestrator.config import PipelineConfig, load_deepspeed_config
from orchestrator.evaluation import EvalSource
from orchestrator.faults import FaultPlan
from orchestrator.folder import PipelineFolder
from orchestrator.messages import KDPlan, KDRoundResult, SynthesisOutput
from orchestrator.rank import STUDENT_WEIGHTS, RankSetup
from orchestrator.rounds import SynthesisRound, gather_synthesis, synthesis_record
from orchestrator.shards import MANIFEST, Manifest, quarantined, rank_samples
from orchestrator.signals import StopOnSignal
from orchestrator.state import DriverState
from orchestrator.trainer import TrainerRun, make_trainer
from orchestrator.workers import SynthesisTask, SynthesisWorker, WorkerFiles, split_iterations


def run(cfg: PipelineConfig, on_round: Callable[[dict], None] | None = None) -> dict:
    """Run Algorithm 1 on Ray as configured; returns the summary (final and best student top-1, times).
    `on_round(record)` is called with each round's metrics after its checkpoint (Tune reports them)."""
    stop = StopOnSignal()
    try:
        return Driver(cfg, on_round, stop).run()
    finally:
        stop.disarm()


class Driver:
    """One start of a pipeline run: checks and loads its inputs and state on creation; `run()` starts the actors,
    the board and (at the first KD round) the ranks, runs the remaining rounds, and releases them all."""

    def __init__(self, cfg: PipelineConfig, on_round: Callable[[dict], None] | None, stop: StopOnSignal):
        self.cfg, self.on_round, self.stop = cfg, on_round, stop
        self.wall_start = time.perf_counter()
        self.folder = PipelineFolder(cfg)
        self.ds_config = load_deepspeed_config(cfg)
        self.faults = FaultPlan.from_env(self.folder.faults)
        seed_everything(cfg.seed)  # a teacher without a checkpoint is random: the same one in every run of a seed
        # An image folder is decoded once into a memory-mapped file (the run folder's unless data.eval_cache names
        # one), which the ranks map: neither the driver nor the object store holds a copy of the decoded set.
        self.inputs = load_inputs(cfg, torch.device("cpu"), eval_cache=self.folder.eval_cache())
        print(self.inputs.summary(), flush=True)
        # The embedded Ray's workers run on this machine: on its CPU for device=cpu, or auto without CUDA (a CUDA
        # device that is missing is the capacity check's to report).
        on_cpu = cfg.device == "cpu" or (cfg.device == "auto" and not torch.cuda.is_available())
        if on_cpu and not (cfg.cluster.address or os.environ.get("RAY_ADDRESS")):
            if note := bf16_fallback_note(cfg.bf16, torch.device("cpu")):
                print(note, flush=True)
        self.folder.create(self.inputs.provenance)
        self.state = DriverState.load(self.folder.checkpoint) if cfg.resume else DriverState()
        self.fresh_workers = self._resize()
        self.elapsed_before = self.state.elapsed
        self.checkpointed = self.state.synthesized  # the synthesis round of the last driver checkpoint
        self.resume_excluded = 0
        self.manifest = self._open_buffer()
        self.workers: list = []
        self.board = None
        self.trainer: TrainerRun | None = None
        self.student_ref = None  # the student after KD round `state.kd_round()` (None: no KD round yet)
        self.progress: RoundProgress | None = None
        self.schedule: str | None = None

    # ------------------------------------------------------------------------------------------------ start
    def _resize(self) -> set[int]:
        """A resume on another number of actors or ranks (a requeued job on more or fewer nodes): say what happens,
        record the new sizes; returns the synthesis workers that start fresh. Actors: worker w < the old count
        continues its own generator from its state file; a new worker starts a fresh generator, seeded as worker w
        of a new run; a dropped worker's generator is not continued (its shards stay in the buffer, its state
        files stay unused). Ranks: the buffer is re-dealt by shard seq modulo the new count and the global batch
        stays kd.batch_size; the student and its optimizer state load at the new size (orchestrator.resize)."""
        c, state = self.cfg.cluster, self.state
        old_synth, old_ranks = state.synth_workers, state.trainer_workers  # None: a fresh run
        state.synth_workers, state.trainer_workers = c.synth_workers, c.trainer_workers
        fresh: set[int] = set()
        if old_synth is not None and old_synth != c.synth_workers:
            if c.synth_workers > old_synth:
                fresh = set(range(old_synth, c.synth_workers))
                what = f"worker(s) {old_synth}-{c.synth_workers - 1} start fresh generators (seeded as in a new run)"
            else:
                what = (f"the generator(s) of worker(s) {c.synth_workers}-{old_synth - 1} are dropped (their shards "
                        "stay in the buffer)")
            print(f"resume: {old_synth} -> {c.synth_workers} synthesis actors: {what}", flush=True)
        if old_ranks is not None and old_ranks != c.trainer_workers:
            print(f"resume: {old_ranks} -> {c.trainer_workers} DeepSpeed ranks: the buffer's shards are dealt anew "
                  f"(seq modulo {c.trainer_workers}), the global batch stays kd.batch_size={self.cfg.kd.batch_size}",
                  flush=True)
        return fresh

    def _open_buffer(self) -> Manifest:
        """The committed buffer: on resume, the manifest cut back to the last checkpointed synthesis round (a round
        committed after it is synthesized again), every shard verified, files nobody committed removed."""
        buffer = self.folder.buffer
        if not self.cfg.resume:
            manifest = Manifest(buffer)
            manifest.save()
            return manifest
        if self.state.synthesized >= 0 and not buffer.exists(MANIFEST):
            raise RunError(f"{buffer.location(MANIFEST)} is missing, but the driver checkpoint lists round "
                           f"{self.state.synthesized} as committed: the buffer is not where the run left it")
        manifest = Manifest.load(buffer)
        manifest.truncate(self.state.synthesized)
        excluded = manifest.verify(self.cfg.cluster.on_corrupt_shard)
        for message in excluded:
            print(f"resume: {quarantined(message)}", flush=True)
        self.resume_excluded = len(excluded)  # counted in this start's first round (or the summary: none left)
        if dropped := manifest.discard_uncommitted():
            print(f"resume: dropped {len(dropped)} uncommitted shard file(s) of the killed round", flush=True)
        manifest.save()
        return manifest

    def run(self) -> dict:
        started_ray = connect(self.cfg)
        self.stop.arm()
        try:
            check_capacity(self.cfg)
            self.schedule = resolve_schedule(self.cfg)
            self._start_pools()
            self._rounds()
            self._finish()
        finally:  # also after a failure: on a cluster that outlives this run, release what it holds
            if self.board is not None:
                ray.get(self.board.stop.remote())
            if self.trainer is not None and self.trainer.thread.is_alive():
                self.trainer.thread.join(60)  # the ranks leave their loop once the board has stopped
            for worker in self.workers:
                ray.kill(worker)
            if started_ray:
                ray.shutdown()
        return self._summary()

    def _start_pools(self) -> None:
        """The synthesis actors and the board (the ranks start at the first KD round), and what the ranks get."""
        cfg, c, folder = self.cfg, self.cfg.cluster, self.folder
        teacher_ref = ray.put(self.inputs.teacher.state_dict())
        # A crashed actor is restarted (fresh) and its round's task retried; the task names the last committed
        # round, whose state the actor loads from its own file. Its shards are rewritten under the same names,
        # and nothing of a round is visible before the driver commits it.
        actor = ray.remote(SynthesisWorker).options(num_cpus=c.synth_cpus, num_gpus=c.synth_gpus,
                                                    max_restarts=c.synth_max_restarts,
                                                    max_task_retries=c.synth_max_restarts)
        files = WorkerFiles(folder.buffer, folder.samples, folder.synthesis_states)
        # Held for the run: Ray restarts a dead actor with its creation arguments, which must still exist then.
        self.actor_args = (teacher_ref, ray.put(self.inputs.embeddings.cpu()))
        self.workers = [actor.remote(cfg, w, *self.actor_args, self.inputs.images, files, self.faults)
                        for w in range(c.synth_workers)]
        # The board lives on the driver's node: it holds nothing a resume needs (commits come back from the
        # manifest, the student from its checkpoint), so it should die only where the driver dies, which a
        # resume covers, and not with some other node of the cluster.
        here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
        self.board = RoundBoard.options(scheduling_strategy=here).remote()
        self.board.commit.remote(self.manifest.snapshot())
        self.experiment = trainer_experiment(folder.trainer, self.state.done + 1, self.state.student_checkpoint)
        checkpoint = self.state.student_checkpoint
        self.rank_setup = RankSetup(
            cfg, self.board, self.inputs.images, self.ds_config, teacher_ref, self.faults, folder.buffer, folder.ranks,
            resume_from=folder.trainer.location(checkpoint) if checkpoint else None,
            eval_set=EvalSource.of(self.inputs.eval_set),
            # the ranks rate the teacher on the labeled set too, once, on their devices (not on resume)
            teacher_eval=self.inputs.eval_set is not None and self.state.teacher_top1 is None)
        if checkpoint:  # the adversarial term's student: the last KD round's
            weights = folder.trainer.read_bytes(f"{checkpoint}/{STUDENT_WEIGHTS}")
            if weights is None:
                raise RunError(f"the student checkpoint {folder.trainer.location(checkpoint)}/{STUDENT_WEIGHTS} of the "
                               "last round is missing: the run folder is incomplete")
            self.student_ref = ray.put(torch.load(io.BytesIO(weights), map_location="cpu", weights_only=True))

    def _finish(self) -> None:
        """After the last round: the ranks leave, the student is saved; a finished run's decoded evaluation set
        (7.5 GB on ImageNet) goes, which only a resume would need."""
        ray.get(self.board.stop.remote())
        if self.trainer is not None:
            self.trainer.join()
        if self.student_ref is not None:
            save_torch(ray.get(self.student_ref), self.folder.path / "student.pt")
        if not self.cfg.data.eval_cache and self.state.done + 1 >= self.cfg.warmup + self.cfg.epochs:
            shutil.rmtree(self.folder.path / "eval-cache", ignore_errors=True)

    # ------------------------------------------------------------------------------------------------ rounds
    def _rounds(self) -> None:
        cfg = self.cfg
        total = cfg.warmup + cfg.epochs
        self.progress = RoundProgress(cfg.name, self.state.done + 1, total)
        metrics = self.folder.metrics_log()
        try:
            while (r := self.state.done + 1) < total:
                record = self._step(r, total)
                metrics.log(record)
                # on an object store the round's line goes up before its checkpoint: a kill in between logs the
                # round twice (the report counts it once), never not at all
                self.folder.publish("metrics.jsonl", "tb", PipelineFolder.CHECKPOINT)
                self.progress.round_done(record)
                if self.on_round is not None:
                    self.on_round(record)
                self.faults.kill_if("kill_driver", round=r)
                if self._stopping(r, record):
                    break
        finally:
            self.progress.close()
            metrics.close()

    def _stopping(self, r: int, record: dict) -> bool:
        """A stop signal or the time budget ends the run after round r (checkpointed)."""
        if self.stop.received:
            self.progress.write(f"{self.stop.received}: stopped after round {r} (checkpointed); continue with "
                                "resume=true")
            return True
        if self.cfg.time_budget_s and record["elapsed"] >= self.cfg.time_budget_s:
            self.progress.write(f"time budget of {self.cfg.time_budget_s:.0f}s reached after round {r}")
            return True
        return False

    def _step(self, r: int, total: int) -> dict:
        """Round r to its checkpoint; returns its metrics line. Alternating: synthesize r, then train r.
        Overlapped: train r while round r+1 is synthesized (round r's images were made in the step before, or now,
        first, for the first KD round)."""
        t0 = time.perf_counter()
        warm = r < self.cfg.warmup
        trainer_start = not warm and self.trainer is None
        if trainer_start:  # the ranks start up while the round's images are made
            self.trainer = TrainerRun(make_trainer(self.cfg, self.folder.trainer.location(), self.experiment,
                                                   self.rank_setup)).start()
        now = self._commit(r, gather_synthesis(self._launch(r)), t0) if self.state.synthesized < r else None
        syn = now or self.state.pending  # a round synthesized in the step before was counted there
        record = {"epoch": r, "phase": "warmup" if warm else "kd", **syn.line(), "schedule": self.schedule,
                  "trainer_start": trainer_start}  # this round's wall time includes the ranks' start-up
        excluded = (now.excluded if now else 0) + self.resume_excluded
        self.resume_excluded = 0
        kd, ahead = self._train(r, total, record) if not warm else (None, None)
        excluded += (len(kd.corrupt_shards) if kd else 0) + (ahead.excluded if ahead else 0)
        self.state.done, self.state.pending = r, ahead
        record.update(buffer=self.manifest.samples, shards=len(self.manifest.shards), excluded_shards=excluded,
                      step_synthesis_round=r + 1 if ahead else (r if now else None),
                      committed_bytes=(now.bytes if now else 0) + (ahead.bytes if ahead else 0))
        t_ckpt = time.perf_counter()
        self.state.elapsed = self._elapsed()
        self.state.save(self.folder.checkpoint)
        self.checkpointed = self.state.synthesized
        synthesis = [s for s in (now, ahead) if s is not None]
        self._times(record, t0, t_ckpt, synthesis)
        return record

    def _times(self, record: dict, t0: float, t_ckpt: float, synthesis: list[SynthesisRound]) -> None:
        """Where a step's time went: its checkpoint, the actors' and the ranks' busy shares, the time outside the
        critical path of compute."""
        now = time.perf_counter()
        step = now - t0
        synthesis_wall = sum(s.wall for s in synthesis)
        compute = [sum(s.compute for s in synthesis),
                   record.get("kd_time", 0.0) - record.get("kd_read_time", 0.0) + record.get("eval_time", 0.0)]
        critical = max(compute) if self.schedule == "overlapped" else sum(compute)
        record.update(checkpoint_time=now - t_ckpt, round_time=step, step_synthesis_time=synthesis_wall,
                      synth_busy=min(1.0, synthesis_wall / step),
                      kd_busy=min(1.0, record.get("kd_phase_time", 0.0) / step), outside_compute=1.0 - critical / step,
                      elapsed=self._elapsed())

    def _launch(self, s: int) -> list:
        """Start synthesis round s on every worker (continuing from the last committed round)."""
        cfg, c = self.cfg, self.cfg.cluster
        warm = s < cfg.warmup
        shares = split_iterations(cfg.synthesis.warmup_loops if warm else cfg.synthesis.g_loops, c.synth_workers)
        active = sum(1 for share in shares if share > 0)
        min_shards = math.ceil(c.trainer_workers / max(active, 1))  # every rank gets a shard of every round
        student = None if warm else self.student_ref
        tasks = [SynthesisTask(s, warm, share, min_shards, i == 0, -1 if i in self.fresh_workers
                               else self.state.synthesized, self.checkpointed, first_iteration=sum(shares[:i]))
                 for i, share in enumerate(shares)]
        return [w.synthesize.remote(task, student) for w, task in zip(self.workers, tasks)]

    def _commit(self, s: int, outputs: list[SynthesisOutput], launched: float) -> SynthesisRound:
        """Commit round s's shards (the manifest is the commit point), hand them to the ranks' loaders at once."""
        t0 = time.perf_counter()
        seq = self.manifest.next_seq
        excluded = self.manifest.commit([entry for o in outputs for entry in o.shards],
                                        self.cfg.cluster.on_corrupt_shard)
        self.manifest.remove_temporaries(s)
        self.board.commit.remote(self.manifest.snapshot(after_seq=seq - 1))
        self.state.synthesized = s
        self.fresh_workers.clear()  # new workers of a resize have their own state files from this round on
        for message in excluded:
            self.progress.write(f"round {s}: {quarantined(message)}")
        # The student the round's adversarial term used: after this KD round (-1: the workers' initial students).
        adv = None if s < self.cfg.warmup else self.state.kd_round(self.cfg.warmup)
        record = {**synthesis_record(outputs), "commit_time": time.perf_counter() - t0, "adv_student_round": adv}
        return SynthesisRound(s, record, wall=t0 - launched, compute=max(o.compute_time for o in outputs),
                              bytes=self.manifest.round_bytes(s), excluded=len(excluded))

    def _train(self, r: int, total: int, record: dict) -> tuple[KDRoundResult, SynthesisRound | None]:
        """KD round r on the ranks, its result into `record`; overlapped, round r+1 is synthesized meanwhile and
        committed as soon as it is done. Returns the KD result and the next round's synthesis (None if none ran)."""
        check_readable(self.manifest, r, self.cfg.cluster.trainer_workers,
                       self.ds_config["train_micro_batch_size_per_gpu"])
        t0 = time.perf_counter()
        self.board.publish.remote(KDPlan(r, self.manifest.last_seq(r)))
        kd_ref = self.board.result.remote(r)
        calls = self._launch(r + 1) if self.schedule == "overlapped" and r + 1 < total else []
        result, ahead, waiting, kd_wall = None, None, [kd_ref, *calls], 0.0
        while waiting:
            _, waiting = ray.wait(waiting, num_returns=1, timeout=1.0)
            if calls and ahead is None and not any(call in waiting for call in calls):
                ahead = self._commit(r + 1, gather_synthesis(calls), t0)
            if result is None and kd_ref not in waiting:
                result, kd_wall = ray.get(kd_ref), time.perf_counter() - t0
            elif result is None and not self.trainer.thread.is_alive():
                raise self.trainer.failure()
        self._take(result, record)
        record["kd_phase_time"] = kd_wall
        return result, ahead

    def _take(self, result: KDRoundResult, record: dict) -> None:
        """A KD round's result: the student for the next adversarial term, its checkpoint, the corrupt shards the
        ranks found (excluded), the teacher's top-1 and the round's metrics."""
        self.student_ref = result.student[0]
        self.state.student_checkpoint = f"{self.experiment}/{result.checkpoint}"
        for path in result.corrupt_shards:
            shard = f"buffer shard {self.folder.buffer.location(path)}: failed its checksum when read"
            self.progress.write(f"round {result.round}: {quarantined(shard)}")
        self.manifest.exclude(result.corrupt_shards)
        if result.teacher_top1 is not None:
            self.state.teacher_top1 = result.teacher_top1
            print(f"teacher top-1 on {self.cfg.data.eval}: {result.teacher_top1:.2f}% (on the ranks)", flush=True)
        record.update(result.metrics.record(), save_time=result.save_time)
        self.state.best.update(result.metrics.top1, result.round)
        self.state.last_top1 = result.metrics.top1

    # ------------------------------------------------------------------------------------------------ end
    def _elapsed(self) -> float:
        return self.elapsed_before + time.perf_counter() - self.wall_start

    def _summary(self) -> dict:
        state, c = self.state, self.cfg.cluster
        summary = run_summary(self.cfg.name, state.teacher_top1, state.last_top1, state.best, self.manifest.samples,
                              self._elapsed(), rounds_run=state.done + 1, shards=len(self.manifest.shards),
                              synth_workers=c.synth_workers, trainer_workers=c.trainer_workers,
                              schedule=self.schedule, stopped_by=self.stop.received,
                              # shards this start's resume excluded when no round was left to count them in
                              excluded_on_resume=self.resume_excluded)
        self.folder.fetch_last_sample_grid()
        summary = finish_run(self.folder.path, summary)
        self.folder.publish("student.pt", "summary.json", "report.md", "plots")
        return summary


def trainer_experiment(trainer: Storage, start: int, referenced: str | None) -> str:
    """The Ray Train experiment of a driver start: `student-<first round>`, new each start, so Ray Train never
    restores its own state of a run that died (it is written in place: a crash or a full disk can truncate it);
    the ranks resume from the driver's checkpoint instead. Experiments of earlier starts other than the one holding
    that checkpoint are removed, and so is a leftover of this name (an attempt that committed no round)."""
    name = f"student-{start:05d}"
    keep = referenced.split("/")[0] if referenced else None
    for old in trainer.subfolders():
        if old.startswith("student-") and old != keep:
            trainer.remove_tree(old)
    return name


def check_readable(manifest: Manifest, r: int, ranks: int, micro_batch: int) -> None:
    """Before a KD round: every rank must have a micro-batch of samples in its share (rank q holds the shards whose
    seq is q modulo the ranks), else the ranks would fall out of step."""
    entries = [e for e in manifest.shards if e.round <= r]
    if not entries:
        raise RunError(f"the memory buffer is empty at KD round {r}: no synthesis batch was kept so far; add warm-up "
                       "rounds (warmup=) or synthesis iterations (synthesis.g_loops=)")
    per_rank = rank_samples(entries, ranks)
    if min(per_rank) < micro_batch:
        raise RunError(f"round {r}: the buffer's {len(entries)} shards give the {ranks} ranks {per_rank} samples, "
                       f"fewer than a micro-batch of {micro_batch}; lower kd.batch_size or add warm-up rounds")


def main(argv: Sequence[str] | None = None) -> None:
    cli(run, argv, doc=__doc__, schema=PipelineConfig, explain=root_cause)


if __name__ == "__main__":
    main()
