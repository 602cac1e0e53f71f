"""Single-process NAYER: Algorithm 1 end to end (the reference for the distributed orchestrator).

    python -m nayer.run config=configs/cifar10.yaml teacher.checkpoint=../shared/data/cifar10_resnet56.pt \
        data.eval=../shared/data/cifar10_test.npz
    python -m nayer.run config=configs/cifar10.yaml,configs/profiles/cpu.yaml name=quick   # a CPU-sized look
    python -m nayer.run config=configs/digits.yaml teacher.checkpoint=runs/digits-teacher.pt  # self-contained
    python -m nayer.run config=... name=<existing run> resume=true                       # continue a killed run

Each epoch: synthesize (warm-up: no adversarial term, no student training) -> append to the memory buffer ->
S KD steps -> evaluate on the real test set -> metrics.jsonl / TensorBoard / sample grid -> checkpoint.
Run folder `runs/<name>/`: config.yaml, metrics.jsonl, tb/, samples/epoch-XXXXX.png, buffer/, checkpoint.pt,
summary.json, report.md + plots/ (nayer.report).
"""

from __future__ import annotations

import errno
import json
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from omegaconf import OmegaConf
from tqdm import tqdm

from nayer.buffer import InMemoryBuffer
from nayer.cli_config import ConfigError, config_to_yaml, parse_config
from nayer.config import RunConfig
from nayer.data import LabeledImages, load_labeled, preset, read_class_names
from nayer.evaluate import evaluate
from nayer.kd import StudentTrainer
from nayer.lte import encode_labels
from nayer.methods import build_synthesizer
from nayer.models import CheckpointMismatchError, build_model, load_teacher
from nayer.progress import RoundProgress
from nayer.report import write_report
from nayer.runtime import RunError, save_json, save_text, save_torch, seed_everything, select_device
from nayer.visualize import save_sample_grid


def resolve_data(cfg: RunConfig) -> tuple[list[str], int, list[float], list[float]]:
    """Class names, image size and normalization from the dataset preset and the config's overrides."""
    p = preset(cfg.data.dataset)
    if cfg.data.class_names is not None:
        names = list(cfg.data.class_names)
        if not names:
            raise ConfigError("data.class_names is an empty list: give one name per teacher output, or drop the key "
                              f"to use the '{cfg.data.dataset}' preset's names")
    elif cfg.data.class_names_file:
        names = read_class_names(cfg.data.class_names_file)
    else:
        names = list(p.class_names or [])
    if not names:
        raise ConfigError(f"dataset '{cfg.data.dataset}' has no built-in class names: pass data.class_names_file=<txt>")
    if len(names) != p.num_classes and cfg.data.class_names is None and not cfg.data.class_names_file:
        raise ConfigError(f"preset '{cfg.data.dataset}' lists {len(names)} names for {p.num_classes} classes")
    mean = list(cfg.data.mean) if cfg.data.mean is not None else list(p.mean)
    std = list(cfg.data.std) if cfg.data.std is not None else list(p.std)
    return names, p.image_size, mean, std


@dataclass
class RunInputs:
    """Everything a run reads before its first step, checked: class names, image geometry, the frozen teacher
    (on CPU), the label-text embeddings and the optional labeled evaluation set."""

    names: list[str]
    image_size: int
    mean: list[float]
    std: list[float]
    teacher: torch.nn.Module
    embeddings: torch.Tensor
    eval_set: LabeledImages | None


def load_inputs(cfg: RunConfig, lte_device: torch.device) -> RunInputs:
    """Load and cross-check the run's inputs; a mismatch (class counts, checkpoint shapes) is a ConfigError."""
    names, image_size, mean, std = resolve_data(cfg)
    k = len(names)
    try:
        teacher = load_teacher(cfg.teacher.arch, k, cfg.teacher.checkpoint or None, cfg.teacher.weights or None)
    except CheckpointMismatchError as exc:  # most often: a class-name list of the wrong length
        raise ConfigError(f"{exc}; note: the run has {k} class names, the teacher's output size must equal that") from None
    embeddings = encode_labels(names, cfg.lte.encoder, cfg.lte.template, cfg.lte.model, cfg.lte.pretrained,
                               cfg.lte.path or None, cfg.lte.cache_dir or None, lte_device)
    eval_set = load_labeled(cfg.data.eval, image_size) if cfg.data.eval else None
    if eval_set is not None and int(eval_set.y.max()) >= k:
        raise ConfigError(f"evaluation set {cfg.data.eval} has label {int(eval_set.y.max())} but the teacher has {k} classes")
    return RunInputs(names, image_size, mean, std, teacher, embeddings, eval_set)


class RunFolder:
    """runs/<name>/: refuses to clobber an existing run unless resuming; atomic checkpoint and JSONL metrics.

    Checked before the inputs load (fail fast), written after they did (a run that failed on a bad input leaves
    nothing behind that would block the corrected command). A folder holds a run once it has a checkpoint.
    """

    CHECKPOINT = "checkpoint.pt"  # its presence marks a run that can be resumed

    def __init__(self, cfg: RunConfig):
        self.cfg = cfg
        self.path = Path(cfg.out_dir) / cfg.name
        self.checkpoint = self.path / self.CHECKPOINT
        self.metrics = self.path / "metrics.jsonl"
        self.buffer = self.path / "buffer"
        self.samples = self.path / "samples"
        self.tensorboard = self.path / "tb"
        if self.checkpoint.exists() and not cfg.resume:
            raise ConfigError(f"run folder {self.path} already holds a run; pass resume=true to continue it or "
                              f"name=<new name>")
        if cfg.resume:
            if not self.checkpoint.exists():
                raise ConfigError(f"resume=true but {self.checkpoint} does not exist; drop resume or check name=")
            changed = config_changes(OmegaConf.load(self.path / "config.yaml"), OmegaConf.structured(cfg),
                                     type(cfg).RESUME_MAY_CHANGE)
            if changed:
                raise ConfigError(f"resume=true but the config differs from the one in {self.path}/config.yaml: "
                                  f"{'; '.join(changed[:4])}; resume with the same config (only "
                                  f"{', '.join(type(cfg).RESUME_MAY_CHANGE)} may change)")

    def create(self) -> None:
        if not self.cfg.resume and self.path.exists():  # leftovers of a run that never reached a checkpoint
            self.metrics.unlink(missing_ok=True)
            for stale in self.outputs():
                shutil.rmtree(stale, ignore_errors=True)
        self.samples.mkdir(parents=True, exist_ok=True)
        save_text(config_to_yaml(self.cfg), self.path / "config.yaml")

    def outputs(self) -> list[Path]:
        """Folders a run writes into (removed when a run that never checkpointed is started again)."""
        return [self.buffer, self.samples, self.tensorboard]

    def log(self, record: dict) -> None:
        with open(self.metrics, "a") as f:
            f.write(json.dumps(record) + "\n")



def config_changes(saved: Any, current: Any, may_change: Sequence[str]) -> list[str]:
    """`key: saved -> current` for every leaf key that differs, except `may_change` (dotted keys)."""
    flat_saved, flat_current = _flatten(OmegaConf.to_container(saved)), _flatten(OmegaConf.to_container(current))
    return [f"{key}: {flat_saved.get(key)!r} -> {flat_current.get(key)!r}"
            for key in sorted(set(flat_saved) | set(flat_current))
            if key not in may_change and flat_saved.get(key) != flat_current.get(key)]


def _flatten(node: Any, prefix: str = "") -> dict:
    if not isinstance(node, dict):
        return {prefix[:-1]: node}
    return {k: v for key, value in node.items() for k, v in _flatten(value, f"{prefix}{key}.").items()}


def run(cfg: RunConfig) -> dict:
    """Run Algorithm 1 as configured; returns the summary (final and best student top-1, times)."""
    wall_start = time.perf_counter()
    device = select_device(cfg.device)
    if cfg.num_threads > 0:
        torch.set_num_threads(cfg.num_threads)
    seed_everything(cfg.seed)
    folder = RunFolder(cfg)

    inputs = load_inputs(cfg, device)
    names, image_size, mean, std, embeddings, eval_set = (inputs.names, inputs.image_size, inputs.mean, inputs.std,
                                                          inputs.embeddings, inputs.eval_set)
    k = len(names)
    teacher = inputs.teacher.to(device)
    student = build_model(cfg.student.arch, k).to(device)
    if cfg.channels_last:
        teacher, student = teacher.to(memory_format=torch.channels_last), student.to(memory_format=torch.channels_last)

    synthesizer = build_synthesizer(cfg, teacher, student, embeddings, image_size, mean, std, device, cfg.seed)
    trainer = StudentTrainer(student, teacher, cfg.kd, cfg.epochs, mean, std, device, cfg.bf16, cfg.channels_last,
                             cfg.on_nonfinite)
    buffer = InMemoryBuffer()
    sampler = torch.Generator().manual_seed(cfg.seed + 1)
    kd_model = student
    if cfg.compile:  # KD and evaluation only: synthesis needs the teacher's BN hooks, which stay eager
        kd_model = trainer.objective.student = torch.compile(student)
        trainer.objective.teacher = torch.compile(teacher)
    start_epoch, best, elapsed_before = 0, {"top1": -1.0, "epoch": -1}, 0.0
    folder.create()

    if cfg.resume:
        state = torch.load(folder.checkpoint, map_location=device, weights_only=True)
        student.load_state_dict(state["student"])
        trainer.load_state_dict(state["trainer"])
        synthesizer.load_state_dict(state["synthesizer"])
        buffer = InMemoryBuffer.load(folder.buffer, state["buffer_chunks"])
        sampler.set_state(state["sampler_rng"])
        torch.set_rng_state(state["torch_rng"])
        start_epoch, best, elapsed_before = state["epoch"] + 1, state["best"], state["elapsed"]

    teacher_acc = None
    if eval_set is not None:
        teacher_acc = evaluate(teacher, eval_set.x, eval_set.y, mean, std, device, cfg.data.eval_batch_size,
                               cfg.bf16, k)["top1"]
        tqdm.write(f"teacher top-1 on {cfg.data.eval}: {teacher_acc:.2f}%")

    writer = tensorboard_writer(folder.tensorboard)
    total = cfg.warmup + cfg.epochs
    progress = RoundProgress(cfg.name, start_epoch, total, unit="epoch")
    record: dict = {}
    for epoch in range(start_epoch, total):
        warm = epoch < cfg.warmup
        result = synthesizer.synthesize(warmup=warm, progress=True)
        buffer.append(result.images, result.labels)
        buffer.save_chunk(folder.buffer, buffer.num_chunks - 1)
        buffer.reset_order()
        save_sample_grid(result.images, result.labels, folder.samples / f"epoch-{epoch:05d}.png",
                         min(k, cfg.grid_classes), cfg.grid_per_class)
        record = {"epoch": epoch, "phase": "warmup" if warm else "kd", "buffer": len(buffer), **result.stats}
        if not warm:
            if len(buffer) == 0:
                raise RunError(f"the memory buffer is empty at KD epoch {epoch}: no synthesis batch was kept so far "
                               f"({result.stats['syn_nonfinite_steps']} non-finite generator steps this epoch); add "
                               "warm-up epochs (warmup=) or synthesis iterations (synthesis.g_loops=)")
            batches = buffer.batches(cfg.kd.batch_size, cfg.kd.kd_steps, sampler)
            record.update(trainer.train_epoch(tqdm(batches, total=cfg.kd.kd_steps, desc="KD", unit="step",
                                                   leave=False, dynamic_ncols=True, disable=None), epoch))
            if eval_set is not None:
                t0 = time.perf_counter()
                ev = evaluate(kd_model, eval_set.x, eval_set.y, mean, std, device, cfg.data.eval_batch_size, cfg.bf16, k)
                record.update(top1=ev["top1"], per_class=ev["per_class"], eval_time=time.perf_counter() - t0)
                if ev["top1"] > best["top1"]:
                    best = {"top1": ev["top1"], "epoch": epoch}
        record["elapsed"] = elapsed_before + time.perf_counter() - wall_start
        folder.log(record)
        log_tensorboard(writer, record)
        save_torch({
            "epoch": epoch, "student": student.state_dict(), "trainer": trainer.state_dict(),
            "synthesizer": synthesizer.state_dict(), "buffer_chunks": buffer.num_chunks,
            "sampler_rng": sampler.get_state(), "torch_rng": torch.get_rng_state(), "best": best,
            "elapsed": record["elapsed"],
        }, folder.checkpoint)
        progress.round_done(record)
        if cfg.time_budget_s and record["elapsed"] >= cfg.time_budget_s:
            progress.write(f"time budget of {cfg.time_budget_s:.0f}s reached after epoch {epoch}")
            break
    progress.close()
    if writer is not None:
        writer.close()
    save_torch(student.state_dict(), folder.path / "student.pt")
    summary = {"name": cfg.name, "teacher_top1": teacher_acc, "final_top1": record.get("top1"),
               "best_top1_on_test_set": best["top1"] if best["epoch"] >= 0 else None, "best_epoch": best["epoch"],
               "epochs_run": record.get("epoch", start_epoch - 1) + 1, "buffer_images": len(buffer),
               "wall_time_s": elapsed_before + time.perf_counter() - wall_start, "device": str(device)}
    save_json(summary, folder.path / "summary.json")
    write_report(folder.path)
    return summary


def tensorboard_writer(path: Path):
    from torch.utils.tensorboard import SummaryWriter  # imported late: it pulls in tensorboard

    return SummaryWriter(str(path))


def log_tensorboard(writer, record: dict) -> None:
    if writer is None:
        return
    for key, value in record.items():
        if isinstance(value, (int, float)) and key != "epoch":
            writer.add_scalar(key, value, record["epoch"])
    writer.flush()


USER_ERRORS = (ConfigError, OSError, ValueError, RunError)  # reported in one line; anything else is a bug


def one_line(exc: BaseException) -> str:
    """The first line of an error's message (ours are one line; an OS error adds what the disk said)."""
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return f"disk full: {exc}; free space and run again with resume=true"
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def cli(schema: type, runner: Callable[..., dict], argv: Sequence[str] | None = None,
        explain: Callable[[BaseException], BaseException] = lambda exc: exc) -> None:
    """Parse `argv` (default: the command line) into `schema`, run it, print the summary as one JSON line; a bad
    input or a failure the run can name exits with a one-line `error: ...` instead of a traceback. `explain`
    finds the error inside wrappers (Ray's task and worker-group errors)."""
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        summary = runner(parse_config(schema, args))
    except Exception as exc:  # noqa: BLE001 - filtered: only USER_ERRORS become one line
        root = explain(exc)
        if not isinstance(root, USER_ERRORS):
            raise
        sys.exit(f"error: {one_line(root)}")
    print(json.dumps(summary))


def main(argv: Sequence[str] | None = None) -> None:
    cli(RunConfig, run, argv)


if __name__ == "__main__":
    main()
