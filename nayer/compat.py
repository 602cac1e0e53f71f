"""Files of run folders written by earlier versions of this code: the one place that reads them.

Each file a resume reads carries the format it was written in, a `format` key: `checkpoint.pt` (nayer.run),
`checkpoints/driver.pt` and `buffer/manifest.json` (the pipeline). A file without one is format 0. The readers
below bring an older file to the current shape before anything else sees it, each named by the format it serves;
nothing else in the code knows that older files exist. A file of a newer format than this code knows is refused in
one line.

- format 0, written by the code before files carried their format. `driver.pt` differs: a round synthesized ahead
  of its KD round (overlapped) is kept as its metrics record, `pending`, with `syn_time`, `syn_compute_time`,
  `syn_bytes` and `excluded_shards` in it; `{}` when there is none. The manifest and `checkpoint.pt` are as now.
- format 1, this code.

Formats are kept readable as long as a released version wrote them; the shapes older than format 0 (driver
checkpoints without the pool sizes, manifests without commit numbers, sweeps without `kd_round`) were never
released and are not read.
"""

from __future__ import annotations

from typing import Callable

FORMAT = 1


def check_format(version: object, where: str) -> int:
    """The format a file says it has; ValueError naming the file for one newer than this code (or not a number)."""
    if not isinstance(version, int) or isinstance(version, bool) or not 0 <= version <= FORMAT:
        raise ValueError(f"{where} has format {version!r}; this code reads formats 0 to {FORMAT}: resume it with the "
                         "version of nayer-orchestrator that wrote it")
    return version


def driver_state(state: dict, version: int) -> dict:
    """`checkpoints/driver.pt`'s fields in the current format (`orchestrator.state.DriverState`)."""
    if version == 0:
        pending = dict(state.get("pending") or {})
        state = {**state, "pending": None if not pending else {
            "round": state["synthesized"], "wall": pending.pop("syn_time"), "compute": pending.pop("syn_compute_time"),
            "bytes": pending.pop("syn_bytes"), "excluded": pending.pop("excluded_shards", 0), "record": pending}}
    return state


def unchanged(state: dict, version: int) -> dict:
    """A file whose shape every format shares."""
    return state


Upgrade = Callable[[dict, int], dict]
