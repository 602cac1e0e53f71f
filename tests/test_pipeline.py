"""The distributed pipeline on a local Ray (loopback): real Ray actors, Ray Train, DeepSpeed and WebDataset."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from nayer.cli_config import ConfigError, parse_config
from nayer.models import build_model
from orchestrator.config import PipelineConfig
from orchestrator.run import run
from orchestrator.shards import Manifest, write_shards
from helpers import pipeline_args as tiny_args, records


def test_pipeline_stops_on_sigterm_and_resume_finishes_the_run(tmp_path, local_ray):
    """End to end, and what slurm/ray_cluster_requeue.sbatch relies on: a driver attached to a running cluster (as on
    a SLURM allocation) gets SIGTERM, finishes and checkpoints the round in progress and exits 0; the round after
    it had left shards and a temporary file that were never committed; the same command with resume=true (and
    nothing else) completes the run, every committed shard kept once and the killed round's files dropped."""
    folder = tmp_path / "runs" / "tiny"
    env = {**os.environ, "RAY_ADDRESS": local_ray}
    args = tiny_args(tmp_path, epochs=4)
    driver = subprocess.Popen([sys.executable, "-m", "orchestrator.run", *args], cwd=Path(__file__).parents[1], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 240
    while not (folder / "metrics.jsonl").is_file() or len(records(folder)) < 2:  # a KD round has finished
        assert driver.poll() is None and time.monotonic() < deadline, driver.communicate()[0][-3000:]
        time.sleep(0.5)
    driver.send_signal(signal.SIGTERM)
    driver.send_signal(signal.SIGTERM)  # SLURM signals every process of the job, the script forwards one more
    output = driver.communicate(timeout=180)[0]
    assert driver.returncode == 0, output[-3000:]
    summary = json.loads((folder / "summary.json").read_text())
    stopped = summary["rounds_run"]
    assert summary["stopped_by"] == "SIGTERM" and 2 <= stopped < 5 and summary["buffer_images"] == 40 * stopped
    assert "continue with resume=true" in output
    # The console is quiet (cluster.verbose=false): the inputs and teacher lines, a line per round, the stop line,
    # the summary and the verdict. Ray's, Ray Train's and DeepSpeed's INFO lines and per-rank reports stay out.
    lines = output.splitlines()
    assert len(lines) <= stopped + 8 and output.count("\r") == 0, output
    assert lines[-1].startswith("verdict: ")
    assert not any(noise in output for noise in ("Reporting training result", "built successfully", "INFO"))
    # Round 0: 2 workers x 1 iteration x 20 images, each worker's 20 split into shards of <= 8 samples.
    before = Manifest.load(folder / "buffer").shards
    assert sorted(s.path for s in before if s.round == 0) == [
        f"round-00000/worker-00{w}-00000{p}.tar" for w in (0, 1) for p in range(3)]
    # The next round, killed: shards and a temporary file on disk, never committed.
    x = torch.zeros(5, 3, 32, 32, dtype=torch.uint8)
    write_shards(folder / "buffer", stopped, 0, x, torch.zeros(5, dtype=torch.int64), 8)
    (folder / "buffer" / f"round-{stopped:05d}" / "worker-001-000000.tar.99.tmp").write_bytes(b"partial")

    with pytest.raises(ConfigError, match="already holds a run"):
        run(parse_config(PipelineConfig, args))
    with pytest.raises(ConfigError, match="config differs"):
        run(parse_config(PipelineConfig, tiny_args(tmp_path, epochs=4, **{"synthesis.g_steps": 3}) + ["resume=true"]))
    done = run(parse_config(PipelineConfig, args + ["resume=true"]))
    assert done["rounds_run"] == 5 and done["stopped_by"] is None and done["buffer_images"] == 200

    shards = Manifest.load(folder / "buffer").shards
    paths = [s.path for s in shards]
    assert len(paths) == len(set(paths)) == 30 and shards[:len(before)] == before  # nothing duplicated or lost
    assert {s.round for s in shards} == set(range(5)) and sum(s.samples for s in shards) == 200
    assert sorted(p.relative_to(folder / "buffer").as_posix() for p in (folder / "buffer").rglob("*.tar")) == sorted(paths)
    assert not list((folder / "buffer").rglob("*.tmp"))
    log = records(folder)
    assert [r["epoch"] for r in log] == list(range(5)) and [r["phase"] for r in log] == ["warmup"] + ["kd"] * 4
    for r in log[1:]:
        assert r["kd_steps_per_rank"] == [3, 3] and 0 <= r["top1"] <= 100 and len(r["per_class"]) == 10
    assert log[stopped]["lr"] < log[stopped - 1]["lr"]  # the cosine continued across the restart
    # Each driver start has its own Ray Train experiment (student-<first round>); the first start's stays only
    # because it holds the checkpoint the second start resumed from.
    assert sorted(p.name for p in (folder / "trainer").iterdir()) == ["student-00000", f"student-{stopped:05d}"]
    assert (folder / "trainer" / f"student-{stopped:05d}" / "round-00004" / "student" / "mp_rank_00_model_states.pt").is_file()
    assert (folder / "samples" / "round-00004.png").is_file()
    student = build_model("resnet20", 10)
    student.load_state_dict(torch.load(folder / "student.pt", weights_only=True))




def test_pipeline_with_external_models_a_baseline_the_bf16_zero2_engine_and_uneven_workers(tmp_path, local_ray,
                                                                                          capsys):
    """One run, four things that do not interfere: actors and ranks rebuild a timm teacher and a torchvision student
    from their names (the run folder records where the teacher came from); the FM baseline logs the paper's
    synthesis metrics, averaged over both workers' iterations; the ranks run DeepSpeed's ZeRO-2 with its bf16 engine
    (bf16 weights, fp32 BatchNorm statistics, optimizer state partitioned over the two ranks); and 3 iterations a
    round are split 2 + 1 over the 2 actors."""
    teacher = build_model("timm:resnet18", 10)
    torch.save(teacher.state_dict(), tmp_path / "teacher.pt")
    args = tiny_args(tmp_path, method="fm", epochs=1, **{
        "fm.nz": 16, "synthesis.g_loops": 3, "synthesis.warmup_loops": 3,
        "teacher.arch": "timm:resnet18", "teacher.checkpoint": str(tmp_path / "teacher.pt"),
        "student.arch": "torchvision:mobilenet_v3_small", "cluster.deepspeed": "configs/deepspeed/zero2_bf16.json"})
    summary = run(parse_config(PipelineConfig, args))
    folder = tmp_path / "runs" / "tiny"
    assert summary["rounds_run"] == 2 and summary["buffer_images"] == 120  # 2 rounds x 3 iterations x 20 images
    log = records(folder)
    assert [r["syn_iterations"] for r in log] == [3, 3] and log[1]["kd_steps_per_rank"] == [3, 3]
    assert log[0]["syn_diversity"] is None and log[1]["syn_diversity"] > log[1]["syn_diversity_min"] > 0
    for r in log:
        assert 1 <= r["syn_ce_steps"] <= 2 and len(r["syn_ce_curve"]) == 2 and r["syn_is"] >= 1
    inputs = json.loads((folder / "inputs.json").read_text())
    assert inputs["teacher"] == "timm:resnet18" and inputs["bn_layers_hooked"] == 20
    assert "teacher timm:resnet18 with checkpoint" in capsys.readouterr().out
    weights = torch.load(folder / "student.pt", weights_only=True)
    student = build_model("torchvision:mobilenet_v3_small", 10)
    student.load_state_dict(weights)
    assert weights["classifier.3.weight"].dtype == torch.bfloat16  # the bf16 engine's weights
    assert weights["features.0.1.running_var"].dtype == torch.float32  # its BatchNorm statistics stay fp32
    saved = next((folder / "trainer").glob("student-*/round-00001/student"))
    # ZeRO-2 under the bf16 engine: one optimizer partition a rank, named for the engine
    assert len(list(saved.glob("bf16_zero_pp_rank_*_mp_rank_00_optim_states.pt"))) == 2
