"""Reinforced stores as webdataset tar shards: for streaming, and for transfer sets too large for random access.

A wds store has the zarr store's ``manifest.json`` (same content, so the same store id; ``layout.format
"wds"``) and ``samples.parquet``, and instead of ``targets.zarr/`` the shards ``shards/shard-%06d.tar``.
Shard u holds the usable (status ok) samples of unit u, each as the tar members

    KEY.header.json            {"index", "key", "uri", "height", "width"}  (KEY: the sample index, 9 digits)
    KEY.image.EXT              the image's bytes: the source file's own, or a lossless PNG where it has none
    KEY.theta.npy              uint8 [K, P]: the policy's packed θ of every view
    KEY.TARGET.npy             [K] structured, one field per stored array of the target, as the codec wrote
                               it (``logits.npy["values"]``: uint8 [K, k], ...): one member per target, since
                               parsing a tar member costs as much as decoding a small image

Members are plain ``.npy``/``.json``/image files, so plain ``webdataset`` reads them with ``WDS_SECURE=1``.
``WdsWriter`` follows ``StoreWriter``'s create / write_unit / finalize protocol (a unit is one shard: resumable,
rank-split); ``export_wds`` copies a zarr store. Like the rest of ``stores``, nothing here knows images or
augmentation: image bytes come from a ``load_bytes(index) -> (bytes, extension)`` callable.

Example:
    >>> export_wds(open_store("runs/fmnist"), "runs/fmnist-wds", source.encoded, maxsize=256 << 20)
"""

from __future__ import annotations

import io
import os
import tarfile
from collections.abc import Callable, Collection, Iterator
from typing import Any

import numpy as np
import webdataset as wds
from webdataset.autodecode import Decoder
from webdataset.tariterators import group_by_keys, tar_file_expander

from stores.location import Location
from stores.manifest import WDS_FORMAT, StoreContent, StoreManifest
from stores.store import MANIFEST, SHARDS_DIR, THETA, ReinforcedStore, StoreCorruptError, StoreWriter, array_paths

__all__ = ["WdsWriter", "export_wds", "read_shard", "sample_arrays"]

LoadBytes = Callable[[int], tuple[bytes, str]]
HEADER_FIELDS = ("index", "key", "uri", "height", "width")
_DECODE = Decoder([])  # webdataset's basic handlers: .npy without pickle, .json; image bytes stay bytes


def shard_path(unit: int) -> str:
    return f"{SHARDS_DIR}/shard-{unit:06d}.tar"


def _member(name: str) -> str:
    """``"theta"`` / a target name -> its tar member suffix ``theta.npy`` / ``logits.npy``."""
    return f"{name}.npy"


def sample_members(row: dict[str, Any], image: tuple[bytes, str], arrays: dict[str, np.ndarray]) -> dict[str, Any]:
    """One sample's members for ``wds.TarWriter``: header, image bytes, θ and one structured ``[K]`` array per
    target (``arrays``: ``{"theta" or "target/array": [K, ...]}``)."""
    data, extension = image
    targets: dict[str, dict[str, np.ndarray]] = {}
    for name, values in arrays.items():
        if name != THETA:
            target, _, array = name.partition("/")
            targets.setdefault(target, {})[array] = values
    members = {_member(THETA): arrays[THETA]}
    for target, fields in targets.items():
        record = np.empty(len(arrays[THETA]), dtype=[(a, v.dtype, v.shape[1:]) for a, v in fields.items()])
        for a, v in fields.items():
            record[a] = v
        members[_member(target)] = record
    return {"__key__": f"{row['index']:09d}", "header.json": {k: row[k] for k in HEADER_FIELDS},
            f"image.{extension}": data, **members}


def sample_arrays(sample: dict[str, Any], content: StoreContent,
                  targets: tuple[str, ...] | list[str]) -> dict[str, Any]:
    """A decoded sample's ``{"theta": [K, P], target: {array: [K, ...]}}`` for ``targets`` (the inverse of
    ``sample_members``), in ``ReinforcedStore.read``'s nesting."""
    return {THETA: sample[_member(THETA)],
            **{t: {a: sample[_member(t)][a] for a in content.targets[t].arrays} for t in targets}}


def image_bytes(sample: dict[str, Any]) -> bytes:
    """The one ``image.EXT`` member of a sample."""
    return next(value for key, value in sample.items() if key.startswith("image."))


def read_shard(location: Location, rel: str, targets: Collection[str] | None = None) -> Iterator[dict[str, Any]]:
    """The decoded samples of one shard (``.npy`` -> arrays, ``header.json`` -> dict, image bytes kept),
    through webdataset's tar reader; a truncated or corrupt tar raises ``StoreCorruptError`` naming it.

    ``targets`` limits the ``.npy`` members decoded to θ and those targets': a reader of one target does not
    parse the others (default: all)."""
    where = location.where(rel)
    wanted = None if targets is None else {_member(name) for name in (THETA, *targets)}
    try:
        with location.open(rel) as stream:
            for sample in group_by_keys(tar_file_expander([{"url": where, "stream": stream}])):
                if wanted is not None:
                    sample = {k: v for k, v in sample.items() if not k.endswith(".npy") or k in wanted}
                yield _DECODE(sample)
    except (tarfile.TarError, OSError, EOFError, ValueError) as error:
        raise StoreCorruptError(f"{where}: truncated or corrupt tar shard ({type(error).__name__}: "
                                f"{str(error.args[0]).partition(' @ ')[0] if error.args else error}); "
                                f"run `python -m stores verify {location.url}`") from None


class WdsWriter(StoreWriter):
    """``StoreWriter`` whose unit is one tar shard of ``unit_samples`` samples (skipped samples are left out:
    they have no image). The shard is built in memory and written whole, then its marker: a crash leaves
    no partial shard a resume would trust, and ranks writing disjoint units never touch one file.

    Args:
        load_bytes: sample index -> (encoded image bytes, file extension), e.g. ``Source.encoded``.
    """

    def __init__(self, url: str | os.PathLike | Location, content: StoreContent, load_bytes: LoadBytes, *,
                 unit_samples: int = 1024):
        super().__init__(url, content, unit_samples=unit_samples, chunk_samples=unit_samples)
        self.layout = {"format": WDS_FORMAT, "unit_samples": unit_samples}
        self.load_bytes = load_bytes

    def _create_data(self) -> None:
        self.partial.makedirs(SHARDS_DIR)

    def _write_data(self, unit: int, arrays: dict[str, np.ndarray], rows: list[dict[str, Any]]) -> None:
        buffer = io.BytesIO()
        with wds.TarWriter(buffer, mtime=0) as tar:  # fixed mtime: the same unit gives the same bytes
            for offset, row in enumerate(rows):
                if row["status"] == "ok":
                    tar.write(sample_members(row, self.load_bytes(row["index"]),
                                             {name: arrays[name][offset] for name in self.arrays}))
        self.partial.write_bytes(shard_path(unit), buffer.getvalue())

    def _seal(self) -> None:
        """Nothing to consolidate: the manifest's file list is the shard index."""


def export_wds(store: ReinforcedStore, out: str | os.PathLike | Location, load_bytes: LoadBytes, *,
               maxsize: int = 256 << 20, maxcount: int = 100_000) -> StoreManifest:
    """Copy a zarr store into webdataset shards at ``out`` (resumable: rerun after a crash); same store id.

    Shards hold a fixed number of samples, chosen from the first usable sample's encoded size so that a shard
    is about ``maxsize`` bytes, and at most ``maxcount`` samples.
    """
    target = out if isinstance(out, Location) else Location(out)
    if target.exists(MANIFEST):
        raise ValueError(f"{target.url} already holds a published store; choose another --out")
    samples = store.samples
    rows = samples.to_dicts()
    ok = samples.filter(samples["status"] == "ok")["index"].to_list()
    if not ok:
        raise ValueError(f"store {store.path} has no usable samples to export")
    first = store.read_range(ok[0], ok[0] + 1)
    members = sample_members(rows[ok[0]], load_bytes(ok[0]), {name: a[0] for name, a in first.items()})
    encoded = wds.writer.encode_based_on_extension(members, wds.writer.default_handlers)
    per_sample = sum(512 + -(-len(v) // 512) * 512 for k, v in encoded.items() if not k.startswith("__"))
    writer = WdsWriter(target, store.manifest.content, load_bytes,
                       unit_samples=max(1, min(maxcount, maxsize // per_sample, store.manifest.num_samples)))
    writer.create()
    for unit in writer.pending_units():
        span = writer.unit_range(unit)
        arrays = store.read_range(span.start, span.stop)
        writer.write_unit(unit, {name: arrays[name] for name in array_paths(store.manifest.content)},
                          rows[span.start: span.stop])
    return writer.finalize(store.manifest.library_version, fidelity=store.manifest.summary["fidelity"])
