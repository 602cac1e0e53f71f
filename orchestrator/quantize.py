"""Data-free quantization with the images of a pipeline run: `nayer.quantize` fed the WebDataset buffer.

    python -m orchestrator.quantize config=configs/quantize/cifar10_w4a8.yaml buffer=runs/<pipeline run>/buffer
    python -m orchestrator.quantize config=configs/quantize/cifar10_w6a6.yaml buffer=runs/<pipeline run>
    python -m orchestrator.quantize --help                                            # every key, its default

The same keys, phases and output as `python -m nayer.quantize`; only the reader differs: it takes the committed
shards of `buffer/manifest.json` in commit order, each checked against its manifest size and sha256 before a
sample of it is used (a corrupt shard stops the run naming it). No Ray is started.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from nayer.buffer import InMemoryBuffer
from nayer.cli import cli
from nayer.quantize.config import QuantizeConfig
from nayer.quantize.runner import run
from orchestrator.shards import MANIFEST, Manifest, read_shard


def read_manifest(folder: Path) -> InMemoryBuffer:
    """The committed shards of a pipeline buffer (`folder`, or `folder/buffer` for a run folder), verified."""
    if not (folder / MANIFEST).is_file() and (folder / "buffer" / MANIFEST).is_file():
        folder = folder / "buffer"
    if not (folder / MANIFEST).is_file():
        raise ValueError(f"buffer folder '{folder}' has no {MANIFEST}: it is not the buffer of orchestrator.run "
                         "(nayer.run's chunk-*.pt buffers go to python -m nayer.quantize)")
    buffer = InMemoryBuffer()
    manifest = Manifest.load(folder)
    for entry in manifest.snapshot():
        buffer.append(*read_shard(manifest.store, entry))
    return buffer


def main(argv: Sequence[str] | None = None) -> None:
    from nayer import quantize  # the package docstring: what is quantized, and how

    cli(lambda cfg: run(cfg, read_manifest), argv, doc=f"{__doc__}\n{quantize.__doc__}", schema=QuantizeConfig)


if __name__ == "__main__":
    main()
