"""Checkpointed run state as typed objects with `save` / `load` (after lingua's `TrainState`).

`RunState` is what the single-process runner's `checkpoint.pt` holds after an epoch: everything needed to go on
as if the run had not stopped. `Best` is the best evaluated round so far, which both runners keep.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor

from nayer.compat import FORMAT, Upgrade, check_format, unchanged
from nayer.runtime import save_torch


@dataclass
class Best:
    """The best top-1 so far and its round (-1: none evaluated yet). Selected on the test set: reported as such."""

    top1: float = -1.0
    epoch: int = -1

    def update(self, top1: float | None, epoch: int) -> None:
        if top1 is not None and top1 > self.top1:
            self.top1, self.epoch = top1, epoch

    @property
    def found(self) -> bool:
        return self.epoch >= 0


class SavedState:
    """`save` / `load` for a dataclass of tensors, plain containers and nested (or optional) dataclasses (kept as
    dicts in the file, so `torch.load(weights_only=True)` reads it back). The file carries its format
    (`nayer.compat`); `UPGRADE` brings a file of an older format to the current fields."""

    UPGRADE: ClassVar[Upgrade] = staticmethod(unchanged)

    def save(self, path: str | Path) -> Path:
        """Atomically: a temporary name, then a rename over `path`."""
        state = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        state = {k: dataclasses.asdict(v) if dataclasses.is_dataclass(v) else v for k, v in state.items()}
        return save_torch({**state, "format": FORMAT}, path)

    @classmethod
    def load(cls, path: str | Path):
        """On CPU: each part is copied to its device by the load_state_dict it goes to (RNG states stay on CPU)."""
        state = torch.load(path, map_location="cpu", weights_only=True)
        names = {f.name for f in dataclasses.fields(cls)}
        if isinstance(state, dict):
            state = dict(state)
            state = cls.UPGRADE(state, check_format(state.pop("format", 0), str(path)))
        if not isinstance(state, dict) or set(state) != names:
            raise ValueError(f"{path} is not a {cls.__name__} checkpoint of this version (keys "
                             f"{sorted(state) if isinstance(state, dict) else type(state).__name__}, expected "
                             f"{sorted(names)})")
        hints = typing.get_type_hints(cls)
        return cls(**{k: _revive(hints[k], v) for k, v in state.items()})


def _revive(hint: Any, value: Any) -> Any:
    """A saved value as its field's type: a dict back into its dataclass (also an optional one)."""
    kinds = [hint, *typing.get_args(hint)]
    cls = next((k for k in kinds if dataclasses.is_dataclass(k)), None)
    return cls(**value) if cls is not None and isinstance(value, dict) else value


@dataclass
class RunState(SavedState):
    """After epoch `epoch`: the student, its optimizer and schedule, the synthesizer (generator, noisy layers, BN
    EMA, RNG, metrics bank), how many buffer chunks are on disk, the KD sampler's and torch's RNG, the best round
    and the wall time so far."""

    epoch: int
    student: dict
    trainer: dict
    synthesizer: dict
    buffer_chunks: int
    sampler_rng: Tensor
    torch_rng: Tensor
    best: Best
    elapsed: float
