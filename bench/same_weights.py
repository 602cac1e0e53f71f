"""Are two state_dict files the same weights, bit for bit? (A refactor must not change what a seed computes.)

    python -m bench.same_weights runs/before/student.pt runs/after/student.pt
    python -m bench.same_weights a.pt b.pt --out bench/results/same-weights.md

Prints, per file, the sha256 of every tensor's bytes in key order; exits 1 if the keys, dtypes, shapes or any
byte differ, naming the first tensor that does.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
from pathlib import Path

import torch


def digest(state: dict) -> str:
    h = hashlib.sha256()
    for key in sorted(state):
        t = state[key].detach().cpu().contiguous().reshape(-1)
        h.update(f"{key}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def first_difference(a: dict, b: dict) -> str | None:
    if a.keys() != b.keys():
        return f"keys differ: {sorted(set(a) ^ set(b))[:5]}"
    for key in sorted(a):
        if a[key].dtype != b[key].dtype or a[key].shape != b[key].shape or not torch.equal(a[key], b[key]):
            return f"tensor {key} differs"
    return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("a")
    ap.add_argument("b")
    ap.add_argument("--out", default="", help="also write the lines as Markdown here")
    args = ap.parse_args()
    a, b = (torch.load(p, map_location="cpu", weights_only=True) for p in (args.a, args.b))
    diff = first_difference(a, b)
    lines = [f"- `{args.a}`: {len(a)} tensors, sha256 {digest(a)}", f"- `{args.b}`: {len(b)} tensors, sha256 {digest(b)}",
             f"- bit-identical: **{'yes' if diff is None else 'no'}**" + ("" if diff is None else f" ({diff})")]
    print("\n".join(lines))
    if args.out:
        Path(args.out).write_text("\n".join(lines) + "\n")
    sys.exit(0 if diff is None else 1)


if __name__ == "__main__":
    main()
