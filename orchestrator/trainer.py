"""Student trainers: M DeepSpeed data-parallel ranks under Ray Train's `TorchTrainer`, alive for the whole run.

Each rank holds its stable share of the buffer (`orchestrator.resident`): a loader thread reads every newly
committed shard of the share once, as the driver commits it. Each KD round the driver publishes a plan on the
`RoundBoard` (`orchestrator.board`); every rank takes S DeepSpeed steps of L_KD on micro-batches sampled from its
resident share (the global batch is kd.batch_size), steps the per-epoch cosine, evaluates its slice of the
labeled set (counts all-reduced; the teacher too, once, before the first round), and saves a DeepSpeed checkpoint
that `ray.train.report` persists as `round-XXXXX` (with the student's weights as `student.pt`, for a resumed
driver). Rank 0 hands the metrics and the new student weights (object store) back to the driver through the
board.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import ray
import ray.train
import torch
import torch.distributed as dist

from nayer.data import LabeledImages
from nayer.eval_cache import read_manifest
from nayer.evaluate import accuracy, accuracy_counts, predict
from nayer.kd import KDObjective, finite_or_skip, make_optimizer
from nayer.models import build_model, load_model
from nayer.progress import LineProgress
from nayer.runtime import RunError, first_line
from nayer.specs import Compute, ImageSpec, native_bf16
from orchestrator.cluster import ray_log_level, root_cause
from orchestrator.config import PipelineConfig, threads
from orchestrator.precision import bf16_with_fp32_batchnorm_stats
from orchestrator.resident import GB, ResidentShare, ShareLoader
from orchestrator.resize import TAG, NodeRank, check_same_student, loadable_at
from orchestrator.storage import append_jsonl, is_url, join

STUDENT_WEIGHTS = "student.pt"  # in each checkpoint directory: the module's state_dict, for the synthesis actors


def sharded_evaluate(model: torch.nn.Module, part: LabeledImages, spec: ImageSpec, compute: Compute,
                     batch_size: int) -> dict:
    """Accuracy over all ranks: each evaluates its own slice of the labeled set, the per-class counts are summed."""
    counts = accuracy_counts(predict(model, part, spec, compute, batch_size), part.y, spec.num_classes)
    total = torch.from_numpy(counts).to(compute.device)
    dist.all_reduce(total)
    return accuracy(total.cpu().numpy())


def eval_source(data: LabeledImages | None) -> dict | None:
    """What the ranks read their evaluation slices from: the file of a memory-mapped set (`data.eval_cache`: each
    rank maps it and copies only its own images), else the set itself, once, through the object store."""
    if data is None:
        return None
    if isinstance(data.x, np.memmap):
        manifest = read_manifest(Path(data.x.filename).parent)
        return {"file": data.x.filename, "y": data.y, "classes": data.classes,
                "files": manifest["files"] if manifest else None}
    return {"ref": ray.put(data)}


def rank_part(source: dict | None, rank: int, world: int) -> LabeledImages | None:
    """This rank's slice of the evaluation set (images rank, rank + M, ...), in its own memory: a copy, since the
    object store's and the map's arrays are read-only (torch warns on them)."""
    if source is None:
        return None
    if "file" in source:
        # the entry a rank maps (at start, and again after a restart) must be the one the driver checked
        manifest = read_manifest(Path(source["file"]).parent)
        x, y, classes = np.load(source["file"], mmap_mode="r"), source["y"], source["classes"]
        if manifest is None or manifest["files"] != source["files"] or len(x) != len(y):
            raise RunError(f"the evaluation cache {Path(source['file']).parent} changed after the driver read it "
                           "(another run rewrote it, or the image folder changed): start the run again")
    else:
        full = ray.get(source["ref"])
        x, y, classes = full.x, full.y, full.classes
    return LabeledImages(np.array(x[rank::world]), y[rank::world].copy(), classes)


def train_loop_per_worker(config: dict) -> None:
    """One DeepSpeed rank (runs inside a Ray Train worker; torch.distributed is already initialized)."""
    cfg: PipelineConfig = config["cfg"]
    # Chosen before deepspeed is imported: DeepSpeed picks its accelerator once, at import.
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if torch.cuda.is_available() else "cpu")
    if not cfg.cluster.verbose:
        quiet_rank_console()
    import deepspeed

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    if not is_url(config["rank_logs"]):
        os.makedirs(config["rank_logs"], exist_ok=True)
    rank_log = join(config["rank_logs"], f"rank-{rank:03d}.jsonl")  # this rank's own metrics per round
    torch.set_num_threads(threads(cfg.cluster.trainer_cpus))
    device = ray.train.torch.get_device()
    board, spec, faults, c = config["board"], config["images"], config["faults"], cfg.cluster
    k = spec.num_classes
    ds_config = config["deepspeed"]
    ds_bf16 = bool(ds_config.get("bf16", {}).get("enabled", False))
    # DeepSpeed bf16 keeps bf16 weights: inputs must be autocast to match
    compute = Compute(device, (cfg.bf16 and native_bf16(device)) or ds_bf16, cfg.channels_last)
    loader = ShareLoader(lambda seq: ray.get(board.entries_after.remote(seq)), rank, world, c.on_corrupt_shard,
                         c.rank_buffer_gb * GB)
    share = ResidentShare(loader, device, c.rank_buffer_device_gb * GB)

    teacher = build_model(cfg.teacher.arch, k)
    teacher.load_state_dict(ray.get(config["teacher"]))
    teacher = teacher.to(device).eval().requires_grad_(False)
    torch.manual_seed(cfg.seed)  # the student's initial weights (DeepSpeed broadcasts rank 0's): the same every run
    student = load_model(cfg.student.arch, k, cfg.student.checkpoint or None, cfg.student.weights or None,
                         cfg.student.rename, role="student").to(device)
    if cfg.channels_last:  # the student's weights stay contiguous (DeepSpeed broadcasts them as flat bytes);
        teacher = teacher.to(memory_format=torch.channels_last)  # its convs still run channels_last on CL inputs
    if ds_bf16:  # before initialize: DeepSpeed would cast the BatchNorm weights and leave fp32 statistics beside them
        student, note = bf16_with_fp32_batchnorm_stats(student)
        if rank == 0 and cfg.cluster.verbose:
            print(note, flush=True)
    optimizer, scheduler = make_optimizer(student, cfg.kd, cfg.epochs)  # the cosine steps per round, not per step
    # Ray Train's latest checkpoint when it restarted these ranks after a failure (cluster.trainer_max_failures),
    # else the one of the run being resumed (maybe saved by another number of ranks: orchestrator.resize); either
    # way the ranks continue after the round it holds.
    checkpoint = ray.train.get_checkpoint() or (ray.train.Checkpoint(config["resume_from"])
                                               if config["resume_from"] else None)
    client, weights = None, None
    with contextlib.ExitStack() as opened:
        if checkpoint is not None:
            saved = opened.enter_context(checkpoint.as_directory())
            node = NodeRank(ctx.get_local_rank(), dist.barrier)
            loadable = loadable_at(saved, checkpoint.path, world, ds_config, node, opened)
            ds_config = loadable.ds_config
            if loadable.note and rank == 0:
                print(loadable.note, flush=True)
        # DeepSpeed prints a line per rank as it builds its CPU communication op; on a Ray Train worker that print
        # is teed to the worker's stdout, past the log filter (quiet_rank_console), unless stdout is elsewhere.
        with contextlib.nullcontext() if cfg.cluster.verbose else contextlib.redirect_stdout(io.StringIO()):
            engine, _, _, _ = deepspeed.initialize(model=student, optimizer=optimizer, config=ds_config)
        if checkpoint is not None:
            _, client = engine.load_checkpoint(loadable.path, tag=TAG)
            if client is None:
                raise RunError(f"no DeepSpeed checkpoint '{TAG}' in {saved}: the run folder's trainer/ is incomplete")
            loadable.restore_buffers(engine.module)
            weights = torch.load(os.path.join(saved, STUDENT_WEIGHTS), map_location="cpu", weights_only=True) \
                if rank == 0 else None
            if loadable.note and rank == 0:  # a resize: the student the ranks start from must be the one that was saved
                check_same_student(engine.module.state_dict(), weights, saved)
    objective = KDObjective(engine, teacher, cfg.kd, spec, compute)
    eval_part = rank_part(config["eval_set"], rank, world)
    micro_batch = ds_config["train_micro_batch_size_per_gpu"]

    def finish(r: int, metrics: dict, weights: dict, started: float) -> None:
        """Rank 0 hands the round's metrics and the new student weights to the board (which stores the weights)."""
        result = {**metrics, "save_time": time.perf_counter() - started, "checkpoint": f"round-{r:05d}",
                  "weights": weights}
        ray.get(board.finish.remote(r, result))

    done = -1
    if client is not None:
        scheduler.load_state_dict(client["scheduler"])
        done = client["round"]
        if rank == 0 and ray.get(board.awaited.remote(done)):  # failed after saving, before handing it over
            finish(done, client["metrics"], weights, time.perf_counter())

    # The teacher's accuracy, once per run, in the first round's metrics; ranks that Ray Train restarted from a
    # checkpoint have reported a round already (the driver has the number).
    teacher_top1 = None
    if eval_part is not None and config["teacher_eval"] and checkpoint is None:
        teacher_top1 = sharded_evaluate(teacher, eval_part, spec, compute, cfg.data.eval_batch_size)["top1"]
    reported_bytes, reported_excluded = 0, 0  # what the loader did before the first round counts in it
    while (plan := ray.get(board.next_plan.remote(done))) is not None:
        r = done = plan["round"]
        torch.manual_seed(cfg.seed * 1000003 + 1009 * r + rank)  # augmentation draws: reproducible on resume
        batches = share.batches(plan["upto_seq"], micro_batch, cfg.kd.kd_steps,
                                (cfg.seed * 7907 + r) * 1009 + rank, c.shuffle_buffer)
        engine.train()
        start, read_time, losses, skipped = time.perf_counter(), 0.0, [], 0
        progress = LineProgress(cfg.kd.kd_steps, f"round {r} KD rank {rank}") if rank == 0 else None
        waited = time.perf_counter()
        for step, (images, _) in enumerate(batches):
            read_time += time.perf_counter() - waited
            faults.kill_if("kill_rank", round=r, rank=rank, step=step)
            loss = objective(images)
            # One host sync a step: stop reads the loss's finiteness; skip reads it once reduced over the ranks
            # (every rank leaves the step out if any rank's loss is not finite).
            if cfg.on_nonfinite == "skip":
                flag = (~torch.isfinite(loss.detach())).float().reshape(1)
                dist.all_reduce(flag, op=dist.ReduceOp.MAX)
                finite = flag.item() == 0.0
            else:
                finite = finite_or_skip(loss, cfg.on_nonfinite, f"round {r}, KD step {step} on rank {rank}")
            if finite:
                engine.backward(loss)
                engine.step()
                losses.append(loss.detach().float())
            else:
                if skipped == 0 and rank == 0:
                    print(f"round {r}, KD step {step}: non-finite loss on a rank, step skipped (on_nonfinite=skip)",
                          flush=True)
                skipped += 1
            if progress is not None:
                progress.update()
            waited = time.perf_counter()
        if progress is not None:
            progress.close()
        kd_time = time.perf_counter() - start
        lr = optimizer.param_groups[0]["lr"]
        scheduler.step()
        # What this rank read since its last report (the shards committed meanwhile, once each), over all ranks.
        loader.wait(ray.get(board.last_seq.remote()), check=False)
        rank_loss = torch.stack(losses).mean() if losses else torch.zeros((), device=device)
        mean_loss = rank_loss.clone()
        dist.all_reduce(mean_loss)  # the round's KD loss over all ranks
        counts = torch.tensor([len(losses), loader.bytes_read - reported_bytes], dtype=torch.int64, device=device)
        gathered = [torch.zeros_like(counts) for _ in range(world)]
        dist.all_gather(gathered, counts)
        reported_bytes = loader.bytes_read
        corrupt: list[list[str]] = [[] for _ in range(world)]
        excluded = list(loader.excluded)
        dist.all_gather_object(corrupt, excluded[reported_excluded:])
        reported_excluded = len(excluded)
        read_bytes = [int(t[1]) for t in gathered]
        metrics = {"kd_loss": mean_loss.item() / world, "kd_steps": len(losses), "lr": lr,
                   "kd_steps_per_rank": [int(t[0]) for t in gathered], "kd_nonfinite_steps": skipped,
                   "kd_read_bytes": sum(read_bytes), "kd_read_bytes_per_rank": read_bytes,
                   "kd_streaming": loader.streaming,
                   "corrupt_shards": sorted({url for urls in corrupt for url in urls}),
                   "kd_time": kd_time, "kd_read_time": read_time}
        if eval_part is not None:
            t0 = time.perf_counter()
            ev = sharded_evaluate(engine.module, eval_part, spec, compute, cfg.data.eval_batch_size)
            metrics.update(top1=ev["top1"], per_class=ev["per_class"], eval_time=time.perf_counter() - t0)
        if teacher_top1 is not None:
            metrics["teacher_top1"], teacher_top1 = teacher_top1, None
        t0 = time.perf_counter()
        weights = {key: value.detach().cpu().clone() for key, value in engine.module.state_dict().items()} \
            if rank == 0 else None
        with tempfile.TemporaryDirectory() as tmp:  # every rank writes its part; Ray merges them into one checkpoint
            engine.save_checkpoint(tmp, tag=TAG, client_state={"scheduler": scheduler.state_dict(), "round": r,
                                                                     "metrics": metrics})
            if rank == 0:
                torch.save(weights, os.path.join(tmp, STUDENT_WEIGHTS))
            # Ray Train keeps (and later serializes) the dict it is handed: give it its own copy.
            ray.train.report(dict(metrics), checkpoint=ray.train.Checkpoint.from_directory(tmp),
                             checkpoint_dir_name=f"round-{r:05d}")
        append_jsonl({"round": r, "rank": rank, "kd_loss": rank_loss.item() if losses else None,
                      "kd_steps": len(losses), "read_bytes": read_bytes[rank], "kd_time": kd_time,
                      "kd_read_time": read_time, "streaming": loader.streaming}, rank_log)
        if rank == 0:
            finish(r, metrics, weights, t0)


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


def make_trainer(cfg: PipelineConfig, storage_path: str, name: str, loop_config: dict):
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    c = cfg.cluster
    resources = {"CPU": c.trainer_cpus, **({"GPU": c.trainer_gpus} if c.trainer_gpus > 0 else {})}
    return TorchTrainer(
        train_loop_per_worker, train_loop_config=loop_config,
        scaling_config=ScalingConfig(num_workers=c.trainer_workers, use_gpu=c.trainer_gpus > 0,
                                     resources_per_worker=resources),
        run_config=RunConfig(name=name, storage_path=storage_path,
                             checkpoint_config=CheckpointConfig(num_to_keep=c.keep_checkpoints),
                             failure_config=FailureConfig(max_failures=c.trainer_max_failures),
                             # every rank's report and the worker group's start-up: INFO lines, kept in Ray's logs
                             logging_config=LoggingConfig(log_level=logging.getLevelName(ray_log_level(c.verbose)))))
