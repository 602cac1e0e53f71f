"""Model zoo: every architecture runs, heads are found, checkpoints load strictly with clear errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from nayer.models import (
    CheckpointMismatchError,
    build_model,
    classifier_layer,
    load_state_dict_checked,
    load_teacher,
    model_names,
)

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2023, 0.1994, 0.2010)

CIFAR_MODELS = [name for name in model_names() if not name.startswith("tv_")]
# Natural input side per model: CIFAR models at 32x32; tv_resnet50 is kept small to stay fast.
INPUT_SIDE = {**{name: 32 for name in CIFAR_MODELS}, "tv_resnet18": 224, "tv_resnet50": 64}


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def test_registry_covers_the_paper_models() -> None:
    expected = {
        "resnet18", "resnet34",
        "resnet20", "resnet32", "resnet44", "resnet56",
        "resnet20_a", "resnet32_a", "resnet44_a", "resnet56_a",
        "wrn16_1", "wrn16_2", "wrn40_1", "wrn40_2",
        "vgg11_bn", "alexnet", "tv_resnet18", "tv_resnet50",
    }  # fmt: skip
    assert set(model_names()) == expected
    assert model_names() == sorted(model_names())


@pytest.mark.parametrize("name", sorted(INPUT_SIDE))
def test_forward_shape_and_classifier_is_the_head(name: str) -> None:
    """The model returns [2, K], and classifier_layer is the Linear that produced those logits."""
    model = build_model(name, num_classes=7).eval()
    head = classifier_layer(model)
    seen: dict[str, torch.Tensor] = {}
    hook = head.register_forward_hook(lambda _m, inputs, output: seen.update(feat=inputs[0], out=output))
    side = INPUT_SIDE[name]
    with torch.no_grad():
        logits = model(torch.randn(2, 3, side, side))
    hook.remove()
    assert logits.shape == (2, 7)
    assert isinstance(head, nn.Linear) and head.out_features == 7
    assert seen["feat"].shape == (2, head.in_features)  # penultimate width
    assert torch.equal(seen["out"], logits)


@pytest.mark.parametrize(
    ("name", "width"),
    [("resnet18", 512), ("resnet20", 64), ("wrn16_2", 128), ("wrn40_1", 64), ("vgg11_bn", 512),
     ("alexnet", 256), ("tv_resnet50", 2048)],
)  # fmt: skip
def test_penultimate_widths(name: str, width: int) -> None:
    assert classifier_layer(build_model(name, 10)).in_features == width


@pytest.mark.parametrize("name", ["resnet20", "wrn16_1", "vgg11_bn", "alexnet"])
def test_cifar_models_accept_64x64(name: str) -> None:
    """TinyImageNet (64x64) runs through the same CIFAR architectures."""
    model = build_model(name, 200).eval()
    with torch.no_grad():
        assert model(torch.randn(2, 3, 64, 64)).shape == (2, 200)


def test_resnet56_matches_the_shared_teacher_size() -> None:
    # 855,770 parameters is the count the shared data README gives for the pretrained ResNet-56.
    assert sum(p.numel() for p in build_model("resnet56", 10).parameters()) == 855_770


@pytest.mark.parametrize("depth", [20, 32, 44, 56])
def test_option_a_is_option_b_without_downsample_params(depth: int) -> None:
    keys_a = set(build_model(f"resnet{depth}_a", 10).state_dict())
    keys_b = set(build_model(f"resnet{depth}", 10).state_dict())
    assert not any("downsample" in key for key in keys_a)
    assert {key for key in keys_b if "downsample" not in key} == keys_a
    assert {key.split(".downsample")[0] for key in keys_b - keys_a} == {"layer2.0", "layer3.0"}


def test_option_a_shortcut_zero_pads_channels() -> None:
    block = build_model("resnet20_a", 10).layer2[0]
    x = torch.randn(1, 16, 8, 8)
    shortcut = block.downsample(x)
    assert shortcut.shape == (1, 32, 4, 4)
    assert torch.equal(shortcut[:, 8:24], x[:, :, ::2, ::2])
    assert shortcut[:, :8].abs().sum() == 0 and shortcut[:, 24:].abs().sum() == 0


def test_reference_state_dict_layouts() -> None:
    r18 = build_model("resnet18", 10).state_dict()
    assert {"conv1.weight", "bn1.running_mean", "layer2.0.shortcut.0.weight", "layer2.0.shortcut.1.weight",
            "layer4.1.bn2.bias", "linear.weight"} <= set(r18)  # fmt: skip
    assert not any(key.startswith("layer1.0.shortcut") for key in r18)  # identity shortcut has no params
    wrn = build_model("wrn40_2", 10).state_dict()
    assert {"conv1.weight", "block1.layer.0.convShortcut.weight", "block1.layer.5.conv2.weight",
            "block3.layer.0.bn1.weight", "bn1.weight", "fc.bias"} <= set(wrn)  # fmt: skip
    assert "block1.layer.1.convShortcut.weight" not in wrn


def test_alexnet_has_no_batchnorm() -> None:
    model = build_model("alexnet", 10)
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    assert any(isinstance(m, nn.BatchNorm2d) for m in build_model("vgg11_bn", 10).modules())


def test_unknown_model_lists_known_names() -> None:
    with pytest.raises(ValueError, match=r"unknown model 'resnet99'; known: .*resnet20.*wrn40_2"):
        build_model("resnet99", 10)


@pytest.mark.parametrize("num_classes", [1, 0, 2.0, True])
def test_bad_num_classes(num_classes: object) -> None:
    with pytest.raises(ValueError, match="num_classes"):
        build_model("resnet20", num_classes)  # type: ignore[arg-type]


def test_wrong_depth_checkpoint_names_missing_keys(tmp_path: Path) -> None:
    path = tmp_path / "r20.pt"
    torch.save(build_model("resnet20", 10).state_dict(), path)
    with pytest.raises(CheckpointMismatchError) as info:
        load_teacher("resnet32", 10, checkpoint=str(path))
    message = str(info.value)
    # resnet32 has 5 blocks per stage; a resnet20 checkpoint stops at block 2.
    assert f"checkpoint {path} does not match architecture 'resnet32'" in message
    assert "layer1.3.conv1.weight" in message
    # 6 extra blocks x (2 conv weights + 2 BNs x 4 entries) = 60 missing keys (BN counters may be missing).
    assert "60 missing keys" in message and "0 unexpected" in message
    assert len(message.splitlines()) == 1


def test_class_count_mismatch_is_named_with_shapes(tmp_path: Path) -> None:
    path = tmp_path / "r20_c100.pt"
    torch.save(build_model("resnet20", 100).state_dict(), path)
    with pytest.raises(CheckpointMismatchError, match=r"0 missing keys, 0 unexpected, 2 shape mismatches") as info:
        load_teacher("resnet20", 10, checkpoint=str(path))
    assert "fc.weight: checkpoint [100, 64] vs model [10, 64]" in str(info.value)
    assert "fc.bias: checkpoint [100] vs model [10]" in str(info.value)


def test_unexpected_keys_are_named() -> None:
    state = build_model("resnet20", 10).state_dict()
    state["extra.weight"] = torch.zeros(1)
    with pytest.raises(CheckpointMismatchError, match=r"1 unexpected \(extra\.weight\)"):
        load_state_dict_checked(build_model("resnet20", 10), state, "mem", "resnet20")


@pytest.mark.parametrize("prefix", ["module.", "_orig_mod.", "_orig_mod.module."])
@pytest.mark.parametrize("wrapper", [None, "state_dict", "model", "student"])
def test_prefixes_and_wrappers_are_undone(tmp_path: Path, prefix: str, wrapper: str | None) -> None:
    source = build_model("wrn16_1", 10)
    state = {prefix + key: value for key, value in source.state_dict().items()}
    payload = state if wrapper is None else {wrapper: state, "epoch": 3}
    path = tmp_path / "wrapped.pt"
    torch.save(payload, path)
    teacher = load_teacher("wrn16_1", 10, checkpoint=str(path))
    x = torch.randn(2, 3, 32, 32)
    assert torch.allclose(teacher(x), source.eval()(x))
    assert not teacher.training
    assert not any(p.requires_grad for p in teacher.parameters())


def test_missing_checkpoint_file_names_the_path(tmp_path: Path) -> None:
    path = tmp_path / "nowhere" / "teacher.pt"
    with pytest.raises(FileNotFoundError, match=str(path)):
        load_teacher("resnet20", 10, checkpoint=str(path))


def test_unreadable_checkpoint_is_a_value_error(tmp_path: Path) -> None:
    path = tmp_path / "garbage.pt"
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match=f"could not read checkpoint {path}"):
        load_teacher("resnet20", 10, checkpoint=str(path))


def test_random_teacher_is_frozen() -> None:
    teacher = load_teacher("alexnet", 10)
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())


def test_weights_argument_errors() -> None:
    with pytest.raises(ValueError, match=r"unknown weights tag 'V9' for torchvision:resnet50; valid: .*IMAGENET1K_V2"):
        load_teacher("tv_resnet50", 1000, weights="V9")
    with pytest.raises(ValueError, match="pretrained weights exist for torchvision:<name>, timm:<name> and "
                                         "tv_resnet18, tv_resnet50, not the zoo model 'resnet20'"):
        load_teacher("resnet20", 10, weights="IMAGENET1K_V1")
    with pytest.raises(ValueError, match="1000 classes, but num_classes=10"):
        load_teacher("tv_resnet18", 10, weights="IMAGENET1K_V1")
    with pytest.raises(ValueError, match="not both"):
        load_teacher("tv_resnet18", 1000, checkpoint="x.pt", weights="IMAGENET1K_V1")


def test_weights_download_failure_points_to_offline_checkpoint(monkeypatch: pytest.MonkeyPatch) -> None:
    import torchvision
    from urllib.error import URLError

    def offline(*_args: object, **_kwargs: object) -> dict:
        raise URLError("Name or service not known")

    monkeypatch.setattr(type(torchvision.models.ResNet18_Weights.IMAGENET1K_V1), "get_state_dict", offline)
    with pytest.raises(RuntimeError, match=r"IMAGENET1K_V1.*teacher\.checkpoint=<local state_dict>"):
        load_teacher("tv_resnet18", 1000, weights="IMAGENET1K_V1")


def test_torchvision_weights_load_through_the_checked_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """Whatever get_state_dict returns (here: another random ResNet-18) ends up in the teacher."""
    import torchvision

    source = torchvision.models.resnet18(num_classes=1000)
    monkeypatch.setattr(
        type(torchvision.models.ResNet18_Weights.IMAGENET1K_V1), "get_state_dict",
        lambda *_a, **_k: source.state_dict(),
    )  # fmt: skip
    teacher = load_teacher("tv_resnet18", 1000, weights="IMAGENET1K_V1")
    assert torch.equal(teacher.fc.weight, source.fc.weight)


@pytest.mark.slow
def test_shared_resnet56_teacher_accuracy() -> None:
    checkpoint = SHARED_DATA / "cifar10_resnet56.pt"
    test_set = SHARED_DATA / "cifar10_test.npz"
    if not (checkpoint.is_file() and test_set.is_file()):
        pytest.skip(f"shared CIFAR-10 teacher/test set not found under {SHARED_DATA}")
    teacher = load_teacher("resnet56", 10, checkpoint=str(checkpoint))  # strict key + shape match
    data = np.load(test_set)
    # The file is sorted by class: an even stride gives 100 images of each class.
    images = torch.from_numpy(data["x"][::10]).permute(0, 3, 1, 2).float() / 255
    labels = torch.from_numpy(data["y"][::10])
    mean = torch.tensor(CIFAR10_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CIFAR10_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        predictions = torch.cat([teacher((batch - mean) / std).argmax(1) for batch in images.split(250)])
    assert len(labels) == 1000 and torch.bincount(labels).tolist() == [100] * 10
    assert (predictions == labels).float().mean().item() > 0.90


def test_rename_pairs_and_their_errors() -> None:
    from nayer.models.loading import rename_keys

    weights = {"backbone.linear.weight": torch.zeros(1), "backbone.conv.weight": torch.zeros(1)}
    assert set(rename_keys(weights, ["backbone.->", "linear.->fc."], "teacher.rename")) == {"fc.weight", "conv.weight"}
    assert set(rename_keys(weights, [r"backbone\.(\w+)\.->\1_x."], "teacher.rename")) == {"linear_x.weight", "conv_x.weight"}
    with pytest.raises(ValueError, match=r"teacher.rename entry 'linear.fc.' is not OLD->NEW"):
        rename_keys(weights, ["linear.fc."], "teacher.rename")
    with pytest.raises(ValueError, match=r"'back\(' is not a regular expression"):
        rename_keys(weights, ["back(->x"], "teacher.rename")
    with pytest.raises(ValueError, match="maps two checkpoint keys onto 'w'"):
        rename_keys({"a.w": torch.zeros(1), "b.w": torch.zeros(1)}, ["a.->", "b.->"], "teacher.rename")


def test_mismatch_error_suggests_the_renaming_of_a_wrapped_checkpoint() -> None:
    """A `backbone.` wrapper and a head called `linear` (BN counters kept): two pairs, the longer prefix first."""
    source = build_model("resnet20", 10)
    wrapped = {"backbone." + key.replace("fc.", "linear."): value for key, value in source.state_dict().items()}
    with pytest.raises(CheckpointMismatchError, match=r"'teacher.rename=\[backbone.linear.->fc.,backbone.->\]'"):
        load_state_dict_checked(build_model("resnet20", 10), wrapped, "w.pt", "resnet20")
    model = build_model("resnet20", 10)
    load_state_dict_checked(model, wrapped, "w.pt", "resnet20", ["backbone.linear.->fc.", "backbone.->"])
    assert torch.equal(model.fc.weight, source.fc.weight)
    other = build_model("resnet32", 10)  # keys that do not line up by shape: no suggestion
    with pytest.raises(CheckpointMismatchError) as info:
        load_state_dict_checked(other, wrapped, "w.pt", "resnet32")
    assert "rename" not in str(info.value)
