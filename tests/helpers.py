"""Helpers shared by the test modules: the smallest models, image specs and run configs that still test a
behaviour, and readers of a run folder. (Fixtures live in conftest.py.)"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch import nn

from nayer.config import GeneratorConfig, NoisyConfig
from nayer.generator import NayerGenerator
from nayer.specs import Compute, ImageSpec

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
CPU = Compute(torch.device("cpu"), channels_last=False)
CPU_CHANNELS_LAST = Compute(torch.device("cpu"), channels_last=True)


def spec(k: int = 10, size: int = 16, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25)) -> ImageSpec:
    """An ImageSpec of `k` classes named c0, c1, ... at `size` px."""
    return ImageSpec(tuple(f"c{i}" for i in range(k)), size, tuple(mean), tuple(std))


def generator(embeddings: torch.Tensor, batch_size: int, size: int, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25),
              noisy_mode: str = "k_to_1", noisy_arch: str = "A3", **fields) -> NayerGenerator:
    """A NayerGenerator for `len(embeddings)` classes at `size` px; `fields` are GeneratorConfig fields."""
    cfg = GeneratorConfig(**fields, noisy=NoisyConfig(mode=noisy_mode, arch=noisy_arch))
    return NayerGenerator(cfg, embeddings=embeddings, batch_size=batch_size,
                          images=spec(len(embeddings), size, mean, std))


def tiny_net(k: int = 10) -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                         nn.Conv2d(4, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, k))


def teacher_with_statistics(k: int = 10) -> nn.Module:
    teacher = tiny_net(k).eval()
    with torch.no_grad():  # non-trivial running statistics, as a trained teacher has
        for m in teacher.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    return teacher


def run_args(tmp_path: Path, **extra) -> list[str]:
    """A tiny single-process run (nayer.run): digits, ResNet-20 both sides, one-hot LTE, 1 warm-up + 2 KD epochs."""
    args = {
        "out_dir": str(tmp_path / "runs"), "name": "tiny", "warmup": 1, "epochs": 2,
        "data.dataset": "digits", "data.eval": "digits:test", "data.eval_limit": 100,
        "teacher.arch": "resnet20", "student.arch": "resnet20", "lte.encoder": "onehot",
        "lte.cache_dir": str(tmp_path / "lte"), "generator.nz": 64, "generator.ngf": 16,
        "synthesis.batch_size": 20, "synthesis.g_steps": 2, "synthesis.g_loops": 1, "synthesis.warmup_loops": 1,
        "kd.batch_size": 16, "kd.kd_steps": 2,
    }
    args.update(extra)
    return [f"{k}={v}" for k, v in args.items()]


def pipeline_args(tmp_path: Path, **extra) -> list[str]:
    """The same on the pipeline (orchestrator.run): 2 iterations a round, so each of the 2 actors makes a batch,
    3 KD steps, shards of 8 samples (several shards a worker, so each of the 2 ranks reads some)."""
    pipeline = {"synthesis.g_loops": 2, "synthesis.warmup_loops": 2, "kd.kd_steps": 3, "cluster.shard_samples": 8}
    return run_args(tmp_path, **{**pipeline, **extra})


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_s3_server(port: int, bucket: str) -> subprocess.Popen:
    """moto's S3 server on 127.0.0.1:`port` (pure Python; the environment's AWS_ENDPOINT_URL must point at it), up
    and answering, with `bucket` made. The caller stops it (terminate)."""
    import fsspec

    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            break
        except OSError:
            if server.poll() is not None or time.monotonic() > deadline:
                server.kill()
                raise RuntimeError(f"the S3 test server on 127.0.0.1:{port} did not start") from None
            time.sleep(0.1)
    fsspec.core.url_to_fs(f"s3://{bucket}")[0].mkdir(bucket)
    return server


def records(folder: Path) -> list[dict]:
    """The rounds of a run folder's metrics.jsonl."""
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
