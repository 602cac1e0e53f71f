"""The quantization run: synthetic images -> float top-1 -> PTQ -> recovery by KD, each evaluated on real data.

    python -m nayer.quantize config=configs/quantize/cifar10_w4a8.yaml buffer=runs/<run>/buffer
    python -m nayer.quantize config=configs/quantize/cifar10_w6a6.yaml buffer=runs/<run>/buffer qat.kd_steps=200
    python -m nayer.quantize config=configs/quantize/cifar10_w4a8.yaml buffer=... w_bits=2 a_bits=4 out=q.json
    python -m orchestrator.quantize config=... buffer=runs/<pipeline run>/buffer      # WebDataset shards
    python -m nayer.quantize --help                                                   # every key, its default

Prints one JSON line (float / PTQ / recovered top-1 on the real test set `eval`, the bit widths, the number of
synthetic images, seconds per phase and the KD loss curve); `out=<file.json>` also writes it. The run itself is
`nayer.quantize.runner.run`; this command reads the single-process runner's `chunk-*.pt` buffers.
"""

from __future__ import annotations

from typing import Sequence

from nayer.cli import cli
from nayer.quantize.config import QuantizeConfig
from nayer.quantize.runner import run


def main(argv: Sequence[str] | None = None) -> None:
    """`python -m nayer.quantize`."""
    from nayer import quantize  # the package docstring: what is quantized, and how

    cli(run, argv, doc=f"{__doc__}\n{quantize.__doc__}", schema=QuantizeConfig)


if __name__ == "__main__":
    main()
