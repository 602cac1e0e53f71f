"""Where a pipeline run folder lives: a POSIX path (the default, shared by the nodes) or an object store URL
(`out_dir=s3://bucket/prefix`, also gs://, az://, ...: any fsspec filesystem whose package is installed).

Writes are whole or nothing on both. A POSIX file is written under a temporary name and renamed
(`nayer.runtime.atomic_write`). An object is written to a local temporary file first and then uploaded by one
`put_file`: a single PUT, or a multipart upload that the store completes only after its last part, so a reader
sees the whole object or none, and a killed writer leaves no object behind. (A multipart upload killed half-way,
over 50 MB, leaves its parts, which S3 bills until a bucket lifecycle rule aborts incomplete uploads.) The
manifest (`buffer/manifest.json`) stays the buffer's commit point: a shard object exists before the driver lists
it.

Objects are read through WebDataset's URL opener (`webdataset.gopen`), whose scheme table maps the object store
schemes to fsspec here (it would pipe gs:// through `gsutil`, which is not installed everywhere and reports a
missing object as a failure); POSIX files are read directly. Ray Train's storage takes the same URL through
pyarrow. Credentials and the
endpoint come from the usual environment (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL for an
S3-compatible server; GOOGLE_APPLICATION_CREDENTIALS; ...), on every node: each process opens the store itself.
"""

from __future__ import annotations

import fnmatch
import glob
import json
import os
import posixpath
import shutil
import tempfile
from pathlib import Path
from typing import Callable

import webdataset as wds

from nayer.runtime import append_jsonl as runtime_append_jsonl
from nayer.runtime import atomic_write


def is_url(target: str | Path) -> bool:
    """An object store URL (scheme://...), as opposed to a POSIX path."""
    return "://" in str(target)


def join(root: str | Path, *parts: str) -> str:
    if is_url(root):
        return posixpath.join(str(root).rstrip("/"), *parts)
    return str(Path(root, *parts))


def filesystem(url: str):
    """(fsspec filesystem, path within it) of an object store URL; fsspec caches the filesystem per process. Its
    listings are not cached: other processes (actors, ranks) add objects that a cached listing would hide."""
    import fsspec

    return fsspec.core.url_to_fs(url, use_listings_cache=False)


def _gopen_fsspec(url: str, mode: str = "rb", bufsize: int = 8192, **kw):
    """A WebDataset `gopen` handler: the object store URL opened through fsspec."""
    fs, path = filesystem(url)
    return fs.open(path, mode)


for _scheme in ("s3", "s3a", "gs", "gcs", "az", "abfs", "abfss"):
    wds.gopen_schemes[_scheme] = _gopen_fsspec


def write_whole(target: str | Path, write: Callable[[str], None]) -> str:
    """`write(local_file)`, then make it `target` at once: a rename on POSIX, one upload on an object store."""
    if not is_url(target):
        return str(atomic_write(target, write))
    fs, path = filesystem(str(target))
    with tempfile.TemporaryDirectory(prefix="nayer-upload-") as tmp:
        local = str(Path(tmp) / posixpath.basename(path))
        write(local)
        fs.put_file(local, path)
    return str(target)


def write_bytes(target: str | Path, data: bytes) -> str:
    return write_whole(target, lambda tmp: Path(tmp).write_bytes(data))


def read_bytes(target: str | Path) -> bytes | None:
    """The file's bytes (None: there is no such file); an object through WebDataset's opener (fsspec)."""
    try:
        if not is_url(target):
            return Path(target).read_bytes()
        with wds.gopen(str(target), "rb") as f:
            return f.read()
    except FileNotFoundError:
        return None


def size(target: str | Path) -> int | None:
    """The file's size in bytes (None: there is no such file)."""
    if not is_url(target):
        return Path(target).stat().st_size if Path(target).is_file() else None
    fs, path = filesystem(str(target))
    try:
        return fs.size(path)
    except FileNotFoundError:
        return None


def exists(target: str | Path) -> bool:
    return size(target) is not None


def listing(root: str | Path, pattern: str) -> list[str]:
    """The files under `root` whose path relative to it matches `pattern` segment by segment (`*` stays within
    one folder; `root` itself is no pattern, whatever characters it holds), sorted, as paths or URLs."""
    if not is_url(root):
        return sorted(p for p in glob.glob(os.path.join(glob.escape(str(root)), pattern)) if os.path.isfile(p))
    fs, path = filesystem(str(root))
    parts = pattern.split("/")
    found = fs.find(path, maxdepth=len(parts)) if fs.exists(path) else []  # one listing, files only
    scheme = str(root).split("://", 1)[0]
    return sorted(f"{scheme}://{key}" for key in found if _matches(posixpath.relpath(key, path).split("/"), parts))


def _matches(segments: list[str], parts: list[str]) -> bool:
    return len(segments) == len(parts) and all(fnmatch.fnmatchcase(s, p) for s, p in zip(segments, parts))


def remove(target: str | Path) -> None:
    """Delete a file if it is there."""
    if not is_url(target):
        Path(target).unlink(missing_ok=True)
        return
    fs, path = filesystem(str(target))
    try:
        fs.rm_file(path)
    except FileNotFoundError:
        pass


def remove_tree(target: str | Path) -> None:
    """Delete a folder (a prefix, on an object store) and everything under it, if it is there."""
    if not is_url(target):
        shutil.rmtree(target, ignore_errors=True)
        return
    fs, path = filesystem(str(target))
    if fs.exists(path):
        fs.rm(path, recursive=True)


def move(source: str | Path, target: str | Path) -> None:
    """A rename on POSIX; a copy and a delete on an object store (which has no rename)."""
    if not is_url(source):
        Path(target).parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(source), str(target))
        return
    fs, path = filesystem(str(source))
    fs.mv(path, filesystem(str(target))[1])


def upload(local: Path, url: str) -> None:
    """A local file, or every file under a local folder to the same relative key under `url`, each written whole
    (one put_file of a complete file)."""
    fs, path = filesystem(url)
    files = [local] if local.is_file() else sorted(p for p in local.rglob("*") if p.is_file())
    for file in files:
        fs.put_file(str(file), path if file == local else posixpath.join(path, file.relative_to(local).as_posix()))


def download_tree(url: str, local: Path) -> None:
    """Every object under `url` to the same relative path under `local` (nothing if there is none)."""
    fs, path = filesystem(url)
    if not fs.exists(path):
        return
    for key in fs.find(path):
        target = local / posixpath.relpath(key, path)
        target.parent.mkdir(parents=True, exist_ok=True)
        fs.get_file(key, str(target))


def subfolders(target: str | Path) -> list[str]:
    """The names of the folders (prefixes, on an object store) directly under `target`."""
    if not is_url(target):
        return sorted(p.name for p in Path(target).iterdir() if p.is_dir()) if Path(target).is_dir() else []
    fs, path = filesystem(str(target))
    if not fs.exists(path):
        return []
    return sorted(posixpath.basename(e["name"].rstrip("/")) for e in fs.ls(path, detail=True)
                  if e["type"] == "directory")


def append_jsonl(record: dict, target: str | Path) -> None:
    """One record at the end of a JSONL log: appended to a POSIX file; an object is written again whole with it (a
    log of a line per round stays small)."""
    if not is_url(target):
        runtime_append_jsonl(record, target)
        return
    write_bytes(target, (read_bytes(target) or b"") + (json.dumps(record) + "\n").encode())
