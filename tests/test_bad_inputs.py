"""Bad input through the command lines users type: every case exits with one line, `error: <what is wrong and
what is allowed>`, never a traceback. Most fail before Ray starts; the last ones need a run folder or a round."""

import json
import re
import shutil
import socket
import sys

import numpy as np
import pytest
import torch

from nayer import run as nayer_run
from nayer.cli_config import parse_config
from nayer.models import build_model
from orchestrator import run as pipeline_run
from orchestrator import tune
from orchestrator.config import PipelineConfig
from helpers import pipeline_args as tiny_args


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Inputs a user might hand over by mistake."""
    d = tmp_path_factory.mktemp("inputs")
    torch.save(build_model("resnet20", 10).state_dict(), d / "resnet20.pt")
    torch.save({k.replace("fc.", "linear."): v for k, v in build_model("resnet20", 10).state_dict().items()},
               d / "linear_head.pt")
    torch.save({"model": build_model("resnet20", 10)}, d / "pickled.pt")  # a whole module, not a state_dict
    (d / "broken.yaml").write_text("epochs: [1, 2\n")
    np.savez(d / "eval12.npz", x=np.zeros((4, 32, 32, 3), np.uint8), y=np.array([0, 1, 2, 12]),
             classes=np.array([str(i) for i in range(13)]))
    (d / "zero3.json").write_text(json.dumps({"zero_optimization": {"stage": 3}}))
    (d / "batch.json").write_text(json.dumps({"train_batch_size": 64, "train_micro_batch_size_per_gpu": 16,
                                              "gradient_accumulation_steps": 1}))
    (d / "sweep.yaml").write_text("space: {synthesis.g_steps: {grid: [1]}}\nschedular: {type: asha}\n")
    (d / "ok_sweep.yaml").write_text("space: {synthesis.g_steps: {grid: [1]}}\n")
    return d


def error_line(main, argv, capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    message = str(exit_info.value)
    assert message.startswith("error: ") and "\n" not in message, message
    assert "Traceback" not in capsys.readouterr().err
    return message


@pytest.fixture
def dead_port():
    """A port bound but not listening, held for the test: a connection is refused, and no process started meanwhile
    (a Ray worker of an earlier test) can take the port and answer."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        yield s.getsockname()[1]


# (case, extra arguments on top of a tiny pipeline run, expected text); {d} = the inputs folder.
BEFORE_RAY = [
    ("unknown key", ["synthesis.g_step=5"], "unknown config key 'synthesis.g_step'.*did you mean 'synthesis.g_steps'"),
    ("wrong type", ["kd.lr=fast"], "bad value for config key 'kd.lr'"),
    ("not key=value", ["epochs"], "argument 'epochs' is not key=value"),
    ("missing config file", ["config=/nope/run.yaml"], "config file not found: '/nope/run.yaml'"),
    ("broken YAML", ["config={d}/broken.yaml"], "config file '.*broken.yaml' is not valid YAML"),
    ("missing teacher", ["teacher.checkpoint=/nope/teacher.pt"], "checkpoint file not found: /nope/teacher.pt"),
    ("other architecture", ["teacher.checkpoint={d}/resnet20.pt", "teacher.arch=resnet32"],
     "does not match architecture 'resnet32': 60 missing keys"),
    ("renamed head", ["teacher.checkpoint={d}/linear_head.pt", "teacher.arch=resnet20"],
     r"renamed: 'teacher.rename=\[linear.->fc.\]'"),
    ("teacher without BatchNorm", ["teacher.arch=timm:vit_tiny_patch16_224", "data.image_size=224"],
     r"no BatchNorm2d layer \(it normalizes with LayerNorm\).*set synthesis.a_bn=0"),
    ("unknown timm model", ["teacher.arch=timm:resnet_huge"], "teacher.arch='timm:resnet_huge': timm has no model"),
    ("class count", ["teacher.checkpoint={d}/resnet20.pt", "data.class_names=[cat,dog,car]"],
     r"fc.weight: checkpoint \[10, 64\] vs model \[3, 64\].*the run has 3 class names"),
    ("empty class list", ["data.class_names=[]"], "data.class_names is an empty list"),
    ("pickled checkpoint", ["teacher.checkpoint={d}/pickled.pt"], "holds pickled Python objects.*weights_only=True"),
    ("unknown model", ["student.arch=vit_huge"], "student.arch='vit_huge': unknown model 'vit_huge'; known: alexnet"),
    ("unknown encoder", ["lte.encoder=glove"], "lte.encoder='glove' is not allowed; choose one of: clip, sbert, onehot, file"),
    ("unknown method", ["method=magic"], "method='magic' is not allowed; choose one of: nayer, fm, deepinv"),
    ("unknown BN loss", ["synthesis.bn_loss=l1"],
     "synthesis.bn_loss='l1' is not allowed; choose one of: paper, relative, normalized, kl"),
    ("unknown targets mode", ["synthesis.targets=random"],
     "synthesis.targets='random' is not allowed; choose one of: balanced, slices"),
    ("slices for a baseline", ["synthesis.targets=slices", "method=fm"],
     "synthesis.targets=slices is NAYER's label schedule; method=fm draws uniform random targets"),
    ("unknown KD crop", ["kd.crop=center"], "kd.crop='center' is not allowed; choose one of: pad, resized"),
    ("unknown prompt names", ["lte.names=gloss"], "lte.names='gloss' is not allowed; choose one of: auto"),
    ("crop share out of range", ["data.eval_crop_pct=1.2"], r"data.eval_crop_pct must be in \(0, 1\]"),
    ("negative loader processes", ["data.eval_workers=-1"], "data.eval_workers must be >= 0, got -1"),
    ("unknown generator body", ["generator.body=imagenet"],
     "generator.body='imagenet' is not allowed; choose one of: auto, cifar, imagenet_reference, imagenet_paper"),
    ("wordnet names on CIFAR", ["lte.names=wordnet"], "lte.names=wordnet names the 1000 ImageNet-1k classes, but "
     "the run has 10"),
    ("unknown dataset", ["data.dataset=mnist2"], "unknown dataset preset 'mnist2'; known: cifar10"),
    ("missing eval set", ["data.eval=/nope/test.npz"], "data not found: '/nope/test.npz'; accepted:"),
    ("eval labels beyond the teacher", ["data.eval={d}/eval12.npz"], "has label 12 but the teacher has 10 classes"),
    ("missing LTE file", ["lte.encoder=file", "lte.path=/nope/lte.pt"], "LTE file not found: /nope/lte.pt"),
    ("batch not divisible", ["kd.batch_size=15"], "kd.batch_size=15 must be divisible by cluster.trainer_workers=2"),
    ("DeepSpeed batch sizes", ["cluster.deepspeed={d}/batch.json"],
     r"train_batch_size=64 != train_micro_batch_size_per_gpu=16 x gradient_accumulation_steps=1 x 2 ranks"),
    ("DeepSpeed ZeRO-3", ["cluster.deepspeed={d}/zero3.json"], "zero_optimization.stage=3 is not supported"),
    ("missing DeepSpeed file", ["cluster.deepspeed=/nope/ds.json"], "cluster.deepspeed='/nope/ds.json': no such file"),
    ("CUDA without GPU actors", ["device=cuda"], "device=cuda but cluster.synth_gpus=0"),
    ("GPUs the cluster lacks", ["device=cuda", "cluster.synth_gpus=1"],
     r"2 synthesis actors x cluster.synth_gpus=1 \+ 2 ranks x cluster.trainer_gpus=0 = 2 GPUs, but the Ray cluster has 0"),
    ("bad device", ["device=tpu"], "device='tpu' is not allowed; choose auto, cpu, cuda or cuda:<index>"),
    ("negative budget", ["time_budget_s=-5"], "time_budget_s must be >= 0"),
    ("corrupt-shard policy", ["cluster.on_corrupt_shard=ignore"], "cluster.on_corrupt_shard='ignore' is not allowed"),
    ("non-finite policy", ["on_nonfinite=retry"], "on_nonfinite='retry' is not allowed; choose one of: stop, skip"),
    ("compile on the pipeline", ["compile=true"], "compile=true is single-process only"),
    ("resume without a run", ["resume=true"], "resume=true but .*checkpoints/driver.pt does not exist"),
    ("nothing at the address", ["cluster.address=127.0.0.1:{port}"], "cluster.address=127.0.0.1:[0-9]+: no Ray head"),
]


@pytest.mark.parametrize("case, extra, expected", BEFORE_RAY, ids=[c[0] for c in BEFORE_RAY])
def test_pipeline_command_line_errors_are_one_line(tmp_path, files, capsys, dead_port, case, extra, expected):
    argv = tiny_args(tmp_path) + [a.format(d=files, port=dead_port) for a in extra]
    assert re.search(expected, error_line(pipeline_run.main, argv, capsys))


def test_fault_spec_and_single_process_errors_are_one_line(tmp_path, files, capsys, monkeypatch):
    monkeypatch.setenv("NAYER_FAULTS", "kill_head:round=1")
    assert "NAYER_FAULTS: unknown fault 'kill_head'" in error_line(pipeline_run.main, tiny_args(tmp_path), capsys)
    monkeypatch.delenv("NAYER_FAULTS")
    single = [a for a in tiny_args(tmp_path) if not a.startswith("cluster.")]
    assert "unknown config key 'cluster'" in error_line(nayer_run.main, single + ["cluster.synth_workers=2"], capsys)
    assert "holds pickled Python objects" in error_line(nayer_run.main, single + [f"teacher.checkpoint={files}/pickled.pt"],
                                                         capsys)
    assert "device 'cuda' requested but CUDA is not available" in error_line(nayer_run.main, single + ["device=cuda"],
                                                                             capsys)
    assert "a run folder on an object store is the pipeline's" in error_line(
        nayer_run.main, single + ["out_dir=s3://bucket/runs"], capsys)


def test_sweep_errors_are_one_line(tmp_path, files, capsys):
    assert "unknown config key 'schedular'" in error_line(tune.main, [f"sweep={files}/sweep.yaml", *tiny_args(tmp_path)],
                                                          capsys)
    assert "no sweep file" in error_line(tune.main, tiny_args(tmp_path), capsys)
    assert "a sweep's folder (Tune's experiment state, the results table) is a POSIX path" in error_line(
        tune.main, [f"sweep={files}/ok_sweep.yaml", *tiny_args(tmp_path), "out_dir=s3://bucket/sweeps"], capsys)


def test_errors_that_need_a_run_folder_or_a_round(tmp_path, capsys, local_ray):
    # An existing run: a second start, a resume with another config, a resume whose buffer lost a shard.
    first = pipeline_run.run(parse_config(PipelineConfig, tiny_args(tmp_path) + ["time_budget_s=0.001"]))
    assert first["rounds_run"] == 1
    assert "already holds a run; pass resume=true" in error_line(pipeline_run.main, tiny_args(tmp_path), capsys)
    changed = error_line(pipeline_run.main, tiny_args(tmp_path, **{"kd.lr": 0.5}) + ["resume=true"], capsys)
    assert "config differs from the one in" in changed and "kd.lr: 0.2 -> 0.5" in changed
    manifest = tmp_path / "runs" / "tiny" / "buffer" / "manifest.json"
    manifest.rename(manifest.with_suffix(".moved"))
    assert "manifest.json is missing, but the driver checkpoint lists round 0 as committed" in error_line(
        pipeline_run.main, tiny_args(tmp_path) + ["resume=true"], capsys)
    manifest.with_suffix(".moved").rename(manifest)
    shard = next((tmp_path / "runs" / "tiny" / "buffer" / "round-00000").glob("*.tar"))
    shard.unlink()
    assert f"buffer shard {shard}: listed in the manifest but missing" in error_line(
        pipeline_run.main, tiny_args(tmp_path) + ["resume=true"], capsys)
    # Nothing synthesized before the first KD round.
    empty = tiny_args(tmp_path, name="empty", warmup=0, **{"synthesis.g_loops": 0})
    assert "the memory buffer is empty at KD round 0" in error_line(pipeline_run.main, empty, capsys)
    shutil.rmtree(tmp_path / "runs")
    assert sys.modules["ray"].is_initialized()  # every case above ran against the test's local Ray
