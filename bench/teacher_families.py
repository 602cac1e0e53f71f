"""Benchmark: the new model families run end to end, in fp32 eager and in bf16 + channels_last + torch.compile.

    python -m bench.teacher_families            # ~20 min on 2 CPU cores: bench/results/teacher_families.{md,json}

Each row is one `nayer.run` of one synthesis step and one KD step (digits preset at 32 px; the ViT at 224 px),
random weights, the same family as teacher and student: torchvision MobileNetV3-Small, EfficientNet-B0 and
ConvNeXt-Tiny, timm ResNet-18 and ViT-Tiny. Teachers without BatchNorm run with synthesis.a_bn=0. Quoted per row:
whether it ran, its wall time (compile time included: a one-step run measures the cost of compiling, not the speed
after it), the BatchNorm2d layers L_BN hooked and the normalization layers it could not. Run on an idle machine.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from tests.helpers import run_args
from nayer.cli_config import parse_config
from nayer.config import RunConfig
from nayer.run import run

ROOT = Path(__file__).resolve().parents[1]

ONE_STEP = {"warmup": 0, "epochs": 1, "synthesis.g_steps": 1, "synthesis.batch_size": 4, "kd.kd_steps": 1,
            "kd.batch_size": 4, "data.eval_limit": 20}
NO_BN = {"synthesis.a_bn": 0}
FAMILIES = {
    "torchvision:mobilenet_v3_small": {},
    "torchvision:efficientnet_b0": {},
    "torchvision:convnext_tiny": NO_BN,
    "timm:resnet18": {},
    "timm:vit_tiny_patch16_224": {**NO_BN, "data.image_size": 224, "data.eval": ""},
}
COMPUTE = {"fp32 eager": {"bf16": False, "compile": False, "channels_last": True},
           "bf16 + channels_last + compile": {"bf16": True, "compile": True, "channels_last": True}}


def one_run(arch: str, keys: dict) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        try:
            run(parse_config(RunConfig, run_args(Path(tmp), **{**ONE_STEP, **keys, "teacher.arch": arch,
                                                                "student.arch": arch})))
        except Exception as error:  # the row records the failure; the table goes on
            return {"ok": False, "error": f"{type(error).__name__}: {str(error).splitlines()[0][:200]}"}
        inputs = json.loads((Path(tmp) / "runs" / "tiny" / "inputs.json").read_text())
        return {"ok": True, "seconds": round(time.perf_counter() - start, 1), "bn_layers": inputs["bn_layers_hooked"],
                "other_norms": inputs["other_norm_layers"]}


def main() -> None:
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()
    rows = []
    for arch, extra in FAMILIES.items():
        for label, compute in COMPUTE.items():
            row = {"model": arch, "compute": label, **one_run(arch, {**extra, **compute})}
            print(json.dumps(row), flush=True)
            rows.append(row)
    out = ROOT / "bench" / "results"
    (out / "teacher_families.json").write_text(json.dumps(rows, indent=2) + "\n")
    lines = ["# Model families end to end (bench/teacher_families.py)", "",
             "One synthesis step + one KD step of `nayer.run`, the same family as teacher and student, random weights, "
             "2-core CPU. Time includes start-up and (for compile) compilation.", "",
             "| model | compute | ran | wall s | BatchNorm2d hooked | not hooked |", "|---|---|---|---|---|---|"]
    for r in rows:
        ran = "yes" if r["ok"] else f"no: {r['error']}"
        lines.append(f"| `{r['model']}` | {r['compute']} | {ran} | {r.get('seconds', '-')} | {r.get('bn_layers', '-')} | "
                     f"{', '.join(r.get('other_norms') or []) or '-'} |")
    (out / "teacher_families.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
