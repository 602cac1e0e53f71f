"""Benchmark: buffer shard write and read throughput on a POSIX folder and on S3 (a local S3 server).

    python -m bench.storage                                   # results/storage.{md,json}
    python -m bench.storage --before /tmp/before              # + both stores with another checkout's code, interleaved
    python -m bench.storage --report-only                     # the table from the saved rows

Write: 20,000 3x32x32 images as 4 shards of 5000 (`write_shards`: a tar of uint8 .npy samples hashed as it is
written, then made whole: a rename on POSIX, one upload on S3) and their commit to the manifest. Read: the
streaming reader (`shard_batches`: each shard read whole through the storage, its size and sha256 checked,
decoded, shuffled, batches of 256), the path of a rank whose share does not fit in memory; a resident share reads
each shard once the same way. Each measurement is its own process, run with its checkout's own copy of this script
(`--before`: an earlier checkout measures with its own code); the repeats alternate the stores and the checkouts,
and the table gives medians.

S3 here is moto's server on 127.0.0.1 (pure Python, started by this script): its rates measure this code's path
through s3fs and HTTP on this machine, not a real object store's bandwidth. Run on an idle machine.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"


def buffer_rates(root: str, n: int = 20000, shard_samples: int = 5000) -> dict:
    """Write n images as shards under `root` (a folder or a URL), commit them, read them back once."""
    import torch

    from orchestrator.shards import Manifest, shard_batches, write_shards

    images = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    labels = torch.randint(0, 10, (n,), generator=torch.Generator().manual_seed(1))
    start = time.perf_counter()
    manifest = Manifest(root)
    for w, part in enumerate(range(0, n, shard_samples)):
        manifest.commit(write_shards(manifest.store, 0, w, images[part:part + shard_samples],
                                     labels[part:part + shard_samples], shard_samples))
    write_s = time.perf_counter() - start
    size = sum(s.bytes for s in manifest.shards)
    start = time.perf_counter()
    read = sum(len(y) for _, y in shard_batches(manifest.store, manifest.snapshot(), 256, n // 256, seed=0))
    read_s = time.perf_counter() - start
    return {"images": n, "bytes": size, "write_images_per_s": n / write_s, "write_mb_per_s": size / write_s / 1e6,
            "read_images": read, "read_images_per_s": read / read_s, "read_mb_per_s": read * size / n / read_s / 1e6}


def s3_server() -> tuple[subprocess.Popen, str]:
    """The tests' S3 server (moto, on a free loopback port), the environment pointed at it; (process, URL)."""
    from tests.helpers import free_port, start_s3_server

    port = free_port()
    os.environ.update(AWS_ENDPOINT_URL=f"http://127.0.0.1:{port}", AWS_ACCESS_KEY_ID="bench",
                      AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1")
    return start_s3_server(port, "nayer-bench"), "s3://nayer-bench"


def median_row(rows: list[dict]) -> dict:
    keys = ("write_images_per_s", "write_mb_per_s", "read_images_per_s", "read_mb_per_s")
    return {**rows[0], **{k: statistics.median(r[k] for r in rows) for k in keys}, "repeats": len(rows)}


def report(rows: dict[str, dict]) -> str:
    lines = ["# Buffer shard throughput: POSIX folder vs S3", "",
             "20,000 images of 3x32x32 in 4 shards of 5000 (`python -m bench.storage`; medians of the repeats). "
             "S3 is moto's server on 127.0.0.1: this code's path through s3fs and HTTP, not a real store's "
             "bandwidth.", "",
             "| store (code) | repeats | write images/s | write MB/s | read images/s | read MB/s |",
             "|---|---|---|---|---|---|"]
    for label, r in rows.items():
        lines.append(f"| {label} | {r['repeats']} | {r['write_images_per_s']:.0f} | {r['write_mb_per_s']:.1f} | "
                     f"{r['read_images_per_s']:.0f} | {r['read_mb_per_s']:.1f} |")
    return "\n".join(lines) + "\n"


def measure(tree: str, root: str) -> dict:
    """One measurement in a fresh process: `tree`'s own copy of this script with `tree`'s code (first on the path),
    in this process's environment."""
    env = {**os.environ, "PYTHONPATH": tree}
    out = subprocess.run([sys.executable, "-m", "bench.storage", "--measure", root, "--tree", tree], cwd=tree, env=env,
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--before", default="", help="another checkout whose POSIX rates are measured alongside")
    ap.add_argument("--report-only", action="store_true")
    ap.add_argument("--measure", default="", help=argparse.SUPPRESS)  # one measurement (a child process)
    ap.add_argument("--tree", default=str(ROOT), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.measure:
        print(json.dumps(buffer_rates(args.measure)))
        return
    saved = RESULTS / "storage.json"
    rows = json.loads(saved.read_text()) if saved.is_file() and args.report_only else {}
    if not args.report_only:
        server, bucket = s3_server()
        runs = {"POSIX": (str(ROOT), None), "S3": (str(ROOT), bucket)}
        if args.before:
            commit = subprocess.run(["git", "-C", args.before, "rev-parse", "--short", "HEAD"], capture_output=True,
                                    text=True).stdout.strip()
            runs[f"POSIX, before ({commit})"] = (args.before, None)
            runs[f"S3, before ({commit})"] = (args.before, bucket)
        measured: dict[str, list[dict]] = {label: [] for label in runs}
        try:
            for repeat in range(args.repeats):
                # every other repeat in the reverse order, each into a prefix of its own: no store or checkout
                # always goes first, or writes over another's objects
                order = list(runs.items()) if repeat % 2 == 0 else list(reversed(runs.items()))
                for n, (label, (tree, store)) in enumerate(order):
                    with tempfile.TemporaryDirectory() as folder:
                        root = f"{store}/repeat-{repeat}-{n}/buffer" if store else folder
                        measured[label].append(measure(tree, root))
                print({k: {m: round(v[-1][m]) for m in ("write_images_per_s", "read_images_per_s")}
                       for k, v in measured.items()}, flush=True)
        finally:
            server.terminate()
        rows = {label: median_row(r) for label, r in measured.items()}
        RESULTS.mkdir(parents=True, exist_ok=True)
        saved.write_text(json.dumps(rows, indent=1) + "\n")
    text = report(rows)
    (RESULTS / "storage.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
