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
This library reads them with its own decoder (``read_shard``): only these members, checked against the
manifest, never webdataset's pickle or gunzip handlers, whatever ``WDS_SECURE`` says.
``WdsWriter`` follows ``StoreWriter``'s create / write_unit / finalize protocol (a unit is one shard: resumable,
rank-split); ``export_wds`` copies a zarr store. Like the rest of ``stores``, nothing here knows images or
augmentation: image bytes come from a ``load_bytes(index) -> (bytes, extension)`` callable.

Example:
    >>> export_wds(open_store("runs/fmnist"), "runs/fmnist-wds", source.encoded, maxsize=256 << 20)
"""

from __future__ import annotations

import dataclasses
import io
import os
import re
import tarfile
from collections.abc import Callable, Collection, Iterator
from typing import Any

import numpy as np
import webdataset as wds

from stores.codecs import create_codec
from stores.location import Location
from stores.manifest import WDS_FORMAT, StoreContent, StoreManifest
from stores.store import MANIFEST, SHARDS_DIR, THETA, ReinforcedStore, StoreCorruptError, StoreWriter, array_paths
from stores.untrusted import UntrustedInputError, load_json, printable

__all__ = ["ShardSample", "WdsWriter", "export_wds", "read_shard"]

LoadBytes = Callable[[int], tuple[bytes, str]]
HEADER_FIELDS = ("index", "key", "uri", "height", "width")
MAX_HEADER_BYTES = 64 << 10
MAX_IMAGE_BYTES = 256 << 20
NPY_HEADER_BYTES = 4096  # a .npy header is 64..~200 bytes; more is not an array of ours
MAX_DIM = 1 << 20  # image height and width
_SHARD_NAME = re.compile(rf"{SHARDS_DIR}/shard-(\d{{6}})\.tar")
_MEMBER_NAME = re.compile(r"(?P<key>\d{9})\.(?P<part>header\.json|image\.[a-z0-9]{1,8}|[A-Za-z0-9_]{1,64}\.npy)")
_TAR_TYPES = {tarfile.SYMTYPE: "symbolic link", tarfile.LNKTYPE: "hard link", tarfile.DIRTYPE: "directory",
              tarfile.CHRTYPE: "device", tarfile.BLKTYPE: "device", tarfile.FIFOTYPE: "FIFO",
              tarfile.GNUTYPE_SPARSE: "sparse file", tarfile.CONTTYPE: "contiguous file"}


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


@dataclasses.dataclass(frozen=True)
class ShardSample:
    """One sample of a shard as ``read_shard`` decoded and checked it (types, shapes and ranges as the manifest
    says). ``targets``: ``{target: structured [K]}`` for the targets asked for."""

    index: int
    key: str
    uri: str
    height: int
    width: int
    image: bytes
    extension: str
    theta: np.ndarray  # uint8 [K, P]
    targets: dict[str, np.ndarray]

    def stored(self) -> dict[str, Any]:
        """``{"theta": [K, P], target: {array: [K, ...]}}``, in ``ReinforcedStore.read``'s nesting."""
        return {THETA: self.theta, **{t: {a: record[a] for a in record.dtype.names} for t, record in
                                      self.targets.items()}}


def read_shard(location: Location, rel: str, manifest: StoreManifest,
               targets: Collection[str] | None = None) -> Iterator[ShardSample]:
    """The samples of shard ``rel``, decoded by the format's own rules and nothing else: a shard is input from
    someone else, so webdataset's decoders (pickle, ``torch.load``, unbounded gunzip) never see it.

    Only the members the format defines are accepted (``KEY.header.json``, ``KEY.image.EXT``, ``KEY.theta.npy``
    and one ``KEY.TARGET.npy`` per target of the manifest), each a regular file within its size bound; ``.npy``
    members load without pickle and must have exactly the manifest's dtype and shape; header fields are typed
    and the sample index lies in the shard's unit, ascending; every target's values pass its codec's ``check``.
    Anything else raises one ``StoreCorruptError`` line naming the shard and member. ``targets`` limits the
    ``.npy`` members decoded to θ and those targets' (default: all; the others are still size-checked)."""
    where = location.where(rel)
    match = _SHARD_NAME.fullmatch(rel)
    if match is None:
        raise StoreCorruptError(f"{printable(where)}: not a shard this format writes ({SHARDS_DIR}/shard-NNNNNN.tar)")
    reader = _ShardReader(where, manifest, int(match[1]), targets)
    try:
        with location.open(rel) as stream, tarfile.open(fileobj=stream, mode="r|") as tar:  # "r|": no gunzip
            yield from reader.samples(tar)
    except (tarfile.TarError, OSError, EOFError, ValueError) as error:
        raise StoreCorruptError(f"{where}: truncated or corrupt tar shard ({type(error).__name__}: "
                                f"{printable(error)}); run `python -m stores verify {location.url}`") from None


class _ShardReader:
    """The per-shard state of ``read_shard``: expected dtypes, the unit's index span, the sample being read."""

    def __init__(self, where: str, manifest: StoreManifest, unit: int, targets: Collection[str] | None):
        content = manifest.content
        self.where, self.num_samples = where, manifest.num_samples
        span = manifest.layout["unit_samples"]
        self.span = range(unit * span, min((unit + 1) * span, manifest.num_samples))
        self.dtypes = {THETA: (np.dtype(np.uint8), (manifest.views, content.policy.record_bytes))}
        for name, target in content.targets.items():
            record = np.dtype([(a, np.dtype(spec.dtype), spec.shape) for a, spec in target.arrays.items()])
            self.dtypes[name] = (record, (manifest.views,))
        self.decoded = set(self.dtypes) if targets is None else {THETA, *targets}
        self.codecs = {name: create_codec(**content.targets[name].codec) for name in self.decoded if name != THETA}
        self.last = -1

    def fail(self, member: str, problem: str) -> StoreCorruptError:
        return StoreCorruptError(f"{printable(self.where)}: member {printable(member)}: {problem}")

    def samples(self, tar: tarfile.TarFile) -> Iterator[ShardSample]:
        key, members = None, {}
        for info in tar:
            name = info.name
            if info.type not in (tarfile.REGTYPE, tarfile.AREGTYPE):
                raise self.fail(name, f"a {_TAR_TYPES.get(info.type, 'special')} member, not a regular file")
            parsed = _MEMBER_NAME.fullmatch(name)
            if parsed is None:
                raise self.fail(name, "not a member this format defines (KEY.header.json, KEY.image.EXT, "
                                      "KEY.theta.npy, KEY.TARGET.npy)")
            if parsed["key"] != key:
                if key is not None:
                    yield self.sample(key, members)
                key, members = parsed["key"], {}
            part = parsed["part"]
            slot = "image" if part.startswith("image.") else part
            if slot in members:
                raise self.fail(name, "a second member of this kind for one sample")
            members[slot] = (name, self.payload(tar, info, part))
        if key is not None:
            yield self.sample(key, members)

    def payload(self, tar: tarfile.TarFile, info: tarfile.TarInfo, part: str) -> bytes | None:
        """The member's bytes after its declared size is checked (None: a target not decoded, left unread)."""
        name = part.removesuffix(".npy")
        if part == "header.json":
            limit = MAX_HEADER_BYTES
        elif part.startswith("image."):
            limit = MAX_IMAGE_BYTES
        elif name not in self.dtypes:
            raise self.fail(info.name, f"target {name!r} is not in the manifest")
        else:
            dtype, shape = self.dtypes[name]
            limit = NPY_HEADER_BYTES + dtype.itemsize * int(np.prod(shape))
        if info.size > limit:
            raise self.fail(info.name, f"{info.size} bytes, more than this member may hold ({limit})")
        if part.endswith(".npy") and name not in self.decoded:
            return None
        data = tar.extractfile(info).read()
        if len(data) != info.size:
            raise self.fail(info.name, "cut short")
        return data

    def sample(self, key: str, members: dict[str, tuple[str, bytes | None]]) -> ShardSample:
        """One sample's members -> a checked ``ShardSample``."""
        missing = sorted({"header.json", "image", *(f"{n}.npy" for n in self.dtypes)} - set(members))
        if missing:
            raise self.fail(f"{key}.*", f"sample has no {', '.join(missing)} member")
        header = self.header(key, *members["header.json"])
        arrays = {name: self.array(*members[f"{name}.npy"], name) for name in self.decoded}
        for name, codec in self.codecs.items():
            for field in arrays[name].dtype.names:
                try:
                    codec.check(field, arrays[name][field])
                except ValueError as error:
                    raise self.fail(members[f"{name}.npy"][0], f"{name}/{error}") from None
        image_name, image = members["image"]
        return ShardSample(**header, image=image, extension=image_name.rpartition(".")[2], theta=arrays.pop(THETA),
                           targets=arrays)

    def header(self, key: str, member: str, data: bytes) -> dict[str, Any]:
        try:
            header = load_json(data, max_bytes=MAX_HEADER_BYTES, max_depth=1, where=member)
        except UntrustedInputError as error:
            raise self.fail(member, str(error).partition(": ")[2]) from None
        if not isinstance(header, dict) or sorted(header) != sorted(HEADER_FIELDS):
            raise self.fail(member, f"header must be an object with exactly {', '.join(HEADER_FIELDS)}")
        for field, kind in (("index", int), ("key", str), ("uri", str), ("height", int), ("width", int)):
            value = header[field]
            if isinstance(value, bool) or not isinstance(value, kind):
                raise self.fail(member, f"header {field} must be {kind.__name__}, got {printable(repr(value))[:40]}")
        index = header["index"]
        if index not in self.span or index != int(key) or index <= self.last:
            raise self.fail(member, f"sample index {index} is not the member's key, ascending within this shard's "
                                    f"samples {self.span.start}..{self.span.stop - 1}")
        if not (1 <= header["height"] <= MAX_DIM and 1 <= header["width"] <= MAX_DIM):
            raise self.fail(member, f"header height, width {header['height']}, {header['width']} out of range")
        self.last = index
        return header

    def array(self, member: str, data: bytes, name: str) -> np.ndarray:
        dtype, shape = self.dtypes[name]
        try:
            array = np.load(io.BytesIO(data), allow_pickle=False)
        except (ValueError, OSError, EOFError) as error:  # object arrays need pickle: refused here
            raise self.fail(member, f"not a plain .npy array ({printable(error)})") from None
        if not isinstance(array, np.ndarray) or array.dtype != dtype or array.shape != shape:
            found = (array.dtype, array.shape) if isinstance(array, np.ndarray) else type(array).__name__
            raise self.fail(member, f"{found} where the manifest says {dtype} {shape}")
        return array


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
