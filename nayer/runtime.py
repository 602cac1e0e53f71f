"""Run-time plumbing shared by every entry point: device choice, seeding, atomic file writes, the errors a run
reports in one line."""

from __future__ import annotations

import errno
import json
import os
import shutil
import random
import re
import tempfile
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from nayer.cli_config import ConfigError


class RunError(RuntimeError):
    """A run stopped by a failure it can name in one line (the last checkpoint stays resumable)."""


class DiskFullError(RunError):
    """A write hit a full disk (ENOSPC or a quota); the file it would have replaced is untouched."""


def free_bytes(path: str | Path) -> int | None:
    """Free bytes on the filesystem holding `path` (its nearest existing parent), or None if unknown."""
    path = Path(path)
    while not path.exists() and path != path.parent:
        path = path.parent
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return None


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
    see each other's half-written files; the temporary file is removed if `write` fails. A full disk raises
    DiskFullError naming `path`.
    """
    path, tmp = Path(path), None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
        os.close(fd)
        write(tmp)
        os.replace(tmp, path)
    except BaseException as exc:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        full = _disk_full(exc, path)
        if full is None:
            raise
        raise full from exc
    return path


def _disk_full(exc: BaseException, path: Path) -> DiskFullError | None:
    """DiskFullError for ENOSPC / EDQUOT (also when torch.save wraps it in a RuntimeError), else None."""
    full = isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)
    full = full or (isinstance(exc, RuntimeError) and "No space left on device" in str(exc))
    if not full:
        return None
    free = free_bytes(path.parent)
    return DiskFullError(f"disk full writing {path} ({'?' if free is None else free} bytes free there); "
                         f"{'the previous file is untouched' if path.exists() else 'nothing was written'}: free space "
                         "and run again (resume=true continues from the last checkpoint)")


def save_torch(obj: Any, path: str | Path) -> Path:
    return atomic_write(path, lambda tmp: torch.save(obj, tmp))


def save_text(text: str, path: str | Path) -> Path:
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def first_line(error: BaseException) -> str:
    """The first line of an error's message (its type's name when it has none): what a one-line error quotes."""
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


def save_json(obj: Any, path: str | Path) -> Path:
    return save_text(json.dumps(obj, indent=2) + "\n", path)


def append_jsonl(record: dict, path: str | Path) -> None:
    """One record as a line of a JSONL log (appended: a log grows a line per round, it is not rewritten)."""
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")
