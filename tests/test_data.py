"""Labeled data loaders, dataset presets and the teacher-training command (all offline, a few seconds)."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from nayer.cli_config import parse_config
from nayer.data import (
    PRESETS,
    LabeledImages,
    load_digits,
    load_image_folder,
    load_labeled,
    load_npz,
    preset,
    read_class_names,
)
from nayer.models import build_model
from nayer.train_teacher import TeacherTrainConfig, main, train_teacher

REPO = Path(__file__).resolve().parents[1]


def _write_npz(path: Path, x: np.ndarray, y: np.ndarray, classes: list[str]) -> str:
    np.savez(path, x=x, y=y, classes=np.array(classes))
    return str(path)


def test_npz_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (5, 32, 32, 3), dtype=np.uint8)
    y = np.array([0, 1, 2, 1, 0])
    path = _write_npz(tmp_path / "set.npz", x, y, ["cat", "dog", "eel"])
    data = load_npz(path)
    assert np.array_equal(data.x, x) and data.x.dtype == np.uint8
    assert data.y.dtype == np.int64 and data.y.tolist() == y.tolist()
    assert data.classes == ["cat", "dog", "eel"]
    assert len(load_labeled(path, image_size=32)) == 5


def test_npz_rejects_missing_key_bad_labels_and_wrong_size(tmp_path):
    x = np.zeros((2, 32, 32, 3), np.uint8)
    no_classes = tmp_path / "no_classes.npz"
    np.savez(no_classes, x=x, y=np.array([0, 1]))
    with pytest.raises(ValueError, match="lacks key.*classes"):
        load_npz(str(no_classes))
    bad_label = _write_npz(tmp_path / "bad.npz", x, np.array([0, 5]), ["a", "b"])
    with pytest.raises(ValueError, match=r"has label 5 but its class list has 2 classes \(labels 0..1\)"):
        load_npz(bad_label)
    good = _write_npz(tmp_path / "good.npz", x, np.array([0, 1]), ["a", "b"])
    with pytest.raises(ValueError, match="32x32 images but 64x64"):
        load_labeled(good, image_size=64)


def test_image_folder_resizes_and_labels_sorted_classes(tmp_path):
    colors = {"red": (255, 0, 0), "blue": (0, 0, 255)}
    for name, color in colors.items():
        (tmp_path / name).mkdir()
        for i, size in enumerate([(40, 48), (32, 32)]):
            Image.new("RGB", size, color).save(tmp_path / name / f"{i}.png")
    data = load_image_folder(str(tmp_path), 32)
    assert data.x.shape == (4, 32, 32, 3) and data.x.dtype == np.uint8
    assert data.classes == ["blue", "red"]  # sorted folder names, as torchvision's ImageFolder
    assert data.y.tolist() == [0, 0, 1, 1]
    assert (data.x[:2] == (0, 0, 255)).all() and (data.x[2:] == (255, 0, 0)).all()
    assert load_labeled(str(tmp_path), image_size=16).x.shape == (4, 16, 16, 3)
    with pytest.raises(ValueError, match="48x40|40x48"):  # mixed sizes need an image_size
        load_image_folder(str(tmp_path), None)


def test_digits_shapes_split_and_determinism():
    train, test = load_digits("train"), load_digits("test")
    for part in (train, test):
        assert part.x.dtype == np.uint8 and part.x.shape[1:] == (32, 32, 3)
        assert (part.x[..., 0] == part.x[..., 2]).all()  # gray repeated to RGB
        assert part.classes[:2] == ["zero", "one"] and len(part.classes) == 10
        assert set(part.y.tolist()) == set(range(10))
    assert len(train) + len(test) == 1797 and len(test) == 540
    # Disjoint: sklearn's digits have no duplicate images, so no image may be in both parts.
    assert not {r.tobytes() for r in train.x} & {r.tobytes() for r in test.x}
    # Stratified: every class is split 70/30 up to rounding.
    total, in_test = Counter((train.y.tolist() + test.y.tolist())), Counter(test.y.tolist())
    assert all(abs(in_test[c] - 0.3 * total[c]) <= 1 for c in range(10))
    again = load_digits("train")
    assert np.array_equal(again.x, train.x) and np.array_equal(again.y, train.y)
    assert not np.array_equal(load_digits("train", seed=1).y, train.y)
    with pytest.raises(ValueError, match="unknown digits split 'val'"):
        load_digits("val")


def test_digits_preset_matches_recomputed_statistics():
    pixels = load_digits("train").x.astype(np.float64) / 255.0
    digits = preset("digits")
    np.testing.assert_allclose(digits.mean, pixels.mean(axis=(0, 1, 2)), atol=1e-3)
    np.testing.assert_allclose(digits.std, pixels.std(axis=(0, 1, 2)), atol=1e-3)
    assert (digits.num_classes, digits.image_size) == (10, 32)


def test_missing_path_error_names_it_and_the_accepted_forms(tmp_path):
    missing = str(tmp_path / "nowhere" / "train.npz")
    with pytest.raises(FileNotFoundError, match="nowhere/train.npz") as info:
        load_labeled(missing)
    assert "digits:train" in str(info.value) and "image folder" in str(info.value)


def test_presets():
    assert set(PRESETS) == {"cifar10", "cifar100", "tiny", "imagenet", "digits"}
    c100 = preset("cifar100")
    assert c100.num_classes == 100 and len(set(c100.class_names)) == 100
    assert c100.class_names[:3] == ("apple", "aquarium_fish", "baby") and c100.class_names[-1] == "worm"
    c10 = preset("cifar10")
    assert c10.std == (0.2023, 0.1994, 0.2010) and c10.class_names[0] == "airplane"
    assert preset("tiny").class_names is None and preset("tiny").image_size == 64
    imagenet = preset("imagenet")
    assert len(imagenet.class_names) == 1000 and imagenet.class_names[0] == "tench"
    for p in PRESETS.values():
        assert p.class_names is None or len(p.class_names) == p.num_classes
    with pytest.raises(ValueError, match="unknown dataset preset 'svhn'; known: cifar10, cifar100"):
        preset("svhn")


def test_read_class_names(tmp_path):
    path = tmp_path / "names.txt"
    path.write_text("goldfish\n\nsalamander \n")
    assert read_class_names(str(path)) == ["goldfish", "salamander"]
    path.write_text("a\nb\na\n")
    with pytest.raises(ValueError, match="'a' twice"):
        read_class_names(str(path))
    with pytest.raises(FileNotFoundError, match="absent.txt"):
        read_class_names(str(tmp_path / "absent.txt"))


def test_labeled_images_validates_arrays():
    with pytest.raises(ValueError, match="uint8"):
        LabeledImages(np.zeros((2, 8, 8, 3), np.float32), np.zeros(2, np.int64), ["a"])
    with pytest.raises(ValueError, match="one integer per image"):
        LabeledImages(np.zeros((2, 8, 8, 3), np.uint8), np.zeros(3, np.int64), ["a"])


@pytest.fixture
def digits_subset(tmp_path) -> str:
    """200 digits training images as a .npz (the teacher command then reads the npz path)."""
    train = load_digits("train")
    return _write_npz(tmp_path / "digits200.npz", train.x[:200], train.y[:200], train.classes)


def test_train_teacher_writes_loadable_state_dict_atomically(tmp_path, digits_subset):
    # Kept to ~5 s: a 0.2M-parameter WRN, 200 images, 2 epochs.
    out = tmp_path / "run" / "teacher.pt"
    cfg = parse_config(TeacherTrainConfig, [
        "arch=wrn16_1", "dataset=digits", f"train={digits_subset}", "test=digits:test", "epochs=2",
        "batch_size=32", "device=cpu", "bf16=true", f"out={out}",
    ])
    result = train_teacher(cfg)
    assert result["path"] == str(out) and 0.0 <= result["top1"] <= 100.0
    assert sorted(p.name for p in out.parent.iterdir()) == ["teacher.pt", "teacher.pt.json"]  # no .tmp left
    model = build_model("wrn16_1", 10)
    model.load_state_dict(torch.load(out, weights_only=True))
    summary = json.loads((tmp_path / "run" / "teacher.pt.json").read_text())
    assert summary["top1"] == result["top1"] and summary["config"]["arch"] == "wrn16_1"


def test_train_teacher_rejects_labels_beyond_the_preset(tmp_path):
    x = np.zeros((4, 32, 32, 3), np.uint8)
    path = _write_npz(tmp_path / "twelve.npz", x, np.array([0, 3, 11, 10]), [f"c{i}" for i in range(12)])
    cfg = TeacherTrainConfig(arch="wrn16_1", dataset="digits", train=path, epochs=1, out=str(tmp_path / "t.pt"))
    with pytest.raises(ValueError, match=r"twelve.npz' has label 11 but dataset 'digits' has 10 classes"):
        train_teacher(cfg)
    assert not (tmp_path / "t.pt").exists()


def test_cifar10_config_requires_train_path(capsys):
    argv = [f"config={REPO / 'configs/teacher/cifar10.yaml'}", "out=unused.pt"]
    with pytest.raises(ValueError, match="pass train=<path>"):
        parse_config(TeacherTrainConfig, argv)
    with pytest.raises(SystemExit, match="error: .*pass train=<path>"):
        main(argv)
    cfg = parse_config(TeacherTrainConfig, argv + ["train=digits:train"])
    assert (cfg.arch, cfg.epochs, cfg.lr, cfg.weight_decay, cfg.batch_size) == ("resnet34", 200, 0.1, 5e-4, 128)
