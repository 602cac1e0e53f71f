"""The registry of synthesis methods: `method=<name>` -> its `Synthesizer` class (see nayer/methods/README.md)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:
    from nayer.methods.base import Synthesizer

METHODS: dict[str, type["Synthesizer"]] = {}


def register(name: str) -> Callable[[type["Synthesizer"]], type["Synthesizer"]]:
    """Class decorator: the method is `method=<name>` from then on."""
    def add(cls: type["Synthesizer"]) -> type["Synthesizer"]:
        if name in METHODS:
            raise ValueError(f"method '{name}' is registered twice: {METHODS[name].__module__}, {cls.__module__}")
        METHODS[name] = cls
        return cls
    return add
