"""The run folder `<out_dir>/<name>/` and what a run logs into it (metrics.jsonl and TensorBoard).

Both runners use it: `nayer.run` (checkpoint `checkpoint.pt`) and the orchestrator's driver (which adds the Ray
Train storage and `checkpoints/`). A folder is checked before the inputs load (fail fast) and written after they
did, so a run that failed on a bad input leaves nothing behind that would block the corrected command. A folder
holds a run once it has a checkpoint.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, Sequence

from omegaconf import OmegaConf

from nayer.cli_config import ConfigError, config_to_yaml
from nayer.runtime import append_jsonl, save_json, save_text
from nayer.storage import open_storage


class RunFolder:
    """runs/<name>/: refuses to clobber an existing run unless resuming, and a resume with another config."""

    CHECKPOINT = "checkpoint.pt"  # its presence marks a run that can be resumed

    def __init__(self, cfg: Any, path: Path | None = None):
        """`path`: where the folder is on this machine, if not <out_dir>/<name> (a local copy of a remote one)."""
        self.cfg = cfg
        if path is None:
            open_storage(cfg.out_dir).require_local(
                f"out_dir={cfg.out_dir!r}: a run folder on an object store is the pipeline's (python -m "
                "orchestrator.run); this runner writes a local folder")
        self.path = Path(cfg.out_dir) / cfg.name if path is None else path
        self.checkpoint = self.path / self.CHECKPOINT
        self.metrics = self.path / "metrics.jsonl"
        self.buffer = self.path / "buffer"
        self.samples = self.path / "samples"
        self.tensorboard = self.path / "tb"
        if self.checkpoint.exists() and not cfg.resume:
            raise ConfigError(f"run folder {self.path} already holds a run; pass resume=true to continue it or "
                              f"name=<new name>")
        if cfg.resume:
            if not self.checkpoint.exists():
                raise ConfigError(f"resume=true but {self.checkpoint} does not exist; drop resume or check name=")
            may_change = type(cfg).RESUME_MAY_CHANGE
            changed = config_changes(OmegaConf.load(self.path / "config.yaml"), OmegaConf.structured(cfg), may_change)
            if changed:
                raise ConfigError(f"resume=true but the config differs from the one in {self.path}/config.yaml: "
                                  f"{'; '.join(changed[:4])}; resume with the same config (only "
                                  f"{', '.join(may_change)} may change)")

    def create(self, inputs: dict) -> None:
        """Clear the leftovers of a start that never checkpointed, write the resolved config and `inputs`: where the
        teacher, its weights and the image values came from (inputs.json)."""
        if not self.cfg.resume and self.path.exists():
            self.metrics.unlink(missing_ok=True)
            self.clear_outputs()
        self.path.mkdir(parents=True, exist_ok=True)
        save_text(config_to_yaml(self.cfg), self.path / "config.yaml")
        save_json(inputs, self.path / "inputs.json")

    def outputs(self) -> list[Path]:
        """Folders a run writes into (removed when a run that never checkpointed is started again)."""
        return [self.buffer, self.samples, self.tensorboard]

    def clear_outputs(self) -> None:
        for stale in self.outputs():
            shutil.rmtree(stale, ignore_errors=True)

    def metrics_log(self) -> "MetricsLog":
        return MetricsLog(self.metrics, self.tensorboard)


class MetricsLog:
    """One record per round: a line of metrics.jsonl and the record's numbers as TensorBoard scalars."""

    def __init__(self, jsonl: Path, tensorboard: Path):
        from torch.utils.tensorboard import SummaryWriter  # imported late: it pulls in tensorboard

        self.jsonl = jsonl
        self.writer = SummaryWriter(str(tensorboard))

    def log(self, record: dict) -> None:
        append_jsonl(record, self.jsonl)
        for key, value in record.items():
            if isinstance(value, (int, float)) and key != "epoch":
                self.writer.add_scalar(key, value, record["epoch"])
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def config_changes(saved: Any, current: Any, may_change: Sequence[str]) -> list[str]:
    """`key: saved -> current` for every leaf key that differs, except `may_change` (dotted keys)."""
    flat_saved, flat_current = _flatten(OmegaConf.to_container(saved)), _flatten(OmegaConf.to_container(current))
    return [f"{key}: {flat_saved.get(key)!r} -> {flat_current.get(key)!r}"
            for key in sorted(set(flat_saved) | set(flat_current))
            if key not in may_change and flat_saved.get(key) != flat_current.get(key)]


def _flatten(node: Any, prefix: str = "") -> dict:
    if not isinstance(node, dict):
        return {prefix[:-1]: node}
    return {k: v for key, value in node.items() for k, v in _flatten(value, f"{prefix}{key}.").items()}
