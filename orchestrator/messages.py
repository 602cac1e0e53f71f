"""What crosses a process boundary in the pipeline, typed: a shard of the buffer, a synthesis worker's share of a
round, a KD round's plan, and a KD round's result. (`orchestrator.workers.SynthesisTask` is the driver -> worker
message.) Each is a dataclass of plain values that Ray pickles as it is.

    driver --SynthesisTask--> worker --SynthesisOutput (ShardEntry...)--> driver
    driver --commit: ShardEntry...--> board --> every rank's loader
    driver --KDPlan--> board --> ranks;  rank 0 --KDRoundResult--> board --> driver
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class ShardEntry:
    """One WebDataset shard of the buffer, as `buffer/manifest.json` lists it (these fields, by these names)."""

    path: str  # relative to the buffer folder: round-RRRRR/worker-WWW-PPPPPP.tar
    samples: int
    bytes: int
    sha256: str
    round: int  # the synthesis round that made it
    seq: int = -1  # commit sequence number (the order of commits, never reused); -1 until the driver commits it

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class SynthesisOutput:
    """A synthesis worker's share of a round, done: its shards (written, not yet committed) and statistics."""

    worker: int
    shards: list[ShardEntry]
    stats: dict[str, Any]  # the method's syn_* statistics over its iterations (merged by orchestrator.rounds)
    compute_time: float  # seconds synthesizing
    write_time: float  # seconds writing shards and the sample grid
    state_time: float  # seconds writing its own state file


@dataclass(frozen=True)
class KDPlan:
    """KD round `round`: train on the shards committed up to commit sequence number `upto_seq`."""

    round: int
    upto_seq: int


@dataclass(frozen=True)
class KDMetrics:
    """What a KD round measured over all ranks; `record()` is its part of the round's metrics.jsonl line."""

    kd_loss: float  # mean over the ranks' finite steps
    kd_steps: int  # steps rank 0 took (the ranks step together)
    lr: float  # the learning rate of the round's steps
    kd_steps_per_rank: list[int]
    kd_nonfinite_steps: int  # steps left out under on_nonfinite=skip
    kd_read_bytes: int  # shard bytes the ranks read from storage since their last report
    kd_read_bytes_per_rank: list[int]
    kd_streaming: bool  # rank 0's share streams from storage (it outgrew cluster.rank_buffer_gb)
    kd_time: float  # seconds of the steps, rank 0
    kd_read_time: float  # of which waiting for batches
    top1: float | None = None  # student top-1 on the labeled set (None: no data.eval)
    per_class: list[float] | None = None
    eval_time: float | None = None

    def record(self) -> dict:
        """The metrics line's fields: the evaluation's only when there was one."""
        return {k: v for k, v in dataclasses.asdict(self).items()
                if v is not None or k not in ("top1", "per_class", "eval_time")}


@dataclass(frozen=True)
class KDRoundResult:
    """Rank 0's report of KD round `round`, through the board to the driver. The ranks hand over `weights`; the
    board puts them into the object store and hands the driver `student` instead (see `RoundBoard.finish`)."""

    round: int
    metrics: KDMetrics
    checkpoint: str  # the ranks' checkpoint of this round in their Ray Train experiment: round-XXXXX
    corrupt_shards: list[str] = field(default_factory=list)  # buffer paths that failed their checksum when read
    teacher_top1: float | None = None  # the teacher on the labeled set: once, in the first round of a run
    save_time: float = 0.0  # seconds of the ranks' checkpoint
    weights: dict | None = None  # the student's state_dict (rank 0 -> board)
    student: list | None = None  # [ObjectRef] of those weights (board -> driver): a list, so the driver gets the ref
