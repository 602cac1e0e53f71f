"""Tests for nayer.lte: prompts, the four encoders, the on-disk cache and offline failure modes."""
from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from nayer import lte
from nayer.cli_config import ConfigError, parse_config
from nayer.config import LTEConfig, RunConfig

# Smallest open_clip text tower (width 256, 10 layers): builds with random weights in ~1 s.
SMALL_CLIP = "ViT-S-32-alt"


def encode(names: list[str], **fields) -> torch.Tensor:
    """`lte.encode_labels` of `names` with an LTEConfig of `fields` (no cache unless cache_dir is given)."""
    return lte.encode_labels(names, LTEConfig(**{"cache_dir": "", **fields}))


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="module")
def sbert_cache(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, torch.Tensor]:
    """SBERT embeddings of cat/dog/truck, computed once for the module and cached to a folder."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setenv("TRANSFORMERS_OFFLINE", "1")
        cache_dir = tmp_path_factory.mktemp("lte-cache")
        emb = encode(["cat", "dog", "truck"], encoder="sbert", cache_dir=str(cache_dir))
    return cache_dir, emb


def assert_plain_embeddings(emb: torch.Tensor, shape: tuple[int, int]) -> None:
    """The contract every encoder meets: float32 CPU [K, D], no grad, usable in autograd."""
    assert emb.shape == shape
    assert emb.dtype == torch.float32 and emb.device.type == "cpu"
    assert not emb.requires_grad and not emb.is_inference()
    weight = torch.ones(shape[1], 2, requires_grad=True)
    (emb @ weight).sum().backward()  # an inference tensor would fail here (saved for backward)
    assert weight.grad is not None


# --- prompts -------------------------------------------------------------------------------


def test_reference_template_replaces_underscores_and_dashes() -> None:
    prompts = lte.format_prompts(["pickup_truck", "maple-tree", "cat"], "reference")
    assert prompts == ["a image of pickup truck", "a image of maple tree", "a image of cat"]


def test_index_template_and_literal_templates() -> None:
    assert lte.format_prompts(["x", "y"], "index") == ["a class of 0", "a class of 1"]
    prompts = lte.format_prompts(["sea_lion"], "a photo of a {name}, class {index}")
    assert prompts == ["a photo of a sea lion, class 0"]


@pytest.mark.parametrize("template", ["a photo", "nonexistent", "{label} image"])
def test_template_without_allowed_placeholder_is_rejected(template: str) -> None:
    with pytest.raises(ValueError, match="reference, index"):
        lte.format_prompts(["cat", "dog"], template)


def test_empty_class_list_is_rejected() -> None:
    with pytest.raises(ValueError, match="empty"):
        lte.format_prompts([], "reference")
    with pytest.raises(ValueError, match="empty"):
        encode([], encoder="onehot")


# --- encoders ------------------------------------------------------------------------------


def test_unknown_encoder_lists_encoders() -> None:
    with pytest.raises(ConfigError, match="lte.encoder='bert' is not allowed; choose one of: clip, sbert, onehot, file"):
        parse_config(RunConfig, ["lte.encoder=bert"])


def test_onehot_is_identity() -> None:
    emb = encode(["a", "b", "c", "d"], encoder="onehot")
    assert torch.equal(emb, torch.eye(4))
    assert_plain_embeddings(emb, (4, 4))


def test_sbert_shape_and_semantics(sbert_cache: tuple[Path, torch.Tensor]) -> None:
    _, emb = sbert_cache
    assert_plain_embeddings(emb, (3, 384))
    cat, dog, truck = emb
    assert F.cosine_similarity(cat, dog, dim=0) > F.cosine_similarity(cat, truck, dim=0) + 0.1


def test_cache_hit_loads_no_model(
    sbert_cache: tuple[Path, torch.Tensor], monkeypatch: pytest.MonkeyPatch
) -> None:
    cache_dir, emb = sbert_cache
    names = ["cat", "dog", "truck"]
    assert len(list(cache_dir.glob("lte-*.pt"))) == 1
    assert not list(cache_dir.glob("*.tmp"))

    def no_model(*args: object, **kwargs: object) -> torch.Tensor:
        raise AssertionError("the model was loaded despite a cache hit")

    monkeypatch.setattr(lte, "_encode_sbert", no_model)
    again = encode(names, encoder="sbert", cache_dir=str(cache_dir))
    assert torch.equal(again, emb)
    assert_plain_embeddings(again, (3, 384))
    # A different key (another template) is a miss, so it would need the model.
    with pytest.raises(AssertionError, match="despite a cache hit"):
        encode(names, encoder="sbert", template="index", cache_dir=str(cache_dir))


def test_corrupt_cache_is_recomputed(tmp_path: Path) -> None:
    first = encode(["a", "b"], encoder="onehot", cache_dir=str(tmp_path))
    (cache_file,) = tmp_path.glob("lte-*.pt")
    cache_file.write_bytes(b"not a torch file")
    again = encode(["a", "b"], encoder="onehot", cache_dir=str(tmp_path))
    assert torch.equal(again, first)
    assert torch.equal(torch.load(cache_file, weights_only=True)["embeddings"], first)  # rewritten


@pytest.mark.parametrize("suffix", [".pt", ".npy"])
def test_file_round_trip(tmp_path: Path, suffix: str) -> None:
    matrix = torch.randn(3, 7)
    path = tmp_path / f"lte{suffix}"
    if suffix == ".pt":
        torch.save({"embeddings": matrix}, path)
    else:
        np.save(path, matrix.numpy())
    emb = encode(["a", "b", "c"], encoder="file", path=str(path))
    assert torch.equal(emb, matrix)
    assert_plain_embeddings(emb, (3, 7))


def test_file_cache_key_follows_mtime(tmp_path: Path) -> None:
    path = tmp_path / "lte.pt"
    torch.save(torch.zeros(2, 3), path)
    cache_dir = str(tmp_path / "cache")

    def encoded() -> torch.Tensor:
        return encode(["a", "b"], encoder="file", path=str(path), cache_dir=cache_dir)

    assert torch.equal(encoded(), torch.zeros(2, 3))
    torch.save(torch.ones(2, 3), path)
    os.utime(path, ns=(time.time_ns() + 10**9, time.time_ns() + 10**9))  # mtime moves even on coarse clocks
    assert torch.equal(encoded(), torch.ones(2, 3))


def test_file_errors(tmp_path: Path) -> None:
    path = tmp_path / "lte.pt"
    torch.save(torch.randn(5, 4), path)
    with pytest.raises(ValueError, match="has 5 rows but the teacher has 3 classes"):
        encode(["a", "b", "c"], encoder="file", path=str(path))
    missing = tmp_path / "missing.npy"
    with pytest.raises(FileNotFoundError, match="missing.npy"):
        encode(["a"], encoder="file", path=str(missing))
    with pytest.raises(ValueError, match="only read by encoder 'file'"):
        encode(["a"], encoder="onehot", path=str(path))


def test_clip_random_weights_offline(offline: None) -> None:
    emb = encode(["cat", "dog", "truck"], encoder="clip", model=SMALL_CLIP, pretrained=None)
    assert_plain_embeddings(emb, (3, 256))
    assert not torch.allclose(emb.norm(dim=1), torch.ones(3))  # raw encode_text output, no L2 norm
    assert not torch.allclose(emb[0], emb[1])


def test_clip_local_checkpoint_equals_encode_text(tmp_path: Path, offline: None) -> None:
    import open_clip

    model = open_clip.create_model(SMALL_CLIP, pretrained=None).eval()
    checkpoint = tmp_path / "clip.pt"
    torch.save(model.state_dict(), checkpoint)
    emb = encode(["maple_tree", "cat"], model=SMALL_CLIP, pretrained=str(checkpoint))
    tokens = open_clip.get_tokenizer(SMALL_CLIP)(["a image of maple tree", "a image of cat"])
    with torch.no_grad():
        expected = model.encode_text(tokens)
    torch.testing.assert_close(emb, expected)


def test_clip_uncached_tag_fails_fast(offline: None, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))  # an empty cache
    start = time.monotonic()
    with pytest.raises(RuntimeError) as err:
        encode(["cat", "dog"], encoder="clip", model="ViT-B-32", pretrained="openai")
    assert time.monotonic() - start < 10
    message = str(err.value)
    hints = ("'ViT-B-32'", "'openai'", "lte.pretrained=/path/to/local.pt", "lte.encoder=sbert", "lte.path=")
    for hint in hints:
        assert hint in message


def test_clip_cached_tag_resolves_to_hub_file(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A tag found in the Hugging Face cache layout is used as a local file, with its QuickGELU flag."""
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    repo = tmp_path / "models--timm--vit_base_patch32_clip_224.openai"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("abc123")
    weights = repo / "snapshots" / "abc123" / "open_clip_model.safetensors"
    weights.parent.mkdir(parents=True)
    weights.write_bytes(b"")
    checkpoint, quick_gelu = lte._resolve_clip_weights("ViT-B-32", "openai")
    assert Path(checkpoint) == weights and quick_gelu


def test_clip_unknown_model_suggests_near_matches() -> None:
    with pytest.raises(ValueError, match="unknown open_clip model 'vit-b/32'; near matches: ViT-B-32"):
        encode(["cat"], encoder="clip", model="vit-b/32")
