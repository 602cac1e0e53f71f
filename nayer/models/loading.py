"""Reading checkpoints and loading them into a model with a readable mismatch report.

``torch.load`` always runs with ``weights_only=True`` (no arbitrary unpickling). Checkpoints written
by training loops often wrap the weights (``{"state_dict": ...}``, ``{"model": ...}``,
``{"student": ...}``) or carry the key prefixes of DataParallel/DeepSpeed (``module.``) and
torch.compile (``_orig_mod.``); both are undone before the keys are compared with the model.

Checkpoints as they exist in the wild also differ in small ways the loader accepts or fixes:
- BatchNorm layers saved without their ``num_batches_tracked`` counter (older PyTorch, hand-converted files) load,
  and PyTorch fills the counter (BatchNorm's ``_load_from_state_dict`` does, for a state_dict without version);
- renamed keys (a head called ``linear`` instead of ``fc``, a ``backbone.`` wrapper) are fixed by ``rename`` pairs
  ``OLD->NEW``; when missing and unexpected keys line up by shape, the mismatch error suggests the pairs.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence

import torch
from torch import nn

from nayer.runtime import first_line

WRAPPER_KEYS: tuple[str, ...] = ("state_dict", "model", "student")
STRIPPED_PREFIXES: tuple[str, ...] = ("module.", "_orig_mod.")
# How many offending keys of each kind the error message names.
SHOWN_KEYS = 5
RENAME_ARROW = "->"
# A checkpoint may lack this buffer of every BatchNorm; PyTorch fills it at load.
BN_COUNTER = "num_batches_tracked"


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
        raise ValueError(f"could not read checkpoint {path}: {detail.group(1) if detail else first_line(error)}") \
            from error


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


def rename_keys(state_dict: Mapping[str, torch.Tensor], rename: Sequence[str], where: str) -> dict[str, torch.Tensor]:
    """Apply ``OLD->NEW`` pairs in order: a key that *starts* with a match of the regex OLD has that match replaced
    by NEW (``re`` replacement syntax, so ``\\1`` works). ``linear.->fc.`` renames a head, ``backbone.->`` drops a
    wrapper. ``where`` names the config key in errors."""
    pairs = []
    for pair in rename:
        old, arrow, new = str(pair).partition(RENAME_ARROW)
        if not arrow or not old:
            raise ValueError(f"{where} entry {pair!r} is not OLD{RENAME_ARROW}NEW (e.g. 'linear.{RENAME_ARROW}fc.')")
        try:
            pairs.append((re.compile(old), new))
        except re.error as error:
            raise ValueError(f"{where} entry {pair!r}: '{old}' is not a regular expression ({error})") from None
    renamed = {}
    for key, value in state_dict.items():
        for pattern, new in pairs:
            match = pattern.match(key)
            if match:
                key = match.expand(new) + key[match.end():]
        if key in renamed:
            raise ValueError(f"{where} maps two checkpoint keys onto '{key}'")
        renamed[key] = value
    return renamed


def suggest_rename(missing: list[str], unexpected: list[str], loaded: Mapping, expected: Mapping) -> list[str]:
    """``OLD->NEW`` pairs that would turn the unexpected keys into the missing ones of the same shapes, or [] when
    the keys do not line up that way. Keys are paired in order within (shape, last name part), BN counters left
    out (either side may lack them); each pair's differing leading parts give one prefix renaming, and the pairs
    are kept only if, applied to the whole checkpoint, every key then fits the model."""
    weights = [key for key in unexpected if not key.endswith(BN_COUNTER)]
    if not weights or len(missing) != len(weights):
        return []
    pool: dict[tuple, list[str]] = {}
    for key in missing:
        pool.setdefault((tuple(expected[key].shape), key.rsplit(".", 1)[-1]), []).append(key)
    pairs: list[str] = []
    for key in weights:
        candidates = pool.get((tuple(loaded[key].shape), key.rsplit(".", 1)[-1]))
        if not candidates:
            return []
        old, new = _differing_prefixes(key, candidates.pop(0))
        # a dot left unescaped matches itself too, and reads (and pastes into a shell) as the prefix it is
        literal = old if re.escape(old) == old.replace(".", "\\.") else re.escape(old)
        pair = f"{literal}{RENAME_ARROW}{new}"
        if pair not in pairs:
            pairs.append(pair)
    if len(pairs) > 3:
        return []
    pairs.sort(key=lambda pair: -len(pair.partition(RENAME_ARROW)[0]))  # the longer prefix renames first
    try:
        renamed = rename_keys(loaded, pairs, "the suggested renaming")
    except ValueError:  # two keys onto one
        return []
    return pairs if all(key in expected for key in renamed) else []


def _differing_prefixes(old: str, new: str) -> tuple[str, str]:
    """The leading parts of two dotted keys before their longest common dotted suffix."""
    old_parts, new_parts = old.split("."), new.split(".")
    common = 0
    while common < min(len(old_parts), len(new_parts)) and old_parts[-1 - common] == new_parts[-1 - common]:
        common += 1
    head = lambda parts: ".".join(parts[: len(parts) - common]) + ("." if len(parts) > common else "")  # noqa: E731
    return head(old_parts), head(new_parts)


def _key_list(keys: list[str]) -> str:
    shown = ", ".join(keys[:SHOWN_KEYS])
    return f" ({shown}{', ...' if len(keys) > SHOWN_KEYS else ''})" if keys else ""


def load_state_dict_checked(model: nn.Module, state_dict: Mapping, source: str, arch: str,
                            rename: Sequence[str] = (), rename_key: str = "teacher.rename") -> None:
    """Load ``state_dict`` into ``model`` strictly (after ``rename``, see :func:`rename_keys`), or raise
    CheckpointMismatchError naming what differs. Missing BatchNorm ``num_batches_tracked`` counters are accepted.

    ``source`` names where the weights came from (a path or a weights tag), ``arch`` the model name;
    both appear in the message so a wrong ``teacher.arch``/``teacher.checkpoint`` pair is obvious, and so does the
    renaming that would fix it (``rename_key``) when the shapes line up.
    """
    loaded = rename_keys(normalize_state_dict(state_dict, source), rename, rename_key)
    expected = model.state_dict()
    missing = [key for key in expected if key not in loaded and key.rsplit(".", 1)[-1] != BN_COUNTER]
    unexpected = [key for key in loaded if key not in expected]
    mismatched = [
        f"{key}: checkpoint {list(loaded[key].shape)} vs model {list(expected[key].shape)}"
        for key in expected
        if key in loaded and loaded[key].shape != expected[key].shape
    ]
    if missing or unexpected or mismatched:
        fix = suggest_rename(missing, unexpected, loaded, expected) if not mismatched else []
        hint = f"; the shapes line up if the keys are renamed: '{rename_key}=[{','.join(fix)}]'" if fix else ""
        raise CheckpointMismatchError(
            f"checkpoint {source} does not match architecture '{arch}': "
            f"{len(missing)} missing keys{_key_list(missing)}, "
            f"{len(unexpected)} unexpected{_key_list(unexpected)}, "
            f"{len(mismatched)} shape mismatch{'es' if len(mismatched) != 1 else ''}{_key_list(mismatched)}{hint}"
        )
    # strict=False only for the BN counters left out above: every other key was checked to match both ways
    model.load_state_dict(loaded, strict=False)


def load_checkpoint(model: nn.Module, path: str | os.PathLike[str], arch: str, rename: Sequence[str] = (),
                    rename_key: str = "teacher.rename") -> None:
    """Read the checkpoint file at ``path`` and load it into ``model`` with the checks above."""
    load_state_dict_checked(model, read_checkpoint(path), str(path), arch, rename, rename_key)
