"""What every synthesis method shares (`Synthesizer`): the epoch loop, the teacher's BN-statistics loss and its EMA,
the generator objective, the non-finite policy, the paper's synthesis metrics (`nayer.metrics`) and the state a
checkpoint keeps. A method (`nayer.methods.nayer`, `.fm`, `.deepinv`) implements one iteration, `_iteration`, and
how it is built from the run config, `from_config`.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

import torch
from torch import Tensor, nn
from tqdm import tqdm

from nayer.augment import Augment, float_to_uint8
from nayer.losses import BNStatisticsLoss, NonFiniteLossError, adversarial_loss, class_loss
from nayer.metrics import SynthesisMetrics
from nayer.progress import progress_bar
from nayer.specs import Compute, ImageSpec

if TYPE_CHECKING:
    from nayer.config import RunConfig, SynthesisConfig


@dataclass
class SynthesisResult:
    images: Tensor  # uint8 [N, 3, H, W]: the kept batch of every iteration
    labels: Tensor  # int64 [N]
    stats: dict = field(default_factory=dict)  # mean losses of the kept batches, steps, seconds
    curves: list = field(default_factory=list)  # per iteration, per step: (total loss, teacher CE)


@dataclass(frozen=True)
class SynthesisParts:
    """What a synthesizer works on, besides the run config: the frozen teacher, the student of the adversarial term
    (both placed on `compute`'s device), the label-text embeddings [K, D] (methods without LTE ignore them), the
    image spec, and the seed of the synthesizer's own draws."""

    teacher: nn.Module
    student: nn.Module
    embeddings: Tensor
    images: ImageSpec
    compute: Compute
    seed: int = 0


class Synthesizer:
    """One method's synthesis state across epochs; `synthesize()` runs one epoch of `_iteration`s."""

    @classmethod
    def from_config(cls, cfg: "RunConfig", parts: SynthesisParts) -> "Synthesizer":
        """The method built from its config sections (`nayer.methods` calls this for `method=<name>`)."""
        raise NotImplementedError

    def __init__(self, parts: SynthesisParts, syn_cfg: "SynthesisConfig", on_nonfinite: str = "stop"):
        teacher, student, images, compute, seed = parts.teacher, parts.student, parts.images, parts.compute, parts.seed
        self.teacher, self.student = teacher, student
        # compile=true: the teacher's BN-statistics hooks are traced into the compiled graph (one graph with the
        # hooks recording, one without), so synthesis compiles as KD does
        self.teacher_forward = torch.compile(teacher) if compute.compile else teacher
        self.student_forward = torch.compile(student) if compute.compile else student
        self.on_nonfinite = on_nonfinite  # stop: raise NonFiniteLossError | skip: no step on that loss, counted
        self.images, self.num_classes = images, images.num_classes
        self.cfg = syn_cfg
        self.compute, self.device = compute, compute.device
        self.augment = Augment(images.mean, images.std, syn_cfg.crop_padding, syn_cfg.flip,
                               syn_cfg.jitter).to(self.device)
        self.bn_loss = BNStatisticsLoss(teacher, syn_cfg.bn_mmt, syn_cfg.bn_loss)
        if syn_cfg.a_bn > 0 and len(self.bn_loss) == 0:
            raise ValueError("the teacher has no BatchNorm2d layer, so the BN loss is undefined; set synthesis.a_bn=0")
        self.rng = torch.Generator().manual_seed(seed)
        self.epoch = 0  # epochs synthesized so far (drives the g_life schedule)
        self.metrics = SynthesisMetrics(teacher, images, syn_cfg, compute, seed) if syn_cfg.metrics else None

    def synthesize(self, warmup: bool, progress: bool | Callable[[int], Any] = False,
                   loops: int | None = None, first_iteration: int = 0) -> SynthesisResult:
        """One epoch of synthesis. `warmup`: no adversarial term, `warmup_loops` iterations.
        `loops`: this synthesizer's share of the epoch's iterations when several split it (default: all), starting
        at the epoch's iteration `first_iteration`.
        `progress`: True = `nayer.progress.progress_bar` over the epoch's generator steps (a transient bar on a
        terminal, plain lines every 30 s elsewhere), or a factory called with the step count that returns an object
        with tqdm's update/close (e.g. a line logger)."""
        self._start_epoch()
        if loops is None:
            loops = self.cfg.warmup_loops if warmup else self.cfg.g_loops
        use_adv = not warmup and self.cfg.a_adv != 0
        start = time.perf_counter()
        student_was_training = self.student.training
        self.student.eval()
        self.teacher.eval()
        frozen = [p for m in (self.teacher, self.student) for p in m.parameters() if p.requires_grad]
        for p in frozen:  # no parameter gradients for T or S: pure waste during synthesis
            p.requires_grad_(False)
        images, labels, totals = [], [], {"loss": 0.0, "bn": 0.0, "ce": 0.0, "adv": 0.0}
        curves: list[list[tuple[float, float]]] = []
        self.nonfinite_steps = 0
        steps = loops * self.cfg.g_steps
        bar = progress(steps) if callable(progress) else \
            progress_bar(steps, "synthesis", leave=False) if progress else tqdm(total=steps, disable=True)
        try:
            kept = 0
            for iteration in range(loops):
                x, y, parts, curve = self._iteration(use_adv, bar, first_iteration + iteration)
                curves.append(curve)
                if x is None:  # on_nonfinite=skip and no step of the iteration had a finite loss
                    continue
                kept += 1
                images.append(float_to_uint8(x).cpu())
                labels.append(y.cpu())
                for k in totals:
                    totals[k] += parts[k]
        finally:
            bar.close()
            for p in frozen:
                p.requires_grad_(True)
            self.student.train(student_was_training)
        self.epoch += 1
        stats = {f"syn_{k}": v / max(kept, 1) for k, v in totals.items()}
        stats["syn_bn_share"] = self._bn_share(stats) if kept else None
        stats.update(syn_iterations=loops, syn_steps=loops * self.cfg.g_steps, syn_nonfinite_steps=self.nonfinite_steps)
        size = self.images.size
        result = SynthesisResult(torch.cat(images) if images else torch.empty(0, 3, size, size, dtype=torch.uint8),
                                 torch.cat(labels) if labels else torch.empty(0, dtype=torch.int64), stats, curves)
        stats["syn_time"] = time.perf_counter() - start  # the method's own time; the metrics are timed apart
        if self.metrics is not None:
            t0 = time.perf_counter()
            stats.update(self.metrics.measure(result.images, result.labels, curves, self.cfg.g_steps))
            stats["metrics_time"] = time.perf_counter() - t0
        return result

    def _start_epoch(self) -> None:
        """Per-epoch state changes before the first iteration (NAYER: a fresh G every g_life epochs)."""

    def _iteration(self, use_adv: bool, bar: Any, iteration: int
                   ) -> tuple[Tensor | None, Tensor, dict, list[tuple[float, float]]]:
        """The epoch's iteration `iteration`, one batch: (kept images in [0,1] or None, targets, loss parts of the
        kept step, per step (L, CE))."""
        raise NotImplementedError

    def _objective(self, x: Tensor, targets: Tensor, use_adv: bool) -> tuple[Tensor, dict]:
        """L = a_bn * L_BN + a_cls * CE + a_adv * L_adv on augment(x) (NAYER's and FM's generator objective);
        returns L and its parts as floats."""
        cfg = self.cfg
        with self.compute.autocast(), self.bn_loss.capture():
            xa = self.compute.layout(self.augment(x))
            t_logits = self.teacher_forward(xa)
            s_logits = self.student_forward(xa) if use_adv else None
        zero = torch.zeros((), device=self.device)
        loss_bn = self.bn_loss.loss() if cfg.a_bn != 0 else zero
        loss_ce = class_loss(t_logits, targets)
        loss_adv = adversarial_loss(s_logits, t_logits) if s_logits is not None else zero
        loss = cfg.a_bn * loss_bn + cfg.a_cls * loss_ce + cfg.a_adv * loss_adv
        return loss, self._parts(loss, loss_bn, loss_ce, loss_adv)

    def _bn_share(self, stats: dict) -> float:
        """The weighted BN term's share of the three weighted terms' magnitude on the kept steps (DeepInversion's
        image priors are not counted): |a_bn L_BN| / (|a_bn L_BN| + |a_cls CE| + |a_adv L_adv|). Near 1, the class
        term no longer counts."""
        terms = [abs(self.cfg.a_bn * stats["syn_bn"]), abs(self.cfg.a_cls * stats["syn_ce"]),
                 abs(self.cfg.a_adv * stats["syn_adv"])]
        return terms[0] / sum(terms) if sum(terms) > 0 else 0.0

    @staticmethod
    def _parts(*losses: Tensor) -> dict:
        """(L, bn, ce, adv) as floats with one device sync, not four."""
        return dict(zip(("loss", "bn", "ce", "adv"), torch.stack([l.float() for l in losses]).detach().tolist()))

    def _finite(self, parts: dict, iteration: int, step: int, hint: str) -> bool:
        """True for a finite loss. A non-finite one raises (on_nonfinite=stop) naming round, iteration and step,
        or is counted and left out (skip: the caller takes no optimizer step on it)."""
        value = parts["loss"]
        if math.isfinite(value):
            return True
        where = f"round {self.epoch}, iteration {iteration}, generator step {step}"
        if self.on_nonfinite == "stop":
            raise NonFiniteLossError(f"generator loss is {value} at {where} ("
                                     + ", ".join(f"{k}={v:.4g}" for k, v in parts.items())
                                     + f"): {hint}, or set on_nonfinite=skip")
        if self.nonfinite_steps == 0:
            print(f"generator loss is {value} at {where}: step skipped (on_nonfinite=skip)", flush=True)
        self.nonfinite_steps += 1
        return False

    def state_dict(self) -> dict:
        return {"bn_ema": self.bn_loss.state_dict(), "epoch": self.epoch, "rng": self.rng.get_state(),
                "metrics": self.metrics.state_dict() if self.metrics is not None else None}

    def load_state_dict(self, state: dict) -> None:
        self.epoch = int(state["epoch"])
        self.bn_loss.load_state_dict(state["bn_ema"])
        self.rng.set_state(state["rng"])
        if self.metrics is not None and state.get("metrics") is not None:
            self.metrics.load_state_dict(state["metrics"])
