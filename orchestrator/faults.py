"""Fault injection for drills and tests: a synthesis actor or a DeepSpeed rank of a real run dies (SIGKILL, no
cleanup, like an OOM kill or a lost node) at a chosen point, so that the restart settings
(`cluster.synth_max_restarts`, `cluster.trainer_max_failures`) can be checked on the cluster they will run on; or a
shard's bytes change on storage after it was written (bit rot, a bad disk), which the ranks' checksum must catch.

    NAYER_FAULTS="kill_synthesis_writing:round=2,worker=0" python -m orchestrator.run ... cluster.synth_max_restarts=1
    NAYER_FAULTS="kill_rank:round=3,rank=1,step=5" python -m orchestrator.run ... cluster.trainer_max_failures=1
    NAYER_FAULTS="kill_driver:round=2" python -m orchestrator.run ...   # then the same command with resume=true

Faults, separated by ';':
    kill_synthesis_writing:round=R,worker=W   the actor, half-way through writing its first shard of round R
    kill_rank:round=R,rank=Q,step=S           DeepSpeed rank Q, before KD step S (0-based) of round R
    corrupt_shard:round=R,worker=W            one byte flipped in worker W's first shard of round R, after its write
    kill_driver:round=R                       the driver (a Tune trial's: the trial), once round R is checkpointed
                                              and reported
Keys left out match any value. Each fault fires once per run folder: a marker file in `<run>/faults/` (created
before the kill) keeps the restarted process from dying again. Unset, nothing is injected.
"""

from __future__ import annotations

import os
import signal
from dataclasses import dataclass, field
from pathlib import Path

from nayer.cli_config import ConfigError
from nayer.storage import Storage, as_storage

ENV = "NAYER_FAULTS"
KINDS = {"kill_synthesis_writing": ("round", "worker"), "kill_rank": ("round", "rank", "step"),
         "corrupt_shard": ("round", "worker"), "kill_driver": ("round",)}


@dataclass(frozen=True)
class Fault:
    kind: str
    where: tuple[tuple[str, int], ...]

    def matches(self, at: dict[str, int]) -> bool:
        return all(at.get(key) == value for key, value in self.where)


@dataclass
class FaultPlan:
    """The faults of one run (picklable: the driver hands it to every actor and rank)."""

    faults: list[Fault] = field(default_factory=list)
    markers: Storage | None = None  # <run>/faults/

    @classmethod
    def parse(cls, text: str, markers: Storage | str | Path) -> "FaultPlan":
        faults = []
        for spec in filter(None, (s.strip() for s in text.split(";"))):
            kind, _, args = spec.partition(":")
            if kind not in KINDS:
                raise ConfigError(f"{ENV}: unknown fault '{kind}' in '{spec}'; choose one of: {', '.join(KINDS)}")
            where = []
            for item in filter(None, args.split(",")):
                key, sep, value = item.partition("=")
                if not sep or key not in KINDS[kind] or not value.lstrip("-").isdigit():
                    raise ConfigError(f"{ENV}: bad '{item}' in '{spec}'; {kind} takes "
                                      + ", ".join(f"{k}=<int>" for k in KINDS[kind]))
                where.append((key, int(value)))
            faults.append(Fault(kind, tuple(where)))
        return cls(faults, as_storage(markers))

    @classmethod
    def from_env(cls, markers: Storage | str | Path) -> "FaultPlan":
        return cls.parse(os.environ.get(ENV, ""), markers)

    def fires(self, kind: str, **at: int) -> bool:
        """True (once per run folder) if an unfired fault of `kind` matches `at`."""
        for index, fault in enumerate(self.faults):
            if fault.kind != kind or not fault.matches(at):
                continue
            if not self.markers.create_exclusive(f"{index}-{kind}.fired"):
                continue  # fired before: this is the restarted process
            print(f"fault injection ({ENV}): {kind} at {at} (pid {os.getpid()})", flush=True)
            return True
        return False

    def kill_if(self, kind: str, **at: int) -> None:
        """SIGKILL this process if an unfired fault of `kind` matches `at`."""
        if self.fires(kind, **at):
            print(f"fault injection ({ENV}): SIGKILL pid {os.getpid()}", flush=True)
            os.kill(os.getpid(), signal.SIGKILL)

    def corrupt_if(self, store: Storage, rel: str, **at: int) -> None:
        """Flip one byte in the middle of the file `rel` of `store` if an unfired corrupt_shard fault matches `at`."""
        if self.fires("corrupt_shard", **at):
            store.flip_byte(rel)
