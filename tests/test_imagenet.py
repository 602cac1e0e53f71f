"""ImageNet as the paper and the reference code ran it (issue 16): one test per item of the README's table, and a
2-round CPU run of configs/imagenet.yaml (R50 -> R50, random weights) on a small folder of real JPEGs."""

import json

import numpy as np
import pytest
import torch
import torchvision.transforms as T
from PIL import Image
from torch import nn

import nayer.augment
from nayer.augment import Augment, random_resized_crop
from nayer.cli_config import parse_config
from nayer.config import RunConfig
from nayer.data import (FolderRead, imagenet_wnids, imagenet_wordnet_names, load_image_folder, load_labeled, preset,
                        resize_center_crop)
from nayer.generator import class_slice_targets
from nayer.inputs import prompt_names, resolve_images
from nayer.run import run

from helpers import CONFIGS, generator

IMAGENET = CONFIGS / "imagenet.yaml"


def imagenet_cfg(*overrides: str) -> RunConfig:
    return parse_config(RunConfig, [f"config={IMAGENET}", "teacher.weights=", *overrides])


def write_jpeg_folder(root, wnids, per_class=2, seed=0):
    """Real JPEG files of mixed sizes in val/<wnid>/ folders, as the ImageNet validation set is laid out."""
    rng = np.random.default_rng(seed)
    for wnid in wnids:
        (root / wnid).mkdir(parents=True)
        for i in range(per_class):
            h, w = int(rng.integers(240, 330)), int(rng.integers(240, 330))
            pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / wnid / f"ILSVRC2012_val_{i:08d}.JPEG", quality=90)
    return root


def test_item1_and_3_the_config_is_the_papers_imagenet_row():
    cfg = imagenet_cfg()
    assert (cfg.teacher.arch, cfg.student.arch, cfg.epochs, cfg.warmup) == ("tv_resnet50", "tv_resnet50", 300, 0)
    assert (cfg.synthesis.batch_size, cfg.synthesis.g_steps, cfg.synthesis.g_loops, cfg.kd.kd_steps,
            cfg.kd.batch_size) == (50, 100, 20, 2000, 128)
    assert (cfg.synthesis.a_bn, cfg.synthesis.a_cls, cfg.synthesis.a_adv) == (0.1, 0.1, 0.1)
    for variant, student in (("imagenet_r18", "tv_resnet18"), ("imagenet_mobilenetv2", "torchvision:mobilenet_v2")):
        layered = parse_config(RunConfig, [f"config={IMAGENET},{CONFIGS / 'variants' / (variant + '.yaml')}"])
        assert layered.student.arch == student and layered.epochs == 300


def test_item2_kd_reads_the_buffer_through_random_resized_crop():
    assert imagenet_cfg().kd.crop == "resized" and RunConfig().kd.crop == "pad"
    torch.manual_seed(0)
    x = torch.rand(6, 3, 32, 32)
    assert torch.allclose(random_resized_crop(x, scale=(1, 1), ratio=(1, 1)), x, atol=1e-4)
    # A quarter-area square box: the output is torchvision's resized crop of some 16x16 window of the input.
    out = random_resized_crop(x, scale=(0.25, 0.25), ratio=(1, 1))
    for image, crop in zip(x, out):
        windows = [T.functional.resized_crop(image, top, left, 16, 16, [32, 32], antialias=False)
                   for top in range(17) for left in range(17)]
        assert min(float((w - crop).abs().max()) for w in windows) < 1e-4
    views = Augment([0.5] * 3, [0.5] * 3, flip=True, crop="resized")(x)
    assert views.shape == x.shape


def test_item4_synthesis_rolls_then_crops_with_padding_4(monkeypatch):
    cfg = imagenet_cfg()
    assert (cfg.synthesis.crop_padding, cfg.synthesis.jitter, cfg.synthesis.flip) == (4, 28, False)
    calls = []
    for name in ("jitter_flip", "random_crop", "random_flip"):
        real = getattr(nayer.augment, name)
        monkeypatch.setattr(nayer.augment, name,
                            lambda x, *a, _real=real, _name=name: calls.append(_name) or _real(x, *a))
    Augment([0.5] * 3, [0.5] * 3, crop_padding=4, flip=False, jitter=28)(torch.rand(2, 3, 64, 64))
    assert calls == ["jitter_flip", "random_crop"]


def test_item5_every_class_once_per_epoch_in_shuffled_slices_shared_by_workers():
    assert imagenet_cfg().synthesis.targets == "slices"
    epoch = [class_slice_targets(50, 1000, seed=0, epoch=3, iteration=i) for i in range(20)]
    assert sorted(torch.cat(epoch).tolist()) == list(range(1000))
    # Workers that split the epoch's 20 iterations 7/7/6 draw the same slices as one worker would.
    split = [class_slice_targets(50, 1000, 0, 3, first + i) for first, n in ((0, 7), (7, 7), (14, 6)) for i in range(n)]
    assert all(torch.equal(a, b) for a, b in zip(epoch, split))
    assert not torch.equal(torch.cat(epoch), torch.cat([class_slice_targets(50, 1000, 0, 4, i) for i in range(20)]))


def test_item6_both_imagenet_bodies_and_the_reference_layout():
    emb = torch.randn(1000, 512)
    ref = generator(emb, 2, 224, body="imagenet_reference")
    convs = [(m.in_channels, m.out_channels) for m in ref.body.modules() if isinstance(m, nn.Conv2d)]
    # NLDeepGenerator: conv at 14 px, then Up + conv to 28, 56, 112, 224 px, then the RGB conv.
    assert convs == [(128, 128), (128, 128), (128, 64), (64, 64), (64, 64), (64, 3)]
    assert not isinstance(ref.body.conv_blocks[0], nn.BatchNorm2d)  # no BN2d after the Linear in the reference
    paper = generator(emb, 2, 224, body="imagenet_paper")
    assert [(m.in_channels, m.out_channels) for m in paper.body.modules() if isinstance(m, nn.Conv2d)] == \
        [(128, 128), (128, 128), (128, 64), (64, 64), (64, 3)]
    assert generator(emb, 2, 224).body.__class__ is ref.body.__class__  # auto above 64 px
    assert imagenet_cfg().generator.body == "imagenet_reference"
    assert ref(torch.tensor([0, 1])).shape == paper(torch.tensor([0, 1])).shape == (2, 3, 224, 224)


def test_item7_prompts_use_the_full_wordnet_line_and_no_two_classes_share_one():
    names = imagenet_wordnet_names()
    assert len(names) == 1000 and len(set(names)) == 1000
    assert names[0] == "tench, Tinca tinca" and names[1] == "goldfish, Carassius auratus"
    cranes = [n for n in names if n.startswith("crane:")]
    assert len(cranes) == 2 and cranes[0] != cranes[1]  # the two "crane" lines, told apart by their glosses
    cfg = imagenet_cfg()
    images, _ = resolve_images(cfg)
    assert images.class_names[0] == "tench"  # the run's names stay torchvision's short ones (console, report)
    assert prompt_names(cfg, images) == list(names)
    c10 = parse_config(RunConfig, [])
    assert prompt_names(c10, resolve_images(c10)[0]) == list(preset("cifar10").class_names)


def test_item8_eval_is_resize_256_center_crop_224(tmp_path):
    assert imagenet_cfg().data.eval_crop_pct == 0.875
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (375, 500, 3), dtype=np.uint8))
    expected = T.Compose([T.Resize(256), T.CenterCrop(224)])(img)
    assert np.array_equal(np.asarray(resize_center_crop(img, 224, 0.875)), np.asarray(expected))


def test_item9_tinyimagenet_uses_the_references_half_normalization():
    tiny = preset("tiny")
    assert tiny.mean == (0.5, 0.5, 0.5) and tiny.std == (0.5, 0.5, 0.5)


def test_item10_paper_variant_buffer_holds_what_the_teacher_scored():
    torch.manual_seed(0)
    mean, std = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
    g = generator(torch.randn(10, 12), 20, 32, nz=16, ngf=8, body="cifar", paper_variant=True, mean=mean,
                  std=std)
    captured = {}
    g.body.conv_blocks[-2].register_forward_hook(lambda m, i, out: captured.setdefault("bn", out))
    pixels = g(torch.arange(20) % 10)
    assert pixels.min() >= 0 and pixels.max() <= 1
    # What the teacher sees (the pixels, normalized) is the BN2d's output wherever it maps into [0, 1].
    normalized = nayer.augment.Normalize(mean, std)(pixels)
    raw = captured["bn"] * torch.tensor(std).view(1, 3, 1, 1) + torch.tensor(mean).view(1, 3, 1, 1)
    inside = (raw > 0) & (raw < 1)
    assert inside.float().mean() > 0.5
    assert torch.allclose(normalized[inside], captured["bn"][inside], atol=1e-5)
    # The buffer's uint8 images, read back and normalized, are what the teacher scored (to 1/255 px).
    stored = nayer.augment.float_to_uint8(pixels).float() / 255
    assert (nayer.augment.Normalize(mean, std)(stored) - normalized).abs().max() <= 1 / 255 / min(std) + 1e-5
    pixels.sum().backward()  # the straight-through clamp passes gradients
    assert g.body.l1.weight.grad is not None and g.body.l1.weight.grad.abs().sum() > 0


def test_val_folder_in_loader_processes_by_wnid_and_cached_as_a_memory_map(tmp_path):
    wnids = list(imagenet_wnids())
    chosen = [wnids[3], wnids[500], wnids[999]]
    val = write_jpeg_folder(tmp_path / "val", chosen)
    read = FolderRead(0.875, 0, tuple(wnids))
    torch.manual_seed(0)
    serial = load_image_folder(str(val), 64, 0.875, 0, wnids)
    assert torch.equal(torch.random.get_rng_state(), torch.manual_seed(0).get_state())  # the run's RNG untouched
    parallel = load_image_folder(str(val), 64, 0.875, 2, wnids)
    assert np.array_equal(serial.x, parallel.x) and serial.x.shape == (6, 64, 64, 3)
    assert serial.y.tolist() == [3, 3, 500, 500, 999, 999]  # a partial val folder keeps ImageNet's labels
    cache = tmp_path / "cache"
    first = load_labeled(str(val), 64, FolderRead(0.875, 2, tuple(wnids), str(cache)))
    assert isinstance(first.x, np.memmap) and np.array_equal(first.x, serial.x) and first.y.tolist() == serial.y.tolist()
    entry = next(cache.iterdir())
    manifest = json.loads((entry / "manifest.json").read_text())
    assert manifest["count"] == 6 and manifest["crop_pct"] == 0.875
    stamp = (entry / "x.npy").stat().st_mtime_ns
    again = load_labeled(str(val), 64, FolderRead(0.875, 2, tuple(wnids), str(cache)))
    assert (entry / "x.npy").stat().st_mtime_ns == stamp and np.array_equal(again.x, serial.x)  # read, not decoded
    (entry / "manifest.json").unlink()  # an interrupted write: decoded again
    assert np.array_equal(load_labeled(str(val), 64, FolderRead(0.875, 0, tuple(wnids), str(cache))).x, serial.x)
    assert load_labeled(str(val), 64, read).x.shape == (6, 64, 64, 3)


def test_decoding_a_folder_holds_its_images_once(tmp_path):
    """Peak memory while decoding is the decoded set once (one array, filled in place), not a list plus a stack;
    into a cache it is not held in memory at all (a memory-mapped file)."""
    import tracemalloc

    val = write_jpeg_folder(tmp_path / "val", list(imagenet_wnids()[:4]), per_class=12)
    size = 48 * 96 * 96 * 3
    ids = tuple(imagenet_wnids())
    load_labeled(str(val), 96, FolderRead(0.875, 0, ids, str(tmp_path / "warm")))  # imports done before counting
    tracemalloc.start()
    load_image_folder(str(val), 96, 0.875, 0, list(imagenet_wnids()))
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.reset_peak()
    load_labeled(str(val), 96, FolderRead(0.875, 0, ids, str(tmp_path / "cache")))
    _, cached_peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert size <= peak < 1.5 * size
    assert cached_peak < 0.5 * size


def test_each_rank_copies_only_its_slice_of_a_memory_mapped_set(tmp_path):
    from nayer.runtime import RunError
    from orchestrator.evaluation import EvalSource

    wnids = list(imagenet_wnids())
    val = write_jpeg_folder(tmp_path / "val", wnids[:3], per_class=3)
    full = load_labeled(str(val), 32, FolderRead(1.0, 0, tuple(wnids), str(tmp_path / "cache")))
    source = EvalSource.of(full)
    assert source.mapped == full.x.filename and source.ref is None  # a path, not the images, travels to the ranks
    parts = [source.part(rank, 2) for rank in range(2)]
    assert [len(p) for p in parts] == [5, 4]
    assert np.array_equal(np.concatenate([p.x for p in parts]), np.concatenate([full.x[0::2], full.x[1::2]]))
    assert all(p.x.flags.writeable and not isinstance(p.x, np.memmap) for p in parts)
    # A val folder that changes under a run: the next reader decodes it again, and a rank holding the driver's
    # older view refuses the rewritten entry instead of pairing new images with old labels.
    image = next((val / wnids[0]).iterdir())
    Image.new("RGB", (300, 300), (9, 9, 9)).save(image, format="JPEG")
    again = load_labeled(str(val), 32, FolderRead(1.0, 0, tuple(wnids), str(tmp_path / "cache")))
    assert not np.array_equal(again.x, full.x)
    with pytest.raises(RunError, match="changed after the driver read it"):
        source.part(0, 2)


@pytest.mark.slow
def test_imagenet_config_two_rounds_r50_to_r50_on_a_jpeg_val_folder(tmp_path):
    """configs/imagenet.yaml through the real loaders, the reference generator body and both augmentations:
    torchvision ResNet-50 teacher and student (random weights, offline), 1000 classes, 224 px, 2 KD rounds."""
    wnids = imagenet_wnids()
    val = write_jpeg_folder(tmp_path / "val", [wnids[0], wnids[1], wnids[2]], per_class=2)
    args = [f"config={IMAGENET}", "teacher.weights=", f"out_dir={tmp_path}", "name=inet", "lte.encoder=sbert",
            f"lte.cache_dir={tmp_path / 'lte'}", "epochs=2", "synthesis.batch_size=4", "synthesis.g_steps=2",
            "synthesis.g_loops=2", "kd.batch_size=4", "kd.kd_steps=1", f"data.eval={val}", "data.eval_workers=2",
            f"data.eval_cache={tmp_path / 'eval-cache'}", "synthesis.metrics=false", "num_threads=2"]
    summary = run(parse_config(RunConfig, args))
    folder = tmp_path / "inet"
    assert summary["buffer_images"] == 16 and summary["teacher_top1"] is not None
    records = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    kd = [r for r in records if r.get("phase") == "kd" and "top1" in r]
    assert [r["epoch"] for r in kd] == [0, 1]
    chunk = torch.load(folder / "buffer" / "chunk-000000.pt", weights_only=True)
    assert chunk["images"].shape == (8, 3, 224, 224)
    # targets=slices: the round's two iterations are consecutive slices of one shuffle of the 1000 classes
    assert len(set(chunk["labels"].tolist())) == 8
    inputs = json.loads((folder / "inputs.json").read_text())
    assert "WordNet" in inputs["prompt_names"]
    assert any((tmp_path / "eval-cache").iterdir())
