"""The driver's side of a synthesis round: waiting for the workers' tasks (errors named by worker), their
statistics merged into the round's record, and the committed round as the driver keeps it (`SynthesisRound`)."""

from __future__ import annotations

from dataclasses import dataclass

import ray

from nayer.runtime import RunError, first_line
from orchestrator.cluster import last_error_line, root_cause
from orchestrator.messages import SynthesisOutput

SUMMED_STATS = ("syn_steps", "syn_nonfinite_steps")


@dataclass(frozen=True)
class SynthesisRound:
    """A committed synthesis round: its part of the metrics line, and what the round's timing and counts need.
    Overlapped, the driver checkpoints it (`DriverState.pending`) until its KD round has run."""

    round: int
    record: dict  # the merged statistics (`synthesis_record`), commit_time, adv_student_round
    wall: float  # seconds from the round's launch to its commit (syn_time)
    compute: float  # the slowest worker's seconds synthesizing (syn_compute_time)
    bytes: int  # shard bytes committed (syn_bytes)
    excluded: int  # shards left out at the commit

    def line(self) -> dict:
        """The round's synthesis fields of metrics.jsonl."""
        return {**self.record, "syn_time": self.wall, "syn_compute_time": self.compute, "syn_bytes": self.bytes}


def gather_synthesis(calls: list) -> list[SynthesisOutput]:
    """Wait for a round's synthesis tasks; an actor's own error (a non-finite loss, a full disk) comes out as
    itself, a dead actor (killed, out of memory, out of restarts) as a RunError naming it."""
    try:
        return ray.get(calls)
    except ray.exceptions.RayActorError as exc:
        dead = next((w for w, call in enumerate(calls) if _died(call)), "?")
        if exc.actor_init_failed:
            raise RunError(f"synthesis worker {dead} could not start: {last_error_line(str(exc))}") from None
        raise RunError(f"synthesis worker {dead} died ({first_line(exc)}); cluster.synth_max_restarts=N lets Ray "
                       "restart it from the last checkpoint and retry its round") from None
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


def synthesis_record(outputs: list[SynthesisOutput]) -> dict:
    """Synthesis statistics of a round: losses and the paper's metrics averaged over the workers' iterations
    (curves step by step), counts summed, the slowest worker's times. A worker's diversity is measured against
    its own earlier images."""
    iterations = sum(o.stats["syn_iterations"] for o in outputs)
    record: dict = {"syn_iterations": iterations}
    for key in outputs[0].stats:
        if key in SUMMED_STATS:
            record[key] = sum(o.stats[key] for o in outputs)
            continue
        weighted = [(o.stats[key], o.stats["syn_iterations"]) for o in outputs
                    if o.stats.get(key) is not None and o.stats["syn_iterations"] > 0]
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
    record["shard_write_time"] = max(o.write_time for o in outputs)
    record["synth_state_time"] = max(o.state_time for o in outputs)
    return record
