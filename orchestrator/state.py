"""The driver's checkpoint, `checkpoints/driver.pt`: small things only, whatever the cluster's size.

The synthesis actors checkpoint their own state (`orchestrator.workers`), the DeepSpeed ranks theirs (Ray Train),
and the manifest is its own commit point (`buffer/manifest.json`). The driver records where each stands: the last
committed synthesis round, the last KD round, the student checkpoint that KD round wrote, the best round, the
time so far, the last top-1 and a synthesis round committed ahead of its KD round (overlapped rounds).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from nayer.compat import driver_state
from nayer.state import Best, SavedState
from orchestrator.rounds import SynthesisRound


@dataclass
class DriverState(SavedState):
    """Where a pipeline run stands after a checkpointed step."""

    UPGRADE = staticmethod(driver_state)

    synthesized: int = -1  # the last synthesis round committed to the manifest
    done: int = -1  # the last round finished (its record logged): a warm-up round, or a KD round the ranks trained
    student_checkpoint: str | None = None  # `<experiment>/round-XXXXX` of the ranks' last checkpoint (trainer/)
    best: Best = field(default_factory=Best)
    last_top1: float | None = None  # the student's top-1 after the last KD round
    elapsed: float = 0.0  # wall seconds of all driver starts so far
    teacher_top1: float | None = None
    pending: SynthesisRound | None = None  # overlapped: round `synthesized` > `done`, committed before its KD round
    synth_workers: int | None = None  # the pools' sizes at this checkpoint (None: none yet; a resume may change them)
    trainer_workers: int | None = None

    def kd_round(self, warmup: int) -> int:
        """The last KD round the ranks trained (-1: none); warm-up rounds train no student."""
        return self.done if self.done >= warmup else -1
