"""The decoded, resized evaluation set of an image folder, written once and memory-mapped by every later reader.

ImageNet's 50,000 validation JPEGs take minutes to decode and 7.5 GB as uint8 at 224 px. A run that evaluates
every round should pay that once: `data.eval_cache=<folder>` decodes the image folder (in `data.eval_workers`
loader processes) straight into `x.npy` there, a memory-mapped file, so no process ever holds the decoded set in
its own memory. Later runs, and each rank of a pipeline run, map the same file and read only their own images.

One entry per (source folder, image size, crop share), in `<cache>/<key>/`: `x.npy` (uint8 N,H,W,3), `y.npy`
(int64 N), and `manifest.json`, written last (atomically, as the commit point): a folder without it is an
interrupted write, done again.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
from pathlib import Path

import numpy as np

from nayer.data import FolderRead, LabeledImages, decode_images, folder_files
from nayer.runtime import atomic_write, save_json


def cache_entry(path: str, image_size: int, read: FolderRead) -> Path:
    """The cache folder of (source, size, crop share) under `read.cache`."""
    key = json.dumps({"source": os.path.realpath(path), "image_size": image_size, "crop_pct": read.crop_pct})
    return Path(read.cache) / hashlib.sha256(key.encode()).hexdigest()[:16]


def cached_image_folder(path: str, image_size: int, read: FolderRead) -> LabeledImages:
    """The folder's images as a read-only memory map of its cache entry, decoding them into it first if the entry
    is not complete: no manifest, a manifest of other files (names, sizes, modification times), or files missing."""
    entry = cache_entry(path, image_size, read)
    root = Path(path)
    files, classes = folder_files(root, read.class_ids)
    manifest = {"source": os.path.realpath(path), "image_size": image_size, "crop_pct": read.crop_pct,
                "count": len(files), "classes": classes, "files": files_digest(root, files)}
    if read_manifest(entry) != manifest or not all((entry / name).is_file() for name in ("x.npy", "y.npy")):
        (entry / "manifest.json").unlink(missing_ok=True)  # the old entry is no longer committed
        for leftover in entry.glob("*.tmp"):  # an interrupted decode's temporary file
            leftover.unlink()
        shape = (len(files), image_size, image_size, 3)

        def decode(tmp: str) -> None:
            x = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=shape)
            with open(tmp, "r+b") as f:  # reserve the blocks: a full disk is an OSError here, not a SIGBUS later
                try:
                    os.posix_fallocate(f.fileno(), 0, os.path.getsize(tmp))
                except OSError as error:
                    if error.errno not in (errno.EOPNOTSUPP, errno.EINVAL):  # a file system without it: write anyway
                        raise
            images = decode_images(files, classes, image_size, read.crop_pct, read.workers, out=x)
            x.flush()
            del x
            atomic_write(entry / "y.npy", lambda tmp_y: _save_npy(tmp_y, images.y))

        atomic_write(entry / "x.npy", decode)
        save_json(manifest, entry / "manifest.json")
        print(f"evaluation set {path}: {len(files)} images decoded into {entry}", flush=True)
    return LabeledImages(np.load(entry / "x.npy", mmap_mode="r"), np.load(entry / "y.npy"), classes)


def files_digest(root: Path, files: list[tuple[Path, int]]) -> str:
    """sha256 over each image's path (relative to the folder), label, size and modification time."""
    digest = hashlib.sha256()
    for file, label in files:
        stat = file.stat()
        digest.update(f"{file.relative_to(root)}\t{label}\t{stat.st_size}\t{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def read_manifest(entry: Path) -> dict | None:
    """The entry's committed manifest, or None."""
    try:
        return json.loads((entry / "manifest.json").read_text())
    except (OSError, ValueError):
        return None


def _save_npy(path: str, array: np.ndarray) -> None:
    with open(path, "wb") as f:  # np.save on a name would append ".npy" to the temporary name
        np.save(f, array)
