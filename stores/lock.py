"""One writer per store: an exclusive lock record in ``STORE.partial/lock.json``.

Two builds writing one ``--out`` at once corrupt it (each deletes the other's uncommitted shards, both
publish), so the build's first write is a lock record created atomically — ``O_CREAT | O_EXCL`` on a
local disk, a conditional PUT (``If-None-Match: *``) on S3, ``xb`` on ``memory://`` — holding the owner's
host, pid and start time. A second writer fails naming the owner. A lock left by a build that died is
taken over: automatically when its pid is gone from this host; with ``--resume`` (the user vouching that
the owner is gone) when it was made on another host, whose processes cannot be seen from here.

Other fsspec filesystems have no atomic create: there the check-then-write is best effort, and one
writer per store is the user's rule to keep.

Example:
    >>> with StoreLock(Location("runs/store.partial")).held(resume=False):
    ...     ...  # write units, finalize
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import json
import os
import socket
import uuid
from collections.abc import Iterator
from typing import Any

from stores.location import Location

__all__ = ["LOCK", "StoreLock", "StoreLockedError"]

LOCK = "lock.json"


class StoreLockedError(RuntimeError):
    """Another build holds the store's lock; the message names it and what to do."""


class StoreLock:
    """The lock record ``lock.json`` of the partial store ``partial``, taken by one build (rank 0 of its job)."""

    def __init__(self, partial: Location):
        self.partial = partial
        self.record = {"host": socket.gethostname(), "pid": os.getpid(), "token": uuid.uuid4().hex,
                       "started": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")}

    @contextlib.contextmanager
    def held(self, *, resume: bool = False) -> Iterator[StoreLock]:
        """Hold the lock for the block; released when it ends, by success or by error."""
        self.acquire(resume=resume)
        try:
            yield self
        finally:
            self.release()

    def acquire(self, *, resume: bool = False) -> None:
        """Take the lock, or take over one whose owner is gone; else raise ``StoreLockedError`` naming the owner."""
        self.partial.makedirs()
        data = json.dumps(self.record).encode()
        if self.partial.create_exclusive(LOCK, data):
            return
        owner = self.owner()
        if owner is not None and not self._is_stale(owner, resume):
            raise StoreLockedError(self._held_message(owner))
        if not self._replace(owner, data):
            raise StoreLockedError(self._held_message(self.owner() or {}))

    def release(self) -> None:
        """Remove the lock if it is still this build's (a build that took it over keeps its own)."""
        owner = self.owner()
        if owner is not None and owner.get("token") == self.record["token"]:
            self.partial.remove(LOCK)
            if self.partial.is_local:  # nothing was built (the store was found published): no empty STORE.partial
                with contextlib.suppress(OSError):
                    os.rmdir(self.partial.root)

    def owner(self) -> dict[str, Any] | None:
        """The lock record (``{}`` when unreadable: a writer killed mid-write), or None when there is none."""
        try:
            text = self.partial.read_bytes(LOCK)[:4096]
        except FileNotFoundError:
            return None
        try:
            record = json.loads(text)
        except ValueError:
            return {}
        return record if isinstance(record, dict) else {}

    def _is_stale(self, owner: dict[str, Any], resume: bool) -> bool:
        """Its owner is gone: a pid that no longer runs on this host, or (``--resume``) any other host's build."""
        if owner.get("host") != self.record["host"] or not isinstance(owner.get("pid"), int):
            return resume
        return not _pid_alive(owner["pid"])

    def _replace(self, stale: dict[str, Any] | None, data: bytes) -> bool:
        """Swap the stale record for ours; False when another build took it over first.

        On disk the stale file is first renamed aside (one rename wins) and checked to be the record judged
        stale; object storage has no conditional delete, so there the record is overwritten."""
        if not self.partial.is_local:
            self.partial.write_bytes(LOCK, data)
            return True
        path = self.partial.path(LOCK)
        aside = f"{path}.{self.record['token']}"
        try:
            os.rename(path, aside)
        except FileNotFoundError:  # released meanwhile: an ordinary create
            return self.partial.create_exclusive(LOCK, data)
        try:
            with open(aside, "rb") as f:
                moved = json.loads(f.read(4096) or b"{}")
        except ValueError:
            moved = {}
        if stale is not None and moved != stale:  # a fresh lock taken meanwhile: give it back
            with contextlib.suppress(FileExistsError):
                os.link(aside, path)
            os.unlink(aside)
            return False
        os.unlink(aside)
        return self.partial.create_exclusive(LOCK, data)

    def _held_message(self, owner: dict[str, Any]) -> str:
        where = self.partial.where(LOCK)
        if not owner:
            return f"{where} exists but is unreadable; if no build is writing this store, rerun with --resume"
        who = f"pid {owner.get('pid')} on host {owner.get('host')!r} since {owner.get('started')}"
        if owner.get("host") == self.record["host"]:
            return (f"another build ({who}) is writing this store (lock {where}); wait for it to finish (if pid "
                    f"{owner.get('pid')} is no build, delete the lock)")
        return (f"another build ({who}) is writing this store (lock {where}); wait for it, or if that build "
                "is gone, rerun with --resume to take its lock over")


def _pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists on this host (a zombie counts as gone)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[-1].split()[0] != "Z"
    except OSError as error:
        return error.errno != errno.ENOENT
