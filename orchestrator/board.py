"""The driver <-> ranks channel, a Ray actor alive for the run.

Down: committed shards as soon as the driver commits them (each rank's loader thread reads its new ones at once,
while the ranks may still train the round before) and one plan per KD round (which round, and the last commit it
may train on). Up: each round's result from rank 0 (metrics, the student weights' object reference, the
checkpoint name); the board itself holds the student weights in the object store.
"""

from __future__ import annotations

import asyncio
import dataclasses

import ray

from orchestrator.messages import KDPlan, KDRoundResult, ShardEntry


@ray.remote(num_cpus=0)
class RoundBoard:
    def __init__(self):
        self.entries: list[ShardEntry] = []  # committed shards, in commit (seq) order
        self.plans: list[KDPlan] = []
        self.results: dict[int, KDRoundResult] = {}
        self.delivered: set[int] = set()
        self.stopped = False
        self.changed: asyncio.Condition | None = None

    def _condition(self) -> asyncio.Condition:
        if self.changed is None:  # created inside the actor's event loop
            self.changed = asyncio.Condition()
        return self.changed

    async def _notify(self) -> None:
        async with self._condition():
            self._condition().notify_all()

    async def commit(self, entries: list[ShardEntry]) -> None:
        """Newly committed shards."""
        self.entries.extend(entries)
        await self._notify()

    async def entries_after(self, seq: int) -> list[ShardEntry] | None:
        """The committed entries with a larger seq, once there are any; None once the driver has stopped."""
        def later() -> list[ShardEntry]:
            return [e for e in self.entries if e.seq > seq]

        async with self._condition():
            await self._condition().wait_for(lambda: later() or self.stopped)
        return None if self.stopped else later()

    async def last_seq(self) -> int:
        """The seq of the latest commit (-1: none yet)."""
        return self.entries[-1].seq if self.entries else -1

    async def publish(self, plan: KDPlan) -> None:
        self.plans.append(plan)
        await self._notify()

    async def stop(self) -> None:
        self.stopped = True
        await self._notify()

    async def next_plan(self, after_round: int) -> KDPlan | None:
        """The plan of the first KD round after `after_round`; None once the driver has stopped without one."""
        def later() -> KDPlan | None:
            return next((p for p in self.plans if p.round > after_round), None)

        async with self._condition():
            await self._condition().wait_for(lambda: later() is not None or self.stopped)
        return later()

    async def awaited(self, round_index: int) -> bool:
        """True while the driver still waits for this round's result (published, result not yet delivered)."""
        return any(p.round == round_index for p in self.plans) and round_index not in self.results \
            and round_index not in self.delivered

    async def finish(self, result: KDRoundResult) -> None:
        """A round's result from rank 0. The student weights go into the object store from here: the board lives
        for the run, so the reference (handed to the driver and from there to the synthesis actors) outlives ranks
        that Ray Train restarts; in a list, so the driver receives the reference, not the weights."""
        self.results[result.round] = dataclasses.replace(result, weights=None, student=[ray.put(result.weights)])
        await self._notify()

    async def result(self, round_index: int) -> KDRoundResult:
        async with self._condition():
            await self._condition().wait_for(lambda: round_index in self.results)
        self.delivered.add(round_index)
        return self.results.pop(round_index)
