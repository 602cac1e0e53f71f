"""The pipeline's run folder `<out_dir>/<name>/`, on a POSIX path or on an object store (`orchestrator.storage`).

What the actors and the ranks write goes where they can all reach it, the run folder itself (`shared(...)`):
buffer/ (shards + manifest), samples/, checkpoints/synthesis/ (each actor's state), trainer/ (Ray Train's
storage, DeepSpeed checkpoints), ranks/ (each rank's metrics), faults/ (drill markers).

The driver's own files (config.yaml, inputs.json, metrics.jsonl, tb/, checkpoints/driver.pt, student.pt,
summary.json, report.md, plots/) are written by the same code on both: on POSIX in the run folder, on an object
store in a local staging folder (`cluster.staging_dir`) that mirrors them. A start downloads them from the store
(so the resume checks read the run's own config and checkpoint), and `publish` uploads each whole after it is
written: the driver checkpoint right after it is saved, the metrics after their round's line, the report at the
end. As on POSIX, the driver checkpoint is the round's commit point and the manifest the buffer's.
"""

from __future__ import annotations

import hashlib
import posixpath
import re
import shutil
import tempfile
from pathlib import Path

from nayer.run_folder import RunFolder
from orchestrator.config import PipelineConfig
from orchestrator.storage import download_tree, filesystem, is_url, join, listing, remove_tree, upload

OWN = ("config.yaml", "inputs.json", "metrics.jsonl", "tb", "checkpoints/driver.pt")  # downloaded at a start
SHARED = ("buffer", "samples", "checkpoints/synthesis", "trainer", "ranks", "faults")


class PipelineFolder(RunFolder):
    """The single-process run folder plus the Ray Train storage (trainer/), the checkpoints of the driver and of
    each synthesis actor (checkpoints/), the ranks' logs (ranks/); `url` is the object store URL, if any."""

    CHECKPOINT = "checkpoints/driver.pt"

    def __init__(self, cfg: PipelineConfig):
        self.url = join(cfg.out_dir, cfg.name) if is_url(cfg.out_dir) else None
        local = None
        if self.url is not None:
            local = staging_folder(cfg.cluster.staging_dir, self.url)
            shutil.rmtree(local, ignore_errors=True)  # the store holds the run; this copy is rebuilt from it
            for rel in OWN:
                download_tree(join(self.url, rel), local / rel)
        super().__init__(cfg, path=local)
        self.root = self.url or str(self.path.resolve())
        # where the actors and ranks read and write: paths or URLs
        self.buffer, self.samples = self.shared("buffer"), self.shared("samples")
        self.trainer, self.ranks = self.shared("trainer"), self.shared("ranks")
        self.synthesis_states, self.faults = self.shared("checkpoints/synthesis"), self.shared("faults")

    def shared(self, rel: str) -> str:
        return join(self.root, rel)

    def outputs(self) -> list[str | Path]:
        return [self.tensorboard, *(self.shared(rel) for rel in SHARED)]

    def clear_outputs(self) -> None:
        for stale in self.outputs():
            remove_tree(stale)

    def create(self, inputs: dict) -> None:
        if self.url is not None and not self.cfg.resume:  # a start that never checkpointed: nothing of it stays
            remove_tree(self.url)
        super().create(inputs)
        self.publish("config.yaml", "inputs.json")

    def publish(self, *rels: str) -> None:
        """Upload the driver's files (or folders) `rels` from the staging folder, each whole (object store only)."""
        if self.url is None:
            return
        for rel in rels:
            if (self.path / rel).exists():
                upload(self.path / rel, join(self.url, rel))

    def fetch_last_sample_grid(self) -> None:
        """The last round's sample grid (an actor wrote it to the store) into the staging folder, for the report."""
        if self.url is not None and (grids := listing(join(self.url, "samples"), "*.png")):
            fs, path = filesystem(grids[-1])
            (self.path / "samples").mkdir(parents=True, exist_ok=True)
            fs.get_file(path, str(self.path / "samples" / Path(path).name))


def staging_folder(configured: str, url: str) -> Path:
    """The local copy of an object store run folder: under `cluster.staging_dir`, else the system's temp folder."""
    root = Path(configured) if configured else Path(tempfile.gettempdir()) / "nayer-staging"
    parent = posixpath.dirname(url)  # readable, and made unique by a hash (s3://a/b_c and s3://a_b/c clean alike)
    readable = re.sub(r"[^\w.-]+", "_", parent)[-80:]
    return root / f"{readable}-{hashlib.sha256(parent.encode()).hexdigest()[:10]}" / posixpath.basename(url)
