"""``manifest.json`` as typed, versioned records: what a reader needs to use, trust and reproduce a store.

Every section is a frozen dataclass with ``to_dict``/``from_dict``; ``from_dict`` refuses unknown or
missing keys and paths that leave the store, because a store is input from someone else. The
content (teacher, transfer set, policy, views, seed, targets) is hashed into the store id.

Layout of ``content.targets``: ``{name: TargetRecord(kind, codec, arrays)}``, with the arrays stored
as ``targets.zarr/<name>/<array>`` of shape ``[N, K, *shape]``; θ is ``targets.zarr/theta``. A store of
webdataset shards says ``layout.format == "wds"`` (a zarr store's layout has no ``format`` key, so
manifests written before shards existed parse unchanged); its content, hence its store id, is the same.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import PurePosixPath
from typing import Any

__all__ = [
    "FORMAT_VERSION", "WDS_FORMAT", "ArraySpec", "FileRecord", "ManifestError", "PolicyRecord", "StoreContent",
    "StoreManifest", "TargetRecord", "TeacherCard", "TransferSetRecord", "content_id",
]

FORMAT_VERSION = 2
WDS_FORMAT = "wds"  # layout.format of a store of webdataset tar shards; absent: a zarr store


# What two stores with one id hold (written into every manifest's summary; checked by ``stores verify --against``)
STORE_ID_PROMISE = ("same store id: θ, sample table and integer index codes identical; every other value equal "
                    "within one rounding step of its stored encoding (1 code, or 1 unit in the last place)")


class ManifestError(ValueError):
    """A manifest (or teacher card) that does not match its schema; the message names the key."""


def _fields(cls: type, data: Any, where: str) -> dict[str, Any]:
    """``data`` checked against ``cls``'s fields: a dict, no unknown keys, every required key present."""
    if not isinstance(data, dict):
        raise ManifestError(f"{where}: expected an object, got {type(data).__name__}")
    known = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise ManifestError(f"{where}: unknown key(s) {unknown}; expected {sorted(known)}")
    required = [name for name, f in known.items()
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    missing = [name for name in required if name not in data]
    if missing:
        raise ManifestError(f"{where}: missing key(s) {missing}")
    return dict(data)


@dataclasses.dataclass(frozen=True, kw_only=True)
class TeacherCard:
    """``teacher.json`` and the manifest's teacher section: rebuild the teacher, check a store against it.

    ``num_classes == 0`` is a headless teacher (a frozen VFM): it yields features, no logits.
    """

    name: str
    library: str  # timm | open_clip
    backbone: str
    num_classes: int
    class_names: tuple[str, ...]
    input_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    adaptation: dict[str, Any]  # how the task was taught: mode (lp/ft/frozen/pretrained), shots, steps, ...
    val_accuracy: float | None = None
    weights_sha256: str = ""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "teacher") -> TeacherCard:
        data = _fields(cls, data, where)
        for key in ("class_names", "mean", "std"):
            data[key] = tuple(data[key])
        return cls(**data)


@dataclasses.dataclass(frozen=True, kw_only=True)
class TransferSetRecord:
    """The transfer set by spec and fingerprint: replay reopens it and checks it is unchanged."""

    spec: str
    fingerprint: str
    num_samples: int

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "transfer_set") -> TransferSetRecord:
        return cls(**_fields(cls, data, where))


@dataclasses.dataclass(frozen=True, kw_only=True)
class PolicyRecord:
    """The augmentation policy by registry name, version and arguments, with the op names it renders.

    Op *names* (not indices into a library's table) are stored, so a changed op table is detected.
    """

    name: str
    version: int
    args: dict[str, Any]
    op_names: tuple[str, ...]
    record_bytes: int  # width of one packed θ record

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "policy") -> PolicyRecord:
        data = _fields(cls, data, where)
        data["op_names"] = tuple(data["op_names"])
        return cls(**data)


@dataclasses.dataclass(frozen=True)
class ArraySpec:
    """Per-view shape and numpy dtype string of one stored array (stored as ``[N, K, *shape]``)."""

    shape: tuple[int, ...]
    dtype: str

    def to_dict(self) -> dict[str, Any]:
        return {"shape": list(self.shape), "dtype": self.dtype}

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "array") -> ArraySpec:
        data = _fields(cls, data, where)
        return cls(tuple(int(n) for n in data["shape"]), str(data["dtype"]))


@dataclasses.dataclass(frozen=True, kw_only=True)
class TargetRecord:
    """One named target: its kind (logits, embedding, patch), its codec (``{name, **args}``), its arrays."""

    kind: str
    codec: dict[str, Any]
    arrays: dict[str, ArraySpec]

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "codec": dict(self.codec),
                "arrays": {name: spec.to_dict() for name, spec in self.arrays.items()}}

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "target") -> TargetRecord:
        data = _fields(cls, data, where)
        arrays = {_safe_name(n, where): ArraySpec.from_dict(spec, f"{where}.arrays.{n}")
                  for n, spec in data["arrays"].items()}
        return cls(kind=data["kind"], codec=dict(data["codec"]), arrays=arrays)


@dataclasses.dataclass(frozen=True, kw_only=True)
class StoreContent:
    """Everything that determines the stored values; its canonical JSON hashes to the store id."""

    teacher: TeacherCard
    transfer_set: TransferSetRecord
    policy: PolicyRecord
    views: int
    seed: int
    targets: dict[str, TargetRecord]
    # where earlier views came from: {"parent": store id, "parent_views": K} for a store extended by
    # ``reinforce.build --add-views``, its views 0..K-1 the parent's bytes, not a fresh teacher pass;
    # {"parent": store id, "head_on": "embedding"}: logits of a linear head on the parent's stored embeddings
    lineage: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def num_samples(self) -> int:
        return self.transfer_set.num_samples

    def to_dict(self) -> dict[str, Any]:
        return {"teacher": self.teacher.to_dict(), "transfer_set": self.transfer_set.to_dict(),
                "policy": self.policy.to_dict(), "views": self.views, "seed": self.seed,
                "targets": {name: target.to_dict() for name, target in self.targets.items()},
                **({"lineage": dict(self.lineage)} if self.lineage else {})}  # absent: ids of plain builds unchanged

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "content") -> StoreContent:
        data = _fields(cls, data, where)
        return cls(teacher=TeacherCard.from_dict(data["teacher"], f"{where}.teacher"),
                   transfer_set=TransferSetRecord.from_dict(data["transfer_set"], f"{where}.transfer_set"),
                   policy=PolicyRecord.from_dict(data["policy"], f"{where}.policy"),
                   views=int(data["views"]), seed=int(data["seed"]),
                   targets={_safe_name(n, where): TargetRecord.from_dict(t, f"{where}.targets.{n}")
                            for n, t in data["targets"].items()},
                   lineage=_lineage(data.get("lineage", {}), f"{where}.lineage"))


@dataclasses.dataclass(frozen=True)
class FileRecord:
    """A file of the store, relative to its root, with size and sha256 (checked by ``stores verify``)."""

    path: str
    bytes: int
    sha256: str

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "files") -> FileRecord:
        data = _fields(cls, data, where)
        path = PurePosixPath(data["path"])
        if path.is_absolute() or ".." in path.parts or not path.parts:
            raise ManifestError(f"{where}: path {data['path']!r} leaves the store")
        return cls(str(path), int(data["bytes"]), str(data["sha256"]))


@dataclasses.dataclass(frozen=True, kw_only=True)
class StoreManifest:
    """``manifest.json`` of a published store."""

    format_version: int
    store_id: str
    content: StoreContent
    layout: dict[str, Any]  # zarr: unit_samples (= shard = commit unit), chunk_samples (= read unit);
    # wds: format "wds", unit_samples (samples per tar shard = commit unit)
    summary: dict[str, Any]  # counts (samples, ok, skipped, views, stored_views) and codec fidelity per target
    files: tuple[FileRecord, ...]
    library_version: str
    created_at: str
    # the library and dependency versions that wrote the store (``stores.lineage``); outside the content, so
    # they never change a store id, and optional, so stores written before they were recorded parse unchanged
    versions: dict[str, str] = dataclasses.field(default_factory=dict)

    @property
    def num_samples(self) -> int:
        return self.content.num_samples

    @property
    def views(self) -> int:
        return self.content.views

    @property
    def format(self) -> str:
        """``"zarr"`` (random access) or ``"wds"`` (tar shards, streamed)."""
        return self.layout.get("format", "zarr")

    def to_dict(self) -> dict[str, Any]:
        return {"format_version": self.format_version, "store_id": self.store_id, "content": self.content.to_dict(),
                "layout": dict(self.layout), "summary": self.summary,
                "files": [dataclasses.asdict(f) for f in self.files],
                "library_version": self.library_version, "created_at": self.created_at,
                **({"versions": dict(self.versions)} if self.versions else {})}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> StoreManifest:
        data = _fields(cls, data, "manifest")
        layout = _fields_of_layout(data["layout"])
        return cls(format_version=int(data["format_version"]), store_id=str(data["store_id"]),
                   content=StoreContent.from_dict(data["content"]), layout=layout, summary=dict(data["summary"]),
                   files=tuple(FileRecord.from_dict(f, "manifest.files") for f in data["files"]),
                   library_version=str(data["library_version"]), created_at=str(data["created_at"]),
                   versions=_versions(data.get("versions", {})))


def _versions(data: Any) -> dict[str, str]:
    if not isinstance(data, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in data.items()):
        raise ManifestError(f"manifest.versions: expected {{package: version}} strings, got {data!r}")
    return dict(data)


def _lineage(data: Any, where: str) -> dict[str, Any]:
    if not isinstance(data, dict) or (data and set(data) not in ({"parent", "parent_views"}, {"parent", "head_on"})):
        raise ManifestError(f"{where}: expected parent with parent_views or head_on, got {data!r}")
    if "head_on" in data and data["head_on"] != "embedding":
        raise ManifestError(f"{where}: head_on must be 'embedding', got {data['head_on']!r}")
    return {"parent": str(data["parent"]), **({"parent_views": int(data["parent_views"])} if "parent_views" in data
                                              else {"head_on": "embedding"})} if data else {}


def _fields_of_layout(layout: Any) -> dict[str, Any]:
    wds = isinstance(layout, dict) and layout.get("format") == WDS_FORMAT
    expected = {"format", "unit_samples"} if wds else {"unit_samples", "chunk_samples"}
    if not isinstance(layout, dict) or set(layout) != expected:
        raise ManifestError(f"manifest.layout: expected {' and '.join(sorted(expected))}, got {layout!r}")
    return {key: value if key == "format" else int(value) for key, value in layout.items()}


def _safe_name(name: str, where: str) -> str:
    """Target and array names become directory names: plain identifiers only."""
    if not (isinstance(name, str) and name.replace("_", "").isalnum()):
        raise ManifestError(f"{where}: name {name!r} is not a plain identifier")
    return name


def content_id(content: StoreContent) -> str:
    """Store id: sha256 of the canonical JSON of everything that determines the stored values."""
    canonical = json.dumps(content.to_dict(), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:32]


def read_format_version(data: Any) -> int | None:
    """The ``format_version`` of a parsed manifest, or None when it has none."""
    return data.get("format_version") if isinstance(data, dict) else None
