"""One DeepSpeed rank of the pipeline, alive for the whole run, as a list of named steps (runs inside a Ray Train
worker, where torch.distributed is already initialized):

    rank = Rank(setup)                          # console, models, DeepSpeed engine, restore, the teacher's rating
    while (plan := rank.next_plan()) is not None:
        steps = rank.train_round(plan)          # S KD steps on the rank's resident share, non-finite policy
        measured = rank.measure(plan, steps)    # three collectives over the ranks, sharded evaluation
        checkpoint = rank.save(plan, measured)  # DeepSpeed checkpoint + ray.train.report, the rank's own log line
        rank.hand_over(checkpoint)              # rank 0: the round's result and student weights to the board

Each rank holds its stable share of the buffer (`orchestrator.resident`): a loader thread reads every newly
committed shard of the share once, as the driver commits it. Each KD round every rank takes S DeepSpeed steps of
L_KD on micro-batches sampled from its share (the global batch is kd.batch_size), steps the per-epoch cosine,
evaluates its slice of the labeled set (counts all-reduced; the teacher too, once, before the first round), and
saves a DeepSpeed checkpoint that `ray.train.report` persists as `round-XXXXX` (with the student's weights as
`student.pt`, for a resumed driver).
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import logging
import os
import tempfile
import time
from dataclasses import dataclass
from typing import Any

import ray
import ray.train
import torch
import torch.distributed as dist
from torch import Tensor

from nayer.kd import KDObjective, finite_or_skip, make_optimizer
from nayer.models import build_model
from nayer.progress import LineProgress
from nayer.runtime import RunError
from nayer.specs import Compute, ImageSpec, native_bf16
from nayer.storage import Storage
from orchestrator.config import PipelineConfig, threads
from orchestrator.evaluation import EvalSource, sharded_evaluate
from orchestrator.faults import FaultPlan
from orchestrator.messages import KDMetrics, KDPlan, KDRoundResult
from orchestrator.precision import bf16_with_fp32_batchnorm_stats
from orchestrator.resident import GB, ResidentShare, ShareLoader
from orchestrator.resize import TAG, NodeRank, check_same_student, loadable_at

STUDENT_WEIGHTS = "student.pt"  # in each checkpoint directory: the module's state_dict, for the synthesis actors


@dataclass(frozen=True)
class RankSetup:
    """What the driver hands every rank (Ray Train's train_loop_config carries it as {"setup": RankSetup})."""

    cfg: PipelineConfig
    board: Any  # the RoundBoard actor
    images: ImageSpec
    deepspeed: dict  # the DeepSpeed config, batch keys filled in
    teacher: Any  # ObjectRef of the teacher's state_dict
    faults: FaultPlan
    buffer: Storage
    rank_logs: Storage  # ranks/: each rank's own metrics per round
    resume_from: str | None  # the student checkpoint of the run being resumed (None: a fresh run)
    eval_set: EvalSource | None
    teacher_eval: bool  # rate the teacher on the labeled set (once per run: not on resume)


@dataclass(frozen=True)
class RoundSteps:
    """What one rank's KD steps of a round did."""

    losses: list[Tensor]  # of the finite steps
    skipped: int  # steps left out (on_nonfinite=skip)
    kd_time: float
    read_time: float  # of which waiting for batches
    lr: float


@dataclass(frozen=True)
class Measured:
    """A round's numbers: over all ranks (`metrics`, the corrupt shards found), and this rank's own log line."""

    metrics: KDMetrics
    corrupt_shards: list[str]
    rank_line: dict


def train_loop_per_worker(config: dict) -> None:
    """One DeepSpeed rank (Ray Train's worker function)."""
    rank = Rank(config["setup"])
    while (plan := rank.next_plan()) is not None:
        steps = rank.train_round(plan)
        measured = rank.measure(plan, steps)
        rank.hand_over(rank.save(plan, measured))


class Rank:
    """A DeepSpeed rank between rounds: its models, engine, buffer share and what it has reported so far."""

    def __init__(self, setup: RankSetup):
        self.setup, self.cfg = setup, setup.cfg
        # Chosen before deepspeed is imported: DeepSpeed picks its accelerator once, at import.
        os.environ.setdefault("DS_ACCELERATOR", "cuda" if torch.cuda.is_available() else "cpu")
        if not self.cfg.cluster.verbose:
            quiet_rank_console()  # before deepspeed's import: its loggers are quiet from its first line
        import deepspeed  # noqa: F401 - imported here, after DS_ACCELERATOR, whatever the console's settings
        ctx = ray.train.get_context()
        self.rank, self.world, self.local_rank = ctx.get_world_rank(), ctx.get_world_size(), ctx.get_local_rank()
        torch.set_num_threads(threads(self.cfg.cluster.trainer_cpus))
        self.device = ray.train.torch.get_device()
        ds_bf16 = bool(setup.deepspeed.get("bf16", {}).get("enabled", False))
        # DeepSpeed bf16 keeps bf16 weights: inputs must be autocast to match
        self.compute = Compute(self.device, (self.cfg.bf16 and native_bf16(self.device)) or ds_bf16,
                               self.cfg.channels_last)
        c = self.cfg.cluster
        self.loader = ShareLoader(setup.buffer, lambda seq: ray.get(setup.board.entries_after.remote(seq)),
                                  self.rank, self.world, c.on_corrupt_shard, c.rank_buffer_gb * GB)
        self.share = ResidentShare(self.loader, self.device, c.rank_buffer_device_gb * GB)
        self.teacher = self._teacher()
        self.done = -1  # the last KD round this rank trained (or restored)
        self.engine, self.optimizer, self.scheduler = self._engine(self._student(ds_bf16))
        self.objective = KDObjective(self.engine, self.teacher, self.cfg.kd, setup.images, self.compute)
        self.micro_batch = self.engine.train_micro_batch_size_per_gpu()
        self.eval_part = setup.eval_set.part(self.rank, self.world) if setup.eval_set is not None else None
        self.teacher_top1 = self._rate_teacher()  # handed over once, with the first round's result
        self.reported_bytes, self.reported_excluded = 0, 0  # what the loader did before the first round counts in it

    # ------------------------------------------------------------------------------------------------ start
    def _teacher(self) -> torch.nn.Module:
        teacher = build_model(self.cfg.teacher.arch, self.setup.images.num_classes)
        teacher.load_state_dict(ray.get(self.setup.teacher))
        teacher = teacher.to(self.device).eval().requires_grad_(False)
        if self.cfg.channels_last:  # its convs run channels_last on channels_last inputs
            teacher = teacher.to(memory_format=torch.channels_last)
        return teacher

    def _student(self, ds_bf16: bool) -> torch.nn.Module:
        """The student's initial weights: seeded, the same every run (DeepSpeed broadcasts rank 0's). Its weights
        stay contiguous (DeepSpeed broadcasts them as flat bytes)."""
        torch.manual_seed(self.cfg.seed)
        student = self.cfg.student.build(num_classes=self.setup.images.num_classes, role="student").to(self.device)
        if ds_bf16:  # before initialize: DeepSpeed would cast BatchNorm weights and leave fp32 statistics beside them
            student, note = bf16_with_fp32_batchnorm_stats(student)
            if self.rank == 0 and self.cfg.cluster.verbose:
                print(note, flush=True)
        return student

    def _engine(self, student: torch.nn.Module):
        """The DeepSpeed engine over the student, with the spec's SGD and per-epoch cosine, restored from Ray Train's
        latest checkpoint when it restarted these ranks after a failure (cluster.trainer_max_failures), else from
        the one of the run being resumed (maybe saved by another number of ranks: orchestrator.resize); either way
        the ranks continue after the round it holds."""
        import deepspeed

        optimizer, scheduler = make_optimizer(student, self.cfg.kd, self.cfg.epochs)  # stepped per round
        resume_from = self.setup.resume_from
        checkpoint = ray.train.get_checkpoint() or (ray.train.Checkpoint(resume_from) if resume_from else None)
        self.restored = checkpoint is not None
        ds_config = self.setup.deepspeed
        with contextlib.ExitStack() as opened:
            if checkpoint is not None:
                saved = opened.enter_context(checkpoint.as_directory())
                node = NodeRank(self.local_rank, dist.barrier)
                loadable = loadable_at(saved, checkpoint.path, self.world, ds_config, node, opened)
                ds_config = loadable.ds_config
                if loadable.note and self.rank == 0:
                    print(loadable.note, flush=True)
            # DeepSpeed prints a line per rank as it builds its CPU communication op; on a Ray Train worker that print
            # is teed to the worker's stdout, past the log filter (quiet_rank_console), unless stdout is elsewhere.
            with contextlib.nullcontext() if self.cfg.cluster.verbose else contextlib.redirect_stdout(io.StringIO()):
                engine, _, _, _ = deepspeed.initialize(model=student, optimizer=optimizer, config=ds_config)
            if checkpoint is not None:
                self._restore(engine, scheduler, loadable, saved)
        return engine, optimizer, scheduler

    def _restore(self, engine, scheduler, loadable, saved: str) -> None:
        """Load the checkpoint into the engine; rank 0 hands over its round's result again if the driver is still
        waiting for it (the ranks failed after saving it, before handing it over)."""
        _, client = engine.load_checkpoint(loadable.path, tag=TAG)
        if client is None:
            raise RunError(f"no DeepSpeed checkpoint '{TAG}' in {saved}: the run folder's trainer/ is incomplete")
        loadable.restore_buffers(engine.module)
        scheduler.load_state_dict(client["scheduler"])
        self.done = client["round"]
        if self.rank != 0:
            return
        weights = torch.load(os.path.join(saved, STUDENT_WEIGHTS), map_location="cpu", weights_only=True)
        if loadable.note:  # a resize: the student the ranks start from must be the one that was saved
            check_same_student(engine.module.state_dict(), weights, saved)
        if ray.get(self.setup.board.awaited.remote(self.done)):
            result = client["result"]
            self._deliver(KDRoundResult(**{**result, "metrics": KDMetrics(**result["metrics"])}), weights)

    def _rate_teacher(self) -> float | None:
        """The teacher's top-1 on the labeled set, once per run, in the first round's result; ranks that Ray Train
        restarted from a checkpoint have reported a round already (the driver has the number)."""
        if self.eval_part is None or not self.setup.teacher_eval or self.restored:
            return None
        return sharded_evaluate(self.teacher, self.eval_part, self.setup.images, self.compute,
                                self.cfg.data.eval_batch_size)["top1"]

    # ------------------------------------------------------------------------------------------------ a round
    def next_plan(self) -> KDPlan | None:
        """The next KD round the driver publishes; None once the run is over."""
        return ray.get(self.setup.board.next_plan.remote(self.done))

    def train_round(self, plan: KDPlan) -> RoundSteps:
        """S KD steps on micro-batches of fresh permutations of this rank's share (as committed up to the plan),
        then the cosine's step. One host sync a step: stop reads the loss's finiteness; skip reads it once reduced
        over the ranks (every rank leaves the step out if any rank's loss is not finite)."""
        cfg, r = self.cfg, plan.round
        self.done = r
        torch.manual_seed(cfg.seed * 1000003 + 1009 * r + self.rank)  # augmentation draws: reproducible on resume
        batches = self.share.batches(plan.upto_seq, self.micro_batch, cfg.kd.kd_steps,
                                     (cfg.seed * 7907 + r) * 1009 + self.rank, cfg.cluster.shuffle_buffer)
        self.engine.train()
        start, read_time, losses, skipped = time.perf_counter(), 0.0, [], 0
        progress = LineProgress(cfg.kd.kd_steps, f"round {r} KD rank {self.rank}") if self.rank == 0 else None
        waited = time.perf_counter()
        for step, (images, _) in enumerate(batches):
            read_time += time.perf_counter() - waited
            self.setup.faults.kill_if("kill_rank", round=r, rank=self.rank, step=step)
            loss = self.objective(images)
            if self._finite(loss, f"round {r}, KD step {step} on rank {self.rank}"):
                self.engine.backward(loss)
                self.engine.step()
                losses.append(loss.detach().float())
            else:
                if skipped == 0 and self.rank == 0:
                    print(f"round {r}, KD step {step}: non-finite loss on a rank, step skipped (on_nonfinite=skip)",
                          flush=True)
                skipped += 1
            if progress is not None:
                progress.update()
            waited = time.perf_counter()
        if progress is not None:
            progress.close()
        kd_time, lr = time.perf_counter() - start, self.optimizer.param_groups[0]["lr"]
        self.scheduler.step()
        return RoundSteps(losses, skipped, kd_time, read_time, lr)

    def _finite(self, loss: Tensor, where: str) -> bool:
        if self.cfg.on_nonfinite != "skip":
            return finite_or_skip(loss, self.cfg.on_nonfinite, where)
        flag = (~torch.isfinite(loss.detach())).float().reshape(1)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return flag.item() == 0.0

    def measure(self, plan: KDPlan, steps: RoundSteps) -> Measured:
        """The round over all ranks: the mean KD loss, each rank's steps and the bytes it read since its last
        report (the shards committed meanwhile, once each), the corrupt shards the ranks found; then the evaluation
        of the new student on the ranks' slices."""
        loader = self.loader
        loader.wait(ray.get(self.setup.board.last_seq.remote()), check=False)
        rank_loss = torch.stack(steps.losses).mean() if steps.losses else torch.zeros((), device=self.device)
        mean_loss = rank_loss.clone()
        dist.all_reduce(mean_loss)
        counts = torch.tensor([len(steps.losses), loader.bytes_read - self.reported_bytes], dtype=torch.int64,
                              device=self.device)
        gathered = [torch.zeros_like(counts) for _ in range(self.world)]
        dist.all_gather(gathered, counts)
        self.reported_bytes = loader.bytes_read
        corrupt: list[list[str]] = [[] for _ in range(self.world)]
        excluded = list(loader.excluded)
        dist.all_gather_object(corrupt, excluded[self.reported_excluded:])
        self.reported_excluded = len(excluded)
        read = [int(t[1]) for t in gathered]
        metrics = KDMetrics(
            kd_loss=mean_loss.item() / self.world, kd_steps=len(steps.losses), lr=steps.lr,
            kd_steps_per_rank=[int(t[0]) for t in gathered], kd_nonfinite_steps=steps.skipped,
            kd_read_bytes=sum(read), kd_read_bytes_per_rank=read, kd_streaming=loader.streaming,
            kd_time=steps.kd_time, kd_read_time=steps.read_time, **self._evaluate())
        line = {"round": plan.round, "rank": self.rank, "kd_loss": rank_loss.item() if steps.losses else None,
                "kd_steps": len(steps.losses), "read_bytes": read[self.rank], "kd_time": steps.kd_time,
                "kd_read_time": steps.read_time, "streaming": loader.streaming}
        return Measured(metrics, sorted({path for paths in corrupt for path in paths}), line)

    def _evaluate(self) -> dict:
        if self.eval_part is None:
            return {}
        t0 = time.perf_counter()
        ev = sharded_evaluate(self.engine.module, self.eval_part, self.setup.images, self.compute,
                              self.cfg.data.eval_batch_size)
        return {"top1": ev["top1"], "per_class": ev["per_class"], "eval_time": time.perf_counter() - t0}

    def save(self, plan: KDPlan, measured: Measured) -> tuple[KDRoundResult, dict | None]:
        """Every rank writes its part of the DeepSpeed checkpoint, Ray merges them into `round-XXXXX` (rank 0 adds
        the student's weights); then this rank's own log line. Returns the round's result and rank 0's weights."""
        t0, r = time.perf_counter(), plan.round
        result = KDRoundResult(r, measured.metrics, f"round-{r:05d}", measured.corrupt_shards, self.teacher_top1)
        self.teacher_top1 = None
        weights = {key: value.detach().cpu().clone() for key, value in self.engine.module.state_dict().items()} \
            if self.rank == 0 else None
        with tempfile.TemporaryDirectory() as tmp:
            client = {"scheduler": self.scheduler.state_dict(), "round": r, "result": dataclasses.asdict(result)}
            self.engine.save_checkpoint(tmp, tag=TAG, client_state=client)
            if weights is not None:
                torch.save(weights, os.path.join(tmp, STUDENT_WEIGHTS))
            reported = {**measured.metrics.record(), "corrupt_shards": result.corrupt_shards,
                        **({"teacher_top1": result.teacher_top1} if result.teacher_top1 is not None else {})}
            ray.train.report(reported, checkpoint=ray.train.Checkpoint.from_directory(tmp),
                             checkpoint_dir_name=result.checkpoint)
        self.setup.rank_logs.append_jsonl(f"rank-{self.rank:03d}.jsonl", measured.rank_line)
        return dataclasses.replace(result, save_time=time.perf_counter() - t0), weights

    def hand_over(self, saved: tuple[KDRoundResult, dict | None]) -> None:
        """Rank 0: the round's result and the new student weights to the board (which stores the weights)."""
        if self.rank == 0:
            self._deliver(*saved)

    def _deliver(self, result: KDRoundResult, weights: dict) -> None:
        ray.get(self.setup.board.finish.remote(dataclasses.replace(result, weights=weights)))


class LibraryInfoFilter(logging.Filter):
    """Drops INFO (and lower) records written from inside the given packages. On a Ray Train worker `print` is a
    root-logger INFO record, so this catches the lines Ray and DeepSpeed print or log past their own loggers'
    levels (Ray Train's per-report line comes from a logger named by its file path, not `ray.train`)."""

    def __init__(self, *packages):
        super().__init__()
        self.dirs = tuple(os.path.dirname(package.__file__) + os.sep for package in packages)

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING or not record.pathname.startswith(self.dirs)


def quiet_rank_console() -> None:
    """cluster.verbose=false on a rank: Ray's, Ray Train's and DeepSpeed's INFO lines stay off the console (Ray's
    log files keep Ray's); DeepSpeed's start-up lines and torch's note that a CPU node has no CUDA runtime go."""
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    for client in ("botocore", "aiobotocore", "s3fs"):  # an object store run folder: where the credentials came from
        logging.getLogger(client).setLevel(logging.WARNING)
    import deepspeed

    console = [h for h in logging.getLogger().handlers if isinstance(h, logging.StreamHandler)]
    for handler in console:
        handler.addFilter(LibraryInfoFilter(ray, deepspeed))
