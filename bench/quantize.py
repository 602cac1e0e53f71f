"""Benchmark: data-free quantization of the real CIFAR-10 ResNet-56 (NAYER Table 3) at W4A8 and W6A6.

    HF_HUB_OFFLINE=1 .venv/bin/python -m bench.quantize --buffer runs/<run>/buffer        # full: the configs' budget
    HF_HUB_OFFLINE=1 .venv/bin/python -m bench.quantize --buffer /tmp/qruns/qsmoke/buffer --steps 20 \\
        --eval-limit 1000 --out /tmp/qbench                                                  # smoke run
    .venv/bin/python -m bench.quantize --buffer ... --bits W4A8 qat.lr=0.001 calib.batches=16   # key=value overrides

For each bit width: float top-1, plain PTQ top-1 (calibrated on the synthetic buffer) and recovered top-1 (PTQ, then
data-free QAT by KD from the float model on the same synthetic images), all on ../shared/data/cifar10_test.npz.
Configs: configs/quantize/cifar10_w4a8.yaml and cifar10_w6a6.yaml (--steps / --batch override qat.kd_steps /
qat.batch_size). Writes <out>/quantize.md (table: bits, float, PTQ, recovered, seconds) and <out>/quantize.json
(every run's full summary, KD loss curve included); --out defaults to bench/results. Not a test: run it by hand.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

from bench.shared_data import TEACHER, TEST_SET, require
from nayer.cli_config import ConfigError, parse_config
from nayer.quantize import QuantizeConfig, run
from nayer.cli import USER_ERRORS, one_line

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--buffer", required=True, help="synthetic images: <run>/buffer of nayer.run (chunk-*.pt)")
    ap.add_argument("--bits", default="W4A8,W6A6", help="comma-separated WxAy; each needs configs/quantize/cifar10_wxay.yaml")
    ap.add_argument("--steps", type=int, default=None, help="qat.kd_steps (default: the config's)")
    ap.add_argument("--batch", type=int, default=None, help="qat.batch_size (default: the config's)")
    ap.add_argument("--eval-limit", type=int, default=0, help="evaluate on a fixed random subset (smoke); 0 = all 10k")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    ap.add_argument("overrides", nargs="*", help="extra key=value overrides of nayer.quantize's config")
    args = ap.parse_args()
    teacher, test = TEACHER, TEST_SET
    require(teacher, test)
    bits = [b.strip().upper() for b in args.bits.split(",") if b.strip()]
    results = []
    start = time.perf_counter()
    for tag in bits:
        if not re.fullmatch(r"W\d+A\d+", tag):
            sys.exit(f"error: --bits entry '{tag}' is not of the form W4A8")
        config = ROOT / "configs" / "quantize" / f"cifar10_{tag.lower()}.yaml"
        if not config.is_file():
            sys.exit(f"error: no config {config} for {tag}; write one or pick from W4A8, W6A6")
        argv = [f"config={config}", f"checkpoint={teacher}", f"eval={test}", f"buffer={args.buffer}",
                f"eval_limit={args.eval_limit}"]
        argv += [f"qat.kd_steps={args.steps}"] if args.steps is not None else []
        argv += [f"qat.batch_size={args.batch}"] if args.batch is not None else []
        try:
            summary = run(parse_config(QuantizeConfig, argv + list(args.overrides)))
        except USER_ERRORS as exc:
            sys.exit(f"error: {one_line(exc)}")
        print(json.dumps({k: v for k, v in summary.items() if k != "kd_loss_curve"}), flush=True)
        results.append(summary)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "quantize.json").write_text(json.dumps({"runs": results, "wall_s": time.perf_counter() - start,
                                                   "argv": sys.argv[1:]}, indent=2) + "\n")
    (out / "quantize.md").write_text(report(results, args))
    print(f"wrote {out / 'quantize.md'} and {out / 'quantize.json'}")


def report(results: list[dict], args: argparse.Namespace) -> str:
    r0 = results[0]
    c = r0["config"]
    n_eval = r0["eval_images"]
    rows = ["| bits | float top-1 % | PTQ top-1 % | recovered top-1 % | calibrate s | QAT s | eval s (3x) | total s |",
            "|---|---|---|---|---|---|---|---|"]
    for r in results:
        s = r["seconds"]
        evals = s["float_eval"] + s["ptq_eval"] + s.get("recovered_eval", 0.0)
        rows.append(f"| {r['bits']} | {r['float_top1']:.2f} | {r['ptq_top1']:.2f} | {r['recovered_top1']:.2f} | "
                    f"{s['calibrate']:.1f} | {s['qat']:.1f} | {evals:.1f} | {s['total']:.1f} |")
    curves = [f"- {r['bits']}: " + ", ".join(f"{pt['step']}: {pt['kd_loss']:.3f}" for pt in r["kd_loss_curve"][::max(
        1, len(r["kd_loss_curve"]) // 10)]) for r in results if r["kd_loss_curve"]]
    lines = [
        "# Data-free quantization: CIFAR-10 ResNet-56 (NAYER Table 3)",
        "",
        f"Command: `python -m bench.quantize {' '.join(sys.argv[1:])}`",
        "",
        f"- Real test set: {'all ' if n_eval == 10000 else 'a fixed random subset of '}{n_eval} images of "
        "cifar10_test.npz; synthetic images only for calibration and recovery "
        f"({r0['synthetic_images']} from `{args.buffer}`).",
        f"- PTQ: {r0['calib_images']} calibration images ({c['act_observer']} activation observers, "
        f"{'augmented' if c['calib']['augment'] else 'no augmentation'}), BN folded, "
        f"{'per-channel' if c['per_channel'] else 'per-tensor'} symmetric weights, affine activations, "
        f"first conv / last fc: {c['first_last']}.",
        f"- Recovery: {r0['qat_steps']} SGD steps (lr {c['qat']['lr']}, cosine) of {r0['qat_batch_size']} augmented "
        f"synthetic images, KD from the float model (paper Eq. 7, T = {c['qat']['temperature']:g}); BN statistics "
        f"frozen from step {c['qat']['freeze_bn_step']}, observers from step {c['qat']['freeze_observer_step']} "
        "(-1 = never).",
        "- 4- and 6-bit widths are simulated with FakeQuantize (no int4/int6 CPU kernels).",
        "",
        *rows,
        "",
        "KD loss (step: mean loss of the last logging window):",
        "",
        *curves,
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    try:
        main()
    except ConfigError as exc:
        sys.exit(f"error: {one_line(exc)}")
