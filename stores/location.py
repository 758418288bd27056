"""Where a store lives: a local directory or any fsspec URL (``s3://bucket/prefix``, ``gs://``, ``memory://``).

Every file operation of the writer, the reader and ``stores verify`` goes through ``Location``, so a
store on object storage is built, published, read and verified by the same code as one on disk.
Object stores have no rename: ``publish`` copies every file server-side and writes ``manifest.json``
last, so a reader (who opens a store by its manifest) never sees a half-published store.

S3-compatible servers are chosen the way botocore chooses them (``AWS_ENDPOINT_URL``,
``AWS_ACCESS_KEY_ID``, ``~/.aws/config``); nothing here is S3-specific.
"""

from __future__ import annotations

import hashlib
import os
import posixpath
from pathlib import Path
from typing import Any

import fsspec

from stores.errors import InputError

__all__ = ["Location"]


class Location:
    """A directory on a (possibly remote) filesystem; ``rel`` paths below it are POSIX and never leave it."""

    def __init__(self, url: str | os.PathLike):
        self.url = str(url).rstrip("/") if "://" in str(url) else os.path.abspath(url)
        # no listings cache on remote filesystems: other ranks and machines write the same prefixes
        options = {"use_listings_cache": False} if "://" in self.url and not self.url.startswith("file://") else {}
        try:
            self.fs, self.root = fsspec.core.url_to_fs(self.url, **options)
        except ValueError as error:  # fsspec: an unknown protocol, a malformed URL
            raise InputError(f"{self.url}: {error}") from None
        except ImportError as error:  # fsspec: the protocol's package (s3fs, gcsfs) is not installed
            raise ImportError(f"{self.url}: {error}") from None
        self.is_local = "file" in _protocols(self.fs)

    def __repr__(self) -> str:
        return f"Location({self.url!r})"

    def __str__(self) -> str:
        return self.url

    @property
    def name(self) -> str:
        return posixpath.basename(self.root.rstrip("/"))

    @property
    def parent(self) -> Location:
        return Location(posixpath.dirname(self.url) if not self.is_local else os.path.dirname(self.url))

    def sibling(self, name: str) -> Location:
        """``name`` beside this directory (``STORE.partial`` beside ``STORE``)."""
        return Location(posixpath.join(self.parent.url, name))

    def child(self, rel: str) -> Location:
        return Location(self.path(rel) if self.is_local else f"{self.url}/{rel}")

    def path(self, rel: str = "") -> str:
        """The filesystem path of ``rel`` (for messages and for the fsspec calls)."""
        return posixpath.join(self.root, rel) if rel else self.root

    def where(self, rel: str = "") -> str:
        """``rel`` as the user would write it: a local path or a URL."""
        return os.path.join(self.url, rel) if self.is_local else (f"{self.url}/{rel}" if rel else self.url)

    def exists(self, rel: str = "") -> bool:
        return self.fs.exists(self.path(rel))

    def read_bytes(self, rel: str) -> bytes:
        return self.fs.cat_file(self.path(rel))

    def read_text(self, rel: str) -> str:
        return self.read_bytes(rel).decode()

    def write_bytes(self, rel: str, data: bytes) -> None:
        """Write ``rel`` whole: a reader sees the old file or the new one, never a part (local: fsync + rename;
        an object store's PUT is already atomic)."""
        if not self.is_local:
            self.fs.pipe_file(self.path(rel), data)
            return
        target = Path(self.path(rel))
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(target.name + ".tmp")
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)

    def create_exclusive(self, rel: str, data: bytes) -> bool:
        """Create ``rel`` holding ``data`` only if it does not exist; False when it does. Atomic on a local disk
        (``O_EXCL``), on S3 (a PUT with ``If-None-Match: *``) and in memory; elsewhere check-then-write."""
        try:
            if self.is_local:
                os.makedirs(os.path.dirname(self.path(rel)), exist_ok=True)
                descriptor = os.open(self.path(rel), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
                with os.fdopen(descriptor, "wb") as f:
                    f.write(data)
            else:
                self.fs.pipe_file(self.path(rel), data, mode="create")
        except FileExistsError:
            return False
        return True

    def write_text(self, rel: str, text: str) -> None:
        self.write_bytes(rel, text.encode())

    def open(self, rel: str, mode: str = "rb") -> Any:
        return self.fs.open(self.path(rel), mode)

    def makedirs(self, rel: str = "") -> None:
        if self.is_local:  # object stores have no directories
            os.makedirs(self.path(rel), exist_ok=True)

    def listdir(self, rel: str = "") -> list[str]:
        """Names directly under ``rel``, in one listing (empty when it does not exist)."""
        try:
            entries = self.fs.ls(self.path(rel), detail=False, refresh=True) if not self.is_local else \
                os.listdir(self.path(rel))
        except FileNotFoundError:
            return []
        return sorted(posixpath.basename(e.rstrip("/")) for e in entries)

    def file_sizes(self) -> dict[str, int]:
        """Every file below the root with its size, from one recursive listing."""
        try:
            found = self.fs.find(self.root, detail=True)
        except FileNotFoundError:
            return {}
        prefix = self.root.rstrip("/") + "/"
        return {path[len(prefix):]: int(info["size"]) for path, info in found.items()
                if info.get("type", "file") == "file" and path.startswith(prefix)}

    def symlinks(self) -> list[str]:
        """Symbolic links below a local root (object stores have none), relative to it."""
        if not self.is_local:
            return []
        return sorted(os.path.relpath(os.path.join(folder, name), self.root)
                      for folder, dirs, files in os.walk(self.root) for name in [*dirs, *files]
                      if os.path.islink(os.path.join(folder, name)))

    def sha256(self, rel: str) -> str:
        digest = hashlib.sha256()
        with self.open(rel) as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        return digest.hexdigest()

    def remove(self, rel: str = "") -> None:
        """Delete ``rel`` (a file or a whole directory) if it exists."""
        if self.exists(rel):
            self.fs.rm(self.path(rel), recursive=True)

    def zarr_store(self, rel: str, *, read_only: bool):
        """A zarr v3 store over ``rel``: ``LocalStore`` on disk, ``FsspecStore`` (async) on object storage."""
        import zarr.storage

        if self.is_local:
            return zarr.storage.LocalStore(self.path(rel), read_only=read_only)
        return zarr.storage.FsspecStore.from_url(self.where(rel), read_only=read_only)

    def publish_to(self, final: Location, last: str, leave: str = "") -> None:
        """Make this directory ``final``: a rename on disk; on object storage a server-side copy of every
        file, ``last`` (the manifest) copied after all others, then this directory removed. ``leave`` (the
        writer's lock) is not published: on disk it moves with the rename, held to the end, and is removed
        from ``final`` at once; on object storage it is not copied and goes with this directory."""
        if self.is_local and final.is_local:
            os.replace(self.root, final.root)
            if leave:
                final.remove(leave)
            return
        files = sorted((rel for rel in self.file_sizes() if rel != leave), key=lambda rel: rel == last)
        for rel in files:
            self.fs.copy(self.path(rel), final.path(rel))
        self.remove()


def _protocols(fs: fsspec.AbstractFileSystem) -> tuple[str, ...]:
    protocol = fs.protocol
    return (protocol,) if isinstance(protocol, str) else tuple(protocol)
