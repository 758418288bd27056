"""A catalog of reinforced stores: every published store directly under a root folder or URL.

A store is published when its ``manifest.json`` exists (it is written last), so the catalog is one
listing of the root plus one manifest read per store; nothing else needs to be kept in sync.
``reinforce.build`` asks ``find_store`` for its store id before running a teacher.

Example:
    >>> for row in list_stores("s3://bucket/stores"):
    ...     print(row["name"], row["store_id"], row["teacher"], row["views"])
"""

from __future__ import annotations

import hashlib
import os
from typing import Any

from stores.location import Location
from stores.store import MANIFEST, StoreCorruptError, StoreFormatError, open_store, read_manifest

__all__ = ["find_store", "list_stores", "publish_store"]


def _published(root: Location) -> list[Location]:
    return [child for name in root.listdir() if not name.endswith(".partial")
            and (child := root.child(name)).exists(MANIFEST)]


def list_stores(root: str | os.PathLike | Location) -> list[dict[str, Any]]:
    """One row per published store under ``root``: name, location, id, teacher, transfer set, target kinds,
    views, samples, bytes, created. A store whose manifest does not parse is listed with its error."""
    root = root if isinstance(root, Location) else Location(root)
    rows = []
    for store in _published(root):
        try:
            manifest = read_manifest(store)
        except StoreFormatError as error:
            rows.append({"name": store.name, "location": store.url, "error": str(error)})
            continue
        content = manifest.content
        rows.append({
            "name": store.name, "location": store.url, "store_id": manifest.store_id, "format": manifest.format,
            "teacher": content.teacher.name, "transfer_set": content.transfer_set.spec,
            "targets": {name: target.kind for name, target in content.targets.items()},
            "views": content.views, "samples": manifest.summary["samples"], "ok": manifest.summary["ok"],
            "bytes": sum(f.bytes for f in manifest.files), "created_at": manifest.created_at,
            "lineage": content.lineage,
        })
    return rows


def find_store(root: str | os.PathLike | Location, store_id: str, store_format: str | None = None) -> Location | None:
    """The published store under ``root`` whose id is ``store_id`` (and, given, whose format is ``store_format``:
    a zarr store and its webdataset export share an id), or None."""
    root = root if isinstance(root, Location) else Location(root)
    for row in list_stores(root):
        if row.get("store_id") == store_id and store_format in (None, row.get("format")):
            return Location(row["location"])
    return None


def publish_store(source: str | os.PathLike | Location, destination: str | os.PathLike | Location) -> Location:
    """Copy the published store ``source`` to ``destination`` (e.g. from disk to ``s3://bucket/stores/NAME``).

    Only the files its manifest lists are copied, each checked against its sha256 on the way, and
    ``manifest.json`` last: until the copy is complete nobody can open the destination. An existing store
    at the destination is never overwritten.
    """
    store = open_store(source)
    target = destination if isinstance(destination, Location) else Location(destination)
    if target.exists(MANIFEST):
        raise ValueError(f"{target.url} already holds a published store; publish under another name")
    for record in store.manifest.files:  # every file but the manifest itself
        data = store.location.read_bytes(record.path)
        if hashlib.sha256(data).hexdigest() != record.sha256:
            raise StoreCorruptError(f"{store.location.where(record.path)}: sha256 differs from the manifest; "
                                    "not published")
        target.write_bytes(record.path, data)
    target.write_bytes(MANIFEST, store.location.read_bytes(MANIFEST))
    return target
