"""Run-time plumbing shared by every entry point: device choice, seeding, atomic file writes."""

from __future__ import annotations

import json
import os
import random
import re
import tempfile
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from nayer.cli_config import ConfigError


def check_device_name(name: str) -> None:
    """Syntax only (a config may name a GPU the machine parsing it lacks): auto, cpu, cuda or cuda:<index>."""
    if name != "auto" and not re.fullmatch(r"cpu|cuda(:\d+)?", name):
        raise ConfigError(f"device={name!r} is not allowed; choose auto, cpu, cuda or cuda:<index>")


def select_device(name: str) -> torch.device:
    """`auto` = CUDA when present, else CPU. Asking for CUDA without one is an error, not a silent fallback."""
    check_device_name(name)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device '{name}' requested but CUDA is not available here; use device=cpu or auto")
    return device


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def atomic_write(path: str | Path, write: Callable[[str], None]) -> Path:
    """`write(tmp)` to a unique temporary name in the same folder, then rename over `path`.

    A crash (or a full disk) never leaves a truncated file under the final name, and concurrent writers never
    see each other's half-written files; the temporary file is removed if `write` fails.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def save_torch(obj: Any, path: str | Path) -> Path:
    return atomic_write(path, lambda tmp: torch.save(obj, tmp))


def save_text(text: str, path: str | Path) -> Path:
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def save_json(obj: Any, path: str | Path) -> Path:
    return save_text(json.dumps(obj, indent=2) + "\n", path)
