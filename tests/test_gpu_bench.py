"""bench/gpu.py (`python -m bench.gpu`) on CPU with --smoke: every row of the GPU benchmark and its 3-round ImageNet-shaped pipeline run
(1 actor, 1 DeepSpeed rank, a JPEG val folder) work before the script ever meets a GPU."""

import json
import subprocess
import sys

import pytest

from helpers import ROOT


def run_smoke(tmp_path, *flags):
    out = tmp_path / "gpu-smoke"
    proc = subprocess.run([sys.executable, "-m", "bench.gpu", "--smoke", *flags, "--out", str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(out.with_suffix(".json").read_text()), out.with_suffix(".md").read_text()


@pytest.mark.slow
def test_gpu_bench_smoke_runs_every_row_and_the_pipeline(tmp_path):
    results, text = run_smoke(tmp_path, "--no-compile")
    names = [r["name"] for r in results["rows"]]
    assert names[0].startswith("anchor") and any(n.startswith("synthesis") for n in names)
    assert any(n.startswith("KD") for n in names)
    assert all(r["rate"] > 0 and r["flop_per_step"] > 0 for r in results["rows"])
    pipeline = results["pipeline"]
    assert pipeline["returncode"] == 0 and pipeline["rounds"] == 3 and pipeline["teacher_top1"] is not None
    assert "## Targets" in text and "3-round pipeline run" in text


@pytest.mark.slow
def test_gpu_bench_smoke_with_the_compiled_rows(tmp_path):
    results, text = run_smoke(tmp_path)
    compiled = [r for r in results["rows"] if r["name"].endswith(" compiled")]
    assert len(compiled) == 2 and all(r["rate"] > 0 for r in compiled)
    assert "its eager step" in text
