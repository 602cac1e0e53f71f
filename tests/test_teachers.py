"""Teachers from anywhere: torchvision and timm by name, a user factory, checkpoints as they exist in the wild.

Each source is built with random weights (nothing is downloaded), loaded, and run end to end through
`nayer.run` for one synthesis step and one KD step."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from nayer.cli_config import ConfigError, parse_config
from nayer.config import RunConfig
from nayer.inputs import load_inputs
from nayer.models import build_model, model_metadata
from nayer.run import run

from helpers import run_args

ONE_STEP = {"warmup": 0, "epochs": 1, "synthesis.g_steps": 1, "synthesis.batch_size": 4, "kd.kd_steps": 1,
            "kd.batch_size": 4, "data.eval_limit": 20}


def one_step_run(tmp_path, **keys) -> tuple[dict, dict]:
    """A run of one synthesis step and one KD step; returns its summary and inputs.json."""
    cfg = parse_config(RunConfig, run_args(tmp_path, **{**ONE_STEP, **keys}))
    summary = run(cfg)
    folder = tmp_path / "runs" / "tiny"
    return summary, json.loads((folder / "inputs.json").read_text())


def bn_count(model: nn.Module) -> int:
    return sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())


def test_torchvision_mobilenet_v3_small_teacher_hooks_the_bn_layers_it_has(tmp_path):
    summary, inputs = one_step_run(tmp_path, **{"teacher.arch": "torchvision:mobilenet_v3_small"})
    assert summary["epochs_run"] == 1
    assert inputs["teacher"] == "torchvision:mobilenet_v3_small" and inputs["weights"] == "random weights"
    assert inputs["bn_layers_hooked"] == bn_count(build_model("torchvision:mobilenet_v3_small", 10)) > 0
    assert inputs["class_names"] == "preset digits (10 classes)" and inputs["mean"] == "preset digits"


def test_timm_resnet18_teacher_from_a_local_checkpoint(tmp_path):
    source = build_model("timm:resnet18", 10)
    torch.save(source.state_dict(), tmp_path / "teacher.pt")
    summary, inputs = one_step_run(tmp_path, **{"teacher.arch": "timm:resnet18",
                                                "teacher.checkpoint": str(tmp_path / "teacher.pt")})
    assert summary["epochs_run"] == 1 and inputs["weights"] == f"checkpoint {tmp_path / 'teacher.pt'}"
    assert inputs["bn_layers_hooked"] == bn_count(source) and inputs["other_norm_layers"] == []


def test_timm_vit_tiny_teacher_runs_with_a_bn_0_and_is_refused_with_a_bn(tmp_path):
    vit = {"teacher.arch": "timm:vit_tiny_patch16_224", "data.image_size": 224, "data.eval": ""}
    refused = parse_config(RunConfig, run_args(tmp_path, **{**ONE_STEP, **vit}))  # the paper's a_bn = 10
    with pytest.raises(ConfigError, match=r"no BatchNorm2d layer \(it normalizes with LayerNorm\).*"
                                          r"set synthesis.a_bn=0"):
        load_inputs(refused, torch.device("cpu"))
    too_small = parse_config(RunConfig, run_args(tmp_path, **{**vit, "data.image_size": 32, "synthesis.a_bn": 0}))
    with pytest.raises(ConfigError, match=r"does not run on 32x32 images .*set data.image_size"):
        load_inputs(too_small, torch.device("cpu"))
    summary, inputs = one_step_run(tmp_path, **vit, **{"synthesis.a_bn": 0})
    assert summary["epochs_run"] == 1
    assert inputs["bn_layers_hooked"] == 0 and inputs["other_norm_layers"] == ["LayerNorm"]
    assert inputs["image_size"] == "data.image_size"


def test_user_factory_teacher_and_student(tmp_path):
    summary, inputs = one_step_run(tmp_path, **{"teacher.arch": "user_models:small_convnet",
                                                "student.arch": "user_models:small_convnet"})
    assert summary["epochs_run"] == 1
    assert inputs["bn_layers_hooked"] == 1 and inputs["other_norm_layers"] == ["GroupNorm"]


def test_checkpoint_with_renamed_head_and_no_bn_counters_loads_through_rename(tmp_path):
    """The shape of a widely used public option-A CIFAR ResNet file: head `linear`, no num_batches_tracked."""
    source = build_model("resnet20_a", 10)
    wild = {key.replace("fc.", "linear."): value for key, value in source.state_dict().items()
            if not key.endswith("num_batches_tracked")}
    path = tmp_path / "wild.pt"
    torch.save({"state_dict": wild}, path)
    base = {"teacher.arch": "resnet20_a", "teacher.checkpoint": str(path)}
    with pytest.raises(ConfigError, match=r"2 missing keys \(fc.weight, fc.bias\), 2 unexpected.*"
                                          r"renamed: 'teacher.rename=\[linear.->fc.\]'"):
        load_inputs(parse_config(RunConfig, run_args(tmp_path, **base)), torch.device("cpu"))
    cfg = parse_config(RunConfig, run_args(tmp_path, **base, **{"teacher.rename": "[linear.->fc.]"}))
    teacher = load_inputs(cfg, torch.device("cpu")).teacher
    assert torch.equal(teacher.fc.weight, source.fc.weight)
    assert all(int(m.num_batches_tracked) == 0 for m in teacher.modules() if isinstance(m, nn.BatchNorm2d))


def test_bad_model_names_fail_at_config_time_naming_the_fix(tmp_path):
    cases = [("torchvision:resnet_1", "torchvision has no classification model 'resnet_1'; known: alexnet"),
             ("timm:vit_nope", "timm has no model 'vit_nope'"),
             ("no_such_pkg.models:make", "cannot import the factory's module 'no_such_pkg.models'.*PYTHONPATH"),
             ("user_models:missing", "module 'user_models' has no 'missing'"),
             ("user_models:NOT_A_FACTORY", "'user_models:NOT_A_FACTORY' is not callable \\(its type: int\\)"),
             ("resnet_56", "unknown model 'resnet_56'.*torchvision:<name>, timm:<name>")]
    for arch, message in cases:
        with pytest.raises(ConfigError, match=f"teacher.arch='{arch}': {message}"):
            parse_config(RunConfig, run_args(tmp_path, **{"teacher.arch": arch}))
    with pytest.raises(ConfigError, match="timm models take weights=pretrained"):
        load_inputs(parse_config(RunConfig, run_args(tmp_path, **{"teacher.arch": "timm:resnet18",
                                                                  "teacher.weights": "IMAGENET1K_V1"})), "cpu")


def test_what_pretrained_weights_say_is_taken_unless_the_config_says_otherwise(tmp_path):
    """torchvision's meta and timm's pretrained_cfg ship with the packages: read without a download."""
    tv = model_metadata("torchvision:mobilenet_v3_small", "IMAGENET1K_V1")
    assert (tv.image_size, tv.mean, len(tv.class_names)) == (224, (0.485, 0.456, 0.406), 1000)
    vit = model_metadata("timm:vit_tiny_patch16_224", "pretrained")
    assert vit.mean == (0.5, 0.5, 0.5) and vit.class_names[0] == "tench, Tinca tinca"
    assert model_metadata("timm:vit_tiny_patch16_224", None) is None  # random weights say nothing

    from nayer.inputs import resolve_images
    cfg = parse_config(RunConfig, run_args(tmp_path, **{"teacher.arch": "timm:vit_tiny_patch16_224",
                                                        "teacher.weights": "pretrained", "data.std": "[0.3,0.3,0.3]"}))
    images, sources = resolve_images(cfg)
    assert images.num_classes == 1000 and images.size == 224 and images.mean == (0.5, 0.5, 0.5)
    assert images.std == (0.3, 0.3, 0.3) and sources["std"] == "data.std"
    assert sources["mean"] == sources["image_size"] == "timm pretrained_cfg vit_tiny_patch16_224.augreg_in21k_ft_in1k"


def test_timm_pretrained_offline_is_one_error_naming_the_local_checkpoint():
    """timm's own download (Hugging Face hub) offline; a subprocess, since the hub reads HF_HUB_OFFLINE at import."""
    import os
    import subprocess
    import sys

    code = ("from nayer.models import load_teacher\n"
            "try:\n    load_teacher('timm:resnet18', 1000, weights='pretrained')\n"
            "except RuntimeError as error:\n    print(error)\n")
    out = subprocess.run([sys.executable, "-c", code], env={**os.environ, "HF_HUB_OFFLINE": "1"}, capture_output=True,
                         text=True, timeout=120).stdout
    assert "could not fetch timm pretrained weights for resnet18" in out
    assert "teacher.checkpoint=<local state_dict>" in out
