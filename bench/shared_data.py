"""The real material the benchmarks run on, from ../shared/data (not shipped with the project)."""

from __future__ import annotations

import sys
from pathlib import Path

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
TEACHER = SHARED / "cifar10_resnet56.pt"  # the pretrained CIFAR-10 ResNet-56 (94.37%)
TEST_SET = SHARED / "cifar10_test.npz"


def require(*paths: Path) -> None:
    """Exit with a one-line error naming the first missing benchmark input."""
    for path in paths:
        if not path.is_file():
            sys.exit(f"error: benchmark input {path} is missing (it lives in ../shared/data)")
