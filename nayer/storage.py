"""Where a run's files live: a POSIX folder or an object store prefix, behind one interface, `Storage`, chosen once
from the location by `open_storage`. Nothing outside this module asks whether a location is a URL.

    store = open_storage("runs/x")                 # PosixStorage: a folder (made absolute)
    store = open_storage("s3://bucket/runs/x")     # FsspecStorage: any fsspec scheme whose package is installed
    store.sub("buffer").write_bytes("manifest.json", data)

A Storage is rooted at a location; its methods take paths relative to that root, '/'-separated ("" is the root).
Objects of both kinds are plain strings inside, so a Storage travels to Ray actors and ranks as it is; each process
opens the store itself (fsspec caches the filesystem per process).

Writes are whole or nothing on both:
- POSIX: written under a temporary name in the same folder, then renamed (`nayer.runtime.atomic_write`).
- Object store: written to a local temporary file, then uploaded by one `put_file`: a single PUT, or a multipart
  upload that the store completes only after its last part, so a reader sees the whole object or none and a killed
  writer leaves no object behind. (A multipart upload killed half-way, over 50 MB, leaves its parts, which S3 bills
  until a bucket lifecycle rule aborts incomplete uploads.)
Listings of a store are never cached: other processes (actors, ranks) add objects that a cached listing would hide.
Credentials and the endpoint come from the usual environment on every node (AWS_ACCESS_KEY_ID,
AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL for an S3-compatible server; GOOGLE_APPLICATION_CREDENTIALS; ...).
"""

from __future__ import annotations

import fnmatch
import glob
import hashlib
import json
import os
import posixpath
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Protocol, Sequence

from nayer.cli_config import ConfigError
from nayer.runtime import append_jsonl, atomic_write

Writer = Callable[[str], None]  # writes a whole file at the local path it is given


class Storage(Protocol):
    """A folder of files (a POSIX directory or an object store prefix). Paths are relative to `root`."""

    root: str  # the absolute folder or the URL, as messages print it

    def location(self, rel: str = "") -> str:
        """The full path or URL of `rel`: what messages name, and what other libraries (Ray Train) are handed."""

    def sub(self, rel: str) -> "Storage":
        """The storage rooted at the folder `rel` of this one."""

    def read_bytes(self, rel: str) -> bytes | None:
        """The file's bytes (None: there is no such file)."""

    def size(self, rel: str) -> int | None:
        """The file's size in bytes (None: there is no such file)."""

    def exists(self, rel: str) -> bool: ...

    def sha256(self, rel: str) -> str | None:
        """The file's sha256 (None: there is no such file)."""

    def write_whole(self, rel: str, write: Writer) -> str:
        """`write(local_file)`, then make it `rel` at once; returns its location."""

    def write_bytes(self, rel: str, data: bytes) -> str: ...

    def put(self, local: Path, rel: str) -> None:
        """A copy of the local file `local` as `rel`, written whole."""

    def append_jsonl(self, rel: str, record: dict) -> None:
        """One record at the end of a JSONL log (its folder made if missing)."""

    def create_exclusive(self, rel: str) -> bool:
        """Create an empty file unless it exists; True if this call created it."""

    def flip_byte(self, rel: str) -> None:
        """Invert the byte in the middle of a file, as bit rot does it (fault drills)."""

    def listing(self, pattern: str) -> list[str]:
        """The files whose relative path matches `pattern` segment by segment (`*` stays within one folder), sorted;
        the root itself is no pattern, whatever characters it holds."""

    def subfolders(self, rel: str = "") -> list[str]:
        """The names of the folders directly under `rel`."""

    def remove(self, rel: str) -> None:
        """Delete a file if it is there."""

    def remove_tree(self, rel: str = "") -> None:
        """Delete a folder and everything under it, if it is there."""

    def remove_empty_folders(self, pattern: str) -> None:
        """Delete the folders matching `pattern` that hold nothing (an object store has no empty folders)."""

    def move(self, rel: str, to: str) -> None:
        """A rename on POSIX; a copy and a delete on an object store (which has no rename)."""

    def local_path(self, rel: str = "") -> Path | None:
        """`rel` on this machine's file system (what a process may memory-map), or None on an object store."""

    def require_local(self, refusal: str) -> Path:
        """The root as a local folder; a ConfigError saying `refusal` if it is on an object store."""

    def working_copy(self, staging_dir: str, pull: Sequence[str]) -> "WorkingCopy":
        """A local folder for files one process writes with plain file APIs (config, metrics, TensorBoard, its own
        checkpoint): the root itself on POSIX; on an object store a staging folder under `staging_dir` (the system
        temp folder if empty), rebuilt from the store's `pull` files and folders."""


def open_storage(location: str | os.PathLike[str]) -> Storage:
    """The storage at `location`: an object store for `scheme://...`, else a POSIX folder (made absolute)."""
    text = str(location)
    if "://" in text:
        return FsspecStorage(text.rstrip("/"))
    return PosixStorage(str(Path(text).resolve()))


def as_storage(location: "Storage | str | os.PathLike[str]") -> Storage:
    """`location` as a Storage (a Storage is returned as it is)."""
    return location if isinstance(location, (PosixStorage, FsspecStorage)) else open_storage(location)


@dataclass(frozen=True)
class WorkingCopy:
    """A local folder holding files of a storage: `push(rels)` makes the storage's copies of them current."""

    path: Path
    store: Storage

    def pull(self, *rels: str) -> None:
        """The storage's current copies of files `rels` into the local folder."""
        if self.store.local_path() == self.path:
            return
        for rel in rels:
            if (data := self.store.read_bytes(rel)) is not None:
                (self.path / rel).parent.mkdir(parents=True, exist_ok=True)
                (self.path / rel).write_bytes(data)

    def push(self, *rels: str) -> None:
        """Upload each file, or every file under each folder, whole (nothing to do where `path` is the storage)."""
        if self.store.local_path() == self.path:
            return
        for rel in rels:
            local = self.path / rel
            files = [local] if local.is_file() else sorted(p for p in local.rglob("*") if p.is_file())
            for file in files:
                self.store.put(file, file.relative_to(self.path).as_posix())


@dataclass(frozen=True)
class PosixStorage:
    """A folder on a POSIX file system (local, or shared by the nodes: NFS, Lustre, ...)."""

    root: str

    def _path(self, rel: str) -> Path:
        return Path(self.root, rel) if rel else Path(self.root)

    def location(self, rel: str = "") -> str:
        return str(self._path(rel))

    def sub(self, rel: str) -> "PosixStorage":
        return PosixStorage(self.location(rel))

    def read_bytes(self, rel: str) -> bytes | None:
        try:
            return self._path(rel).read_bytes()
        except FileNotFoundError:
            return None

    def size(self, rel: str) -> int | None:
        path = self._path(rel)
        return path.stat().st_size if path.is_file() else None

    def exists(self, rel: str) -> bool:
        return self.size(rel) is not None

    def sha256(self, rel: str) -> str | None:
        digest = hashlib.sha256()
        try:
            with open(self._path(rel), "rb") as f:  # streamed: a shard is never read whole for its checksum
                for block in iter(lambda: f.read(1 << 20), b""):
                    digest.update(block)
        except FileNotFoundError:
            return None
        return digest.hexdigest()

    def write_whole(self, rel: str, write: Writer) -> str:
        return str(atomic_write(self._path(rel), write))

    def write_bytes(self, rel: str, data: bytes) -> str:
        return self.write_whole(rel, lambda tmp: Path(tmp).write_bytes(data))

    def put(self, local: Path, rel: str) -> None:
        self.write_whole(rel, lambda tmp: shutil.copyfile(local, tmp))

    def append_jsonl(self, rel: str, record: dict) -> None:
        self._path(rel).parent.mkdir(parents=True, exist_ok=True)
        append_jsonl(record, self._path(rel))

    def create_exclusive(self, rel: str) -> bool:
        path = self._path(rel)
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            return False
        return True

    def flip_byte(self, rel: str) -> None:
        path = self._path(rel)
        with open(path, "r+b") as f:  # one byte, in place
            f.seek(path.stat().st_size // 2)
            byte = f.read(1)
            f.seek(-1, os.SEEK_CUR)
            f.write(bytes([byte[0] ^ 0xFF]))

    def listing(self, pattern: str) -> list[str]:
        matches = glob.glob(os.path.join(glob.escape(self.root), pattern))
        return sorted(Path(p).relative_to(self.root).as_posix() for p in matches if os.path.isfile(p))

    def subfolders(self, rel: str = "") -> list[str]:
        path = self._path(rel)
        return sorted(p.name for p in path.iterdir() if p.is_dir()) if path.is_dir() else []

    def remove(self, rel: str) -> None:
        self._path(rel).unlink(missing_ok=True)

    def remove_tree(self, rel: str = "") -> None:
        shutil.rmtree(self._path(rel), ignore_errors=True)

    def remove_empty_folders(self, pattern: str) -> None:
        for folder in Path(self.root).glob(pattern):
            if folder.is_dir() and not any(folder.iterdir()):
                folder.rmdir()

    def move(self, rel: str, to: str) -> None:
        target = self._path(to)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(self._path(rel)), str(target))

    def local_path(self, rel: str = "") -> Path:
        return self._path(rel)

    def require_local(self, refusal: str) -> Path:
        return Path(self.root)

    def working_copy(self, staging_dir: str, pull: Sequence[str]) -> WorkingCopy:
        return WorkingCopy(Path(self.root), self)


@dataclass(frozen=True)
class FsspecStorage:
    """A prefix of an object store, through fsspec (s3://, gs://, az://, ...)."""

    root: str  # scheme://bucket/prefix, no trailing slash

    def _fs(self, rel: str = ""):
        """(fsspec filesystem, path within it) of `rel`; listings uncached (see the module docstring)."""
        import fsspec

        return fsspec.core.url_to_fs(self.location(rel), use_listings_cache=False)

    def location(self, rel: str = "") -> str:
        return posixpath.join(self.root, rel) if rel else self.root

    def sub(self, rel: str) -> "FsspecStorage":
        return FsspecStorage(self.location(rel).rstrip("/"))

    def read_bytes(self, rel: str) -> bytes | None:
        fs, path = self._fs(rel)
        try:
            return fs.cat_file(path)
        except FileNotFoundError:
            return None

    def size(self, rel: str) -> int | None:
        fs, path = self._fs(rel)
        try:
            return fs.size(path)
        except FileNotFoundError:
            return None

    def exists(self, rel: str) -> bool:
        return self.size(rel) is not None

    def sha256(self, rel: str) -> str | None:
        data = self.read_bytes(rel)
        return None if data is None else hashlib.sha256(data).hexdigest()

    def write_whole(self, rel: str, write: Writer) -> str:
        fs, path = self._fs(rel)
        with tempfile.TemporaryDirectory(prefix="nayer-upload-") as tmp:
            local = str(Path(tmp) / posixpath.basename(path))
            write(local)
            fs.put_file(local, path)
        return self.location(rel)

    def write_bytes(self, rel: str, data: bytes) -> str:
        return self.write_whole(rel, lambda tmp: Path(tmp).write_bytes(data))

    def put(self, local: Path, rel: str) -> None:
        fs, path = self._fs(rel)
        fs.put_file(str(local), path)  # one upload of a complete file

    def append_jsonl(self, rel: str, record: dict) -> None:
        """The object written again whole with the record (an object cannot grow; a log of a line per round stays
        small)."""
        self.write_bytes(rel, (self.read_bytes(rel) or b"") + (json.dumps(record) + "\n").encode())

    def create_exclusive(self, rel: str) -> bool:
        """Not atomic (an object store has no exclusive create): enough for one process at a time a name."""
        if self.exists(rel):
            return False
        self.write_bytes(rel, b"")
        return True

    def flip_byte(self, rel: str) -> None:
        data = bytearray(self.read_bytes(rel) or b"")  # an object is only ever replaced whole
        data[len(data) // 2] ^= 0xFF
        self.write_bytes(rel, bytes(data))

    def listing(self, pattern: str) -> list[str]:
        fs, path = self._fs()
        parts = pattern.split("/")
        found = fs.find(path, maxdepth=len(parts)) if fs.exists(path) else []  # one listing, files only
        relative = (posixpath.relpath(key, path) for key in found)
        return sorted(rel for rel in relative if _matches(rel.split("/"), parts))

    def subfolders(self, rel: str = "") -> list[str]:
        fs, path = self._fs(rel)
        if not fs.exists(path):
            return []
        return sorted(posixpath.basename(e["name"].rstrip("/")) for e in fs.ls(path, detail=True)
                      if e["type"] == "directory")

    def remove(self, rel: str) -> None:
        fs, path = self._fs(rel)
        try:
            fs.rm_file(path)
        except FileNotFoundError:
            pass

    def remove_tree(self, rel: str = "") -> None:
        fs, path = self._fs(rel)
        if fs.exists(path):
            fs.rm(path, recursive=True)

    def remove_empty_folders(self, pattern: str) -> None:
        """Nothing to do: a prefix exists only while an object has it."""

    def move(self, rel: str, to: str) -> None:
        fs, path = self._fs(rel)
        fs.mv(path, self._fs(to)[1])

    def local_path(self, rel: str = "") -> None:
        return None

    def require_local(self, refusal: str) -> Path:
        raise ConfigError(refusal)

    def working_copy(self, staging_dir: str, pull: Sequence[str]) -> WorkingCopy:
        local = self.staging_folder(staging_dir)
        shutil.rmtree(local, ignore_errors=True)  # the store holds the run; this copy is rebuilt from it
        for rel in pull:
            self._download(rel, local / rel)
        return WorkingCopy(local, self)

    def staging_folder(self, staging_dir: str) -> Path:
        """Under `staging_dir` (else the system temp folder): readable, and unique by a hash of the parent URL
        (s3://a/b_c and s3://a_b/c clean alike)."""
        root = Path(staging_dir) if staging_dir else Path(tempfile.gettempdir()) / "nayer-staging"
        parent = posixpath.dirname(self.root)
        readable = re.sub(r"[^\w.-]+", "_", parent)[-80:]
        return root / f"{readable}-{hashlib.sha256(parent.encode()).hexdigest()[:10]}" / posixpath.basename(self.root)

    def _download(self, rel: str, local: Path) -> None:
        """The object `rel`, or every object under the prefix `rel`, to the same relative path under `local`."""
        fs, path = self._fs(rel)
        if not fs.exists(path):
            return
        for key in fs.find(path):
            target = local / posixpath.relpath(key, path) if key != path else local
            target.parent.mkdir(parents=True, exist_ok=True)
            fs.get_file(key, str(target))


def _matches(segments: list[str], parts: list[str]) -> bool:
    return len(segments) == len(parts) and all(fnmatch.fnmatchcase(s, p) for s, p in zip(segments, parts))
