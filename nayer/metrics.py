"""The paper's synthesis metrics (NAYER, Tran et al., CVPR 2024, Sec. 4.3, Fig. 5 and supplementary Table 5),
measured on every round's kept images:

- CE convergence: generator steps until the teacher's cross-entropy on the batch falls below a threshold (0.1);
  an iteration that never gets there counts as g (its step budget) and lowers `syn_ce_reached`.
- Diversity: distances between teacher penultimate features of the new images and of earlier images (a
  reservoir sample of them): the mean over all pairs, and the mean over new images of the distance to the nearest
  earlier one (the minimum-distance variant).
- Inception-style score with the teacher as the classifier: exp(E_x KL(p(y|x) || p(y))).

And how the teacher rates the kept images as the buffer holds them (uint8, not augmented): its cross-entropy on
their target labels (`syn_teacher_ce`; ln K is a uniform guess) and the share it assigns to their target class
(`syn_agreement`, %). The run's verdict (`nayer.verdict`) flags a low agreement.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from nayer.augment import Normalize, uint8_to_float
from nayer.config import SynthesisConfig
from nayer.models import classifier_layer
from nayer.specs import Compute, ImageSpec


def ce_steps(ce_curve: list[float], threshold: float) -> int | None:
    """Steps until the teacher's CE is below `threshold` (1 = after the first step), None if it never is."""
    return next((step + 1 for step, ce in enumerate(ce_curve) if ce < threshold), None)


def inception_score(probs: Tensor) -> float:
    """exp(mean_i KL(p_i || mean_j p_j)) over class probabilities [N, K] (Salimans et al. 2016, teacher's)."""
    probs = probs.double().clamp_min(1e-12)
    marginal = probs.mean(0, keepdim=True)
    return math.exp(float((probs * (probs.log() - marginal.log())).sum(1).mean()))


def diversity(new: Tensor, earlier: Tensor) -> tuple[float, float]:
    """(mean L2 distance over all (new, earlier) pairs, mean over new of the distance to the nearest earlier)."""
    distances = torch.cdist(new.double(), earlier.double())
    return float(distances.mean()), float(distances.min(1).values.mean())


class FeatureBank:
    """A uniform reservoir sample (Vitter's algorithm R) of up to `capacity` feature vectors seen so far."""

    def __init__(self, capacity: int, seed: int):
        self.capacity, self.seen = capacity, 0
        self.features: Tensor | None = None
        self.rng = torch.Generator().manual_seed(seed + 104729)  # its own stream: never moves synthesis draws

    def add(self, features: Tensor) -> None:
        features = features.detach().float().cpu()
        for row in features:
            if self.features is None:
                self.features = torch.empty(self.capacity, row.numel())
            if self.seen < self.capacity:
                self.features[self.seen] = row
            else:
                slot = int(torch.randint(0, self.seen + 1, (1,), generator=self.rng))
                if slot < self.capacity:
                    self.features[slot] = row
            self.seen += 1

    def tensor(self) -> Tensor | None:
        return None if self.features is None or self.seen == 0 else self.features[:min(self.seen, self.capacity)]

    def state_dict(self) -> dict:
        return {"seen": self.seen, "features": self.tensor(), "rng": self.rng.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.seen, self.features = 0, None
        if state["features"] is not None:
            self.add(state["features"])
        self.seen = int(state["seen"])
        self.rng.set_state(state["rng"])


class SynthesisMetrics:
    """Measures a round's kept images with the (frozen) teacher; holds the feature bank across rounds."""

    def __init__(self, teacher: nn.Module, images: ImageSpec, cfg: SynthesisConfig, compute: Compute, seed: int):
        self.teacher, self.cfg, self.compute = teacher, cfg, compute
        self.normalize = Normalize(images.mean, images.std).to(compute.device)
        self.bank = FeatureBank(cfg.diversity_bank, seed)
        self._head = classifier_layer(teacher)  # its input is the penultimate feature vector

    @torch.no_grad()
    def features(self, images: Tensor, batch_size: int = 500) -> tuple[Tensor, Tensor]:
        """Teacher penultimate features and class log-probabilities of uint8 images [N, C, H, W]."""
        captured: list[Tensor] = []
        handle = self._head.register_forward_hook(lambda module, inputs, output: captured.append(inputs[0].float()))
        log_probs = []
        try:
            for start in range(0, len(images), batch_size):
                x = self.normalize(uint8_to_float(images[start:start + batch_size].to(self.compute.device)))
                with self.compute.autocast():
                    log_probs.append(self.teacher(x).float().log_softmax(1))
        finally:
            handle.remove()
        return torch.cat(captured).flatten(1), torch.cat(log_probs)

    def measure(self, images: Tensor, labels: Tensor, curves: list[list[tuple[float, float]]], g_steps: int) -> dict:
        """The round's metrics (names as in metrics.jsonl); diversity is None before any earlier image exists."""
        ce_curves = [[ce for _, ce in curve] for curve in curves if curve]
        reached = [ce_steps(curve, self.cfg.ce_threshold) for curve in ce_curves]
        out: dict = {
            "syn_ce_steps": sum(g_steps if r is None else r for r in reached) / len(reached) if reached else None,
            "syn_ce_reached": sum(r is not None for r in reached) / len(reached) if reached else None,
            # mean teacher CE after each generator step over the round's iterations (the Fig. 5a curve)
            "syn_ce_curve": [sum(c[i] for c in ce_curves) / len(ce_curves) for i in range(min(map(len, ce_curves)))]
            if ce_curves else [],
            "syn_is": None, "syn_diversity": None, "syn_diversity_min": None,
            "syn_teacher_ce": None, "syn_agreement": None,
        }
        if len(images) == 0:
            return out
        was_training = self.teacher.training
        self.teacher.eval()
        features, log_probs = self.features(images)
        self.teacher.train(was_training)
        targets = labels.to(log_probs.device)
        out["syn_teacher_ce"] = float(-log_probs.gather(1, targets[:, None]).mean())
        out["syn_agreement"] = 100.0 * float((log_probs.argmax(1) == targets).float().mean())
        out["syn_is"] = inception_score(log_probs.exp())
        earlier = self.bank.tensor()
        if earlier is not None:
            out["syn_diversity"], out["syn_diversity_min"] = diversity(features, earlier)
        self.bank.add(features)
        return out

    def state_dict(self) -> dict:
        return {"bank": self.bank.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.bank.load_state_dict(state["bank"])
