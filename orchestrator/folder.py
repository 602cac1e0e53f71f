"""The pipeline's run folder `<out_dir>/<name>/`, on a POSIX path or on an object store (`nayer.storage`).

What the actors and the ranks write goes where they can all reach it, the run folder itself (`store`): buffer/
(shards + manifest), samples/, checkpoints/synthesis/ (each actor's state), trainer/ (Ray Train's storage,
DeepSpeed checkpoints), ranks/ (each rank's metrics), faults/ (drill markers).

The driver's own files (config.yaml, inputs.json, metrics.jsonl, tb/, checkpoints/driver.pt, student.pt,
summary.json, report.md, plots/) are written with plain file APIs into the storage's working copy: on POSIX the run
folder itself; on an object store a local staging folder (`cluster.staging_dir`), downloaded from the store at a
start (so the resume checks read the run's own config and checkpoint), and `publish` uploads each whole after it
is written: the driver checkpoint right after it is saved, the metrics after their round's line, the report at the
end. As on POSIX, the driver checkpoint is the round's commit point and the manifest the buffer's.
"""

from __future__ import annotations

import shutil

from nayer.run_folder import RunFolder
from nayer.storage import open_storage
from orchestrator.config import PipelineConfig

OWN = ("config.yaml", "inputs.json", "metrics.jsonl", "tb", "checkpoints/driver.pt")  # pulled at a start
SHARED = ("buffer", "samples", "checkpoints/synthesis", "trainer", "ranks", "faults")
# What a start that never checkpointed leaves, cleared when the run is started again
OUTPUT_FILES = ("metrics.jsonl", "student.pt", "summary.json", "report.md")
OUTPUT_FOLDERS = ("tb", "plots", *SHARED)


class PipelineFolder(RunFolder):
    """The single-process run folder plus the Ray Train storage (trainer/), the checkpoints of the driver and of
    each synthesis actor (checkpoints/), the ranks' logs (ranks/). `store` is the run folder wherever it is; `path`
    the local folder of the driver's own files."""

    CHECKPOINT = "checkpoints/driver.pt"

    def __init__(self, cfg: PipelineConfig):
        self.store = open_storage(cfg.out_dir).sub(cfg.name)
        self.working = self.store.working_copy(cfg.cluster.staging_dir, OWN)
        super().__init__(cfg, path=self.working.path)
        # where the actors and ranks read and write
        self.buffer, self.samples = self.store.sub("buffer"), self.store.sub("samples")
        self.trainer, self.ranks = self.store.sub("trainer"), self.store.sub("ranks")
        self.synthesis_states, self.faults = self.store.sub("checkpoints/synthesis"), self.store.sub("faults")

    def clear_outputs(self) -> None:
        """Both copies: the run folder's, and the working copy's (the same folder on POSIX)."""
        for rel in OUTPUT_FILES:
            self.store.remove(rel)
            (self.path / rel).unlink(missing_ok=True)
        for rel in OUTPUT_FOLDERS:
            self.store.remove_tree(rel)
            shutil.rmtree(self.path / rel, ignore_errors=True)

    def create(self, inputs: dict) -> None:
        super().create(inputs)
        self.publish("config.yaml", "inputs.json")

    def publish(self, *rels: str) -> None:
        """The driver's files (or folders) `rels` made current in the run folder, each whole."""
        self.working.push(*rels)

    def fetch_last_sample_grid(self) -> None:
        """The last round's sample grid (an actor wrote it to the run folder) beside the report's other files."""
        if grids := self.samples.listing("*.png"):
            self.working.pull(f"samples/{grids[-1]}")

    def eval_cache(self) -> str:
        """Where an image folder's decoded evaluation set goes unless data.eval_cache names a folder: the run
        folder's eval-cache/, which the ranks memory-map; "" on an object store, which cannot be mapped (the set then
        reaches the ranks through Ray's object store)."""
        local = self.store.local_path("eval-cache")
        return "" if local is None else str(local)
