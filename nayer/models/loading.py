"""Reading checkpoints and loading them into a model with a readable mismatch report.

``torch.load`` always runs with ``weights_only=True`` (no arbitrary unpickling). Checkpoints written
by training loops often wrap the weights (``{"state_dict": ...}``, ``{"model": ...}``,
``{"student": ...}``) or carry the key prefixes of DataParallel/DeepSpeed (``module.``) and
torch.compile (``_orig_mod.``); both are undone before the keys are compared with the model.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping

import torch
from torch import nn

WRAPPER_KEYS: tuple[str, ...] = ("state_dict", "model", "student")
STRIPPED_PREFIXES: tuple[str, ...] = ("module.", "_orig_mod.")
# How many offending keys of each kind the error message names.
SHOWN_KEYS = 5


class CheckpointMismatchError(ValueError):
    """The checkpoint's keys or shapes do not fit the architecture it is loaded into."""


def read_checkpoint(path: str | os.PathLike[str]) -> dict:
    """``torch.load`` a checkpoint file on CPU (weights only); clear errors for missing/unreadable files."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # corrupt file, non-torch file, or pickled objects weights_only refuses
        text = str(error).strip()
        refused = re.search(r"Unsupported global: GLOBAL (\S+)", text)
        if refused:
            raise ValueError(f"checkpoint {path} holds pickled Python objects ({refused.group(1)}), not only tensors, "
                             "and is not loaded (weights_only=True); save the model's state_dict() instead, e.g. "
                             "torch.save(model.state_dict(), path)") from None
        detail = re.search(r"WeightsUnpickler error:\s*(\S.*)", text)  # torch's first line is generic advice
        first_line = detail.group(1) if detail else (text.splitlines() or [type(error).__name__])[0]
        raise ValueError(f"could not read checkpoint {path}: {first_line}") from error


def strip_prefixes(key: str) -> str:
    """Remove any sequence of wrapper prefixes (e.g. ``_orig_mod.module.``) from the start of a key."""
    stripped = True
    while stripped:
        stripped = False
        for prefix in STRIPPED_PREFIXES:
            if key.startswith(prefix):
                key = key[len(prefix) :]
                stripped = True
    return key


def normalize_state_dict(checkpoint: Mapping, source: str) -> dict[str, torch.Tensor]:
    """Unwrap a training checkpoint to its tensor mapping and strip wrapper prefixes from the keys."""
    for wrapper in WRAPPER_KEYS:
        if wrapper in checkpoint and isinstance(checkpoint[wrapper], Mapping):
            checkpoint = checkpoint[wrapper]
            break
    non_tensors = [key for key, value in checkpoint.items() if not isinstance(value, torch.Tensor)]
    if non_tensors:
        raise CheckpointMismatchError(
            f"checkpoint {source} is not a state_dict: entries {', '.join(map(str, non_tensors[:SHOWN_KEYS]))} "
            f"are not tensors (expected a plain state_dict or one under {'/'.join(WRAPPER_KEYS)})"
        )
    return {strip_prefixes(key): value for key, value in checkpoint.items()}


def _key_list(keys: list[str]) -> str:
    shown = ", ".join(keys[:SHOWN_KEYS])
    return f" ({shown}{', ...' if len(keys) > SHOWN_KEYS else ''})" if keys else ""


def load_state_dict_checked(model: nn.Module, state_dict: Mapping, source: str, arch: str) -> None:
    """Load ``state_dict`` into ``model`` strictly, or raise CheckpointMismatchError naming what differs.

    ``source`` names where the weights came from (a path or a weights tag), ``arch`` the registry name;
    both appear in the message so a wrong ``teacher.arch``/``teacher.checkpoint`` pair is obvious.
    """
    loaded = normalize_state_dict(state_dict, source)
    expected = model.state_dict()
    missing = [key for key in expected if key not in loaded]
    unexpected = [key for key in loaded if key not in expected]
    mismatched = [
        f"{key}: checkpoint {list(loaded[key].shape)} vs model {list(expected[key].shape)}"
        for key in expected
        if key in loaded and loaded[key].shape != expected[key].shape
    ]
    if missing or unexpected or mismatched:
        raise CheckpointMismatchError(
            f"checkpoint {source} does not match architecture '{arch}': "
            f"{len(missing)} missing keys{_key_list(missing)}, "
            f"{len(unexpected)} unexpected{_key_list(unexpected)}, "
            f"{len(mismatched)} shape mismatch{'es' if len(mismatched) != 1 else ''}{_key_list(mismatched)}"
        )
    model.load_state_dict(loaded, strict=True)


def load_checkpoint(model: nn.Module, path: str | os.PathLike[str], arch: str) -> None:
    """Read the checkpoint file at ``path`` and load it into ``model`` with the checks above."""
    load_state_dict_checked(model, read_checkpoint(path), str(path), arch)
