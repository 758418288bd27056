"""``python -m reinforce.build``: run a teacher once over K augmented views of every transfer-set
sample and store its compressed predictions plus the exact augmentation records.

DataLoader workers decode and augment (one item = one sample's K views, uint8); the teacher runs
batched on the main process (bf16 autocast + channels_last on CUDA). Work is committed one store
unit (a shard of samples) at a time, so a killed build resumes where it stopped and produces the
same arrays as an uninterrupted one.

Under ``torchrun`` or the DeepSpeed launcher (one process per GPU, any number of nodes) the ranks
split the store's units: rank 0 creates the partial store, each rank writes only the whole shards it
owns, rank 0 publishes once every unit is committed. N ranks write exactly the arrays one rank would.

Before any teacher compute the build looks for a published store with the same content (same store
id) at ``--out`` and, given ``--catalog ROOT``, anywhere directly under ROOT, and returns it instead.
``--extend STORE --add-views M`` makes a new store holding STORE's K views byte for byte plus views
K..K+M-1 drawn from the same θ stream; the new manifest records the parent as its lineage.
``--head-on STORE`` makes a linear probe's logits store without a backbone pass: the teacher's head applied to
the stored embeddings of STORE, a store of the frozen VFM the probe was trained on (checked by the backbone's
weights); the new store has STORE's views, θ and samples, and records STORE as its lineage.

Example:
    python -m reinforce.build --teacher ft_lite0 --transfer-set "fashion-mnist:train?shots=10&part=unlabeled" \
        --views 4 --topk 5 --batch-size 256 --out runs/fmnist-ft_lite0
    torchrun --nnodes 2 --nproc_per_node 8 ... -m reinforce.build ... --out s3://bucket/stores/fmnist-ft_lite0
    python -m reinforce.build --extend runs/fmnist-ft_lite0 --add-views 4 --out runs/fmnist-ft_lite0-k8
    python -m reinforce.build --teacher lp_lite0 --head-on runs/fmnist-frozen_lite0 --transfer-set ... --out ...
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import json
import logging
import os
import sys
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from reinforce.augment import CropFlip, create_policy, policy_from_record
from reinforce.memory import keep_freed_memory
from reinforce.progress import progress_bar
from reinforce.sources import Source, open_source
from reinforce.teachers import TeacherModel, backbone_sha256, create_teacher
from stores.catalog import find_store
from stores.cli_errors import HelpFormatter, cli_errors, debug_flag
from stores.cli_logging import log_to_stderr
from stores.codecs import (
    Codec,
    EmbeddingCodec,
    PatchCodec,
    SampledLogitsCodec,
    SegTopKLogitsCodec,
    TopKLogitsCodec,
    create_codec,
)
from stores.lineage import library_version
from stores.location import Location
from stores.manifest import (
    WDS_FORMAT,
    ArraySpec,
    PolicyRecord,
    StoreContent,
    TargetRecord,
    TeacherCard,
    TransferSetRecord,
    content_id,
)
from stores.store import (
    THETA,
    ReinforcedStore,
    StoreManifest,
    StoreWriter,
    describe_mismatch,
    fidelity_stats,
    open_store,
)
from stores.wds import WdsWriter

__all__ = ["BuildConfig", "ViewDataset", "build", "main"]

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True, kw_only=True)
class BuildConfig:
    """Everything ``reinforce.build`` needs; the CLI is a thin parser onto this."""

    teacher: str
    transfer_set: str
    out: str  # a local path or any fsspec URL (s3://bucket/prefix/store)
    format: str = "zarr"  # zarr (random access) | wds (tar shards with the images, streamed: stores.wds)
    targets: tuple[str, ...] = ("logits",)  # any of logits, embedding, patch (one pass gives all); or seg_logits
    views: int = 4
    codec: str = "topk_logits"  # logits: topk_logits | sampled_logits (unbiased: ids drawn from the teacher)
    topk: int = 5
    samples: int = 4  # sampled_logits: draws per view
    sample_temperature: float = 1.0  # sampled_logits: the teacher softmax's temperature the draws estimate
    proposal_temperature: float | None = None  # sampled_logits: draw from this temperature, store log p/q
    logit_precision: str = "uint8"  # uint8 (relative to the view's max, per-view scale) | fp16 (exact)
    index_coding: str = "delta"  # delta (sorted, gaps) | plain
    feature_precision: str = "int8"  # int8 + per-vector scale | fp16, for embedding and patch
    patch_grid: int = 16  # patch maps are average-pooled to at most grid x grid
    policy: str = "rrc_flip_randaug"
    policy_args: dict[str, Any] = dataclasses.field(default_factory=dict)  # besides size (the teacher's)
    num_classes: int | None = None  # optional guard: must match the teacher
    batch_size: int = 256  # teacher batch, in views
    workers: int = 2
    seed: int = 0
    unit_samples: int = 4096
    chunk_samples: int = 256
    device: str | None = None
    catalog: str | None = None  # a folder/URL of published stores: an identical one there is returned, not rebuilt
    extend: str | None = None  # parent store for add_views
    add_views: int = 0
    head_on: str | None = None  # a frozen-VFM store with embeddings: logits = the teacher's head on them, no backbone
    resume: bool = False  # take over the lock of an interrupted build made on another host


class ViewDataset(Dataset):
    """Item i -> sample i's views ``first_view..first_view+views-1`` (uint8 ``[V, 3, S, S]``), packed θ
    (uint8 ``[V, P]``), size, error.

    A sample that fails to decode yields zero views and its error text instead of raising, so one
    corrupt file never stops a build.
    """

    def __init__(self, source: Source, policy: CropFlip, views: int, seed: int, first_view: int = 0):
        self.source, self.policy, self.views, self.seed = source, policy, views, seed
        self.first_view = first_view

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> dict[str, Any]:
        size = self.policy.size
        try:
            image = self.source.load(index)
        except Exception as error:  # corrupt / unreadable: recorded, never fatal
            return {"views": torch.zeros(self.views, 3, size, size, dtype=torch.uint8),
                    THETA: torch.zeros(self.views, self.policy.record_bytes, dtype=torch.uint8), "index": index,
                    "height": 0, "width": 0, "error": f"{type(error).__name__}: {error}"}
        height, width = image.shape[-2:]
        records = [self.policy.sample(self.seed, index, v, height, width)
                   for v in range(self.first_view, self.first_view + self.views)]
        return {"views": torch.stack([self.policy.apply(image, r) for r in records]),
                THETA: torch.from_numpy(self.policy.pack(records)), "index": index,
                "height": height, "width": width, "error": ""}


def check_teacher(card: TeacherCard, model: TeacherModel, config: BuildConfig) -> None:
    """Fail before any work when the arguments contradict the teacher."""
    problems = []
    unknown = sorted(set(config.targets) - set(model.target_kinds))
    if unknown:
        problems.append(f"--targets {','.join(unknown)} but teacher {card.name!r} gives only "
                        f"{','.join(model.target_kinds)}")
    if config.num_classes is not None and config.num_classes != card.num_classes:
        problems.append(f"--num-classes {config.num_classes} but teacher {card.name!r} predicts {card.num_classes}")
    if {"logits", "seg_logits"} & set(config.targets) and config.topk > card.num_classes:
        problems.append(f"--topk {config.topk} exceeds the teacher's {card.num_classes} classes")
    if config.codec not in ("topk_logits", "sampled_logits"):
        problems.append(f"--codec {config.codec!r}: logits are stored by topk_logits or sampled_logits")
    elif config.codec == "sampled_logits" and "seg_logits" in config.targets:
        problems.append("--codec sampled_logits stores logits only (seg_logits: topk)")
    if not config.targets:
        problems.append("--targets is empty")
    if problems:
        raise ValueError("teacher/argument mismatch: " + "; ".join(problems))


def warn_if_teacher_not_ahead(card: TeacherCard) -> bool:
    """Warn (and return True) when the teacher's val top-1 is not above the labels-only student's that
    ``train.teacher --baseline-student`` recorded on the same validation images: distilling it cannot
    give the student more than training on the labels does."""
    baseline = card.adaptation.get("labels_only")
    if not baseline or card.val_accuracy is None or card.val_accuracy > baseline["val_top1"]:
        return False
    log.warning("teacher %r is not ahead of the labels-only student %s on its validation images (val top-1 %.3f "
                "vs %.3f): distilling it cannot beat training on the labels. Try --mode ft or auto, a larger "
                "--size, more --steps (README: 'When the teacher is weak')", card.name, baseline["student"],
                card.val_accuracy, baseline["val_top1"])
    return True


def make_codecs(model: TeacherModel, card: TeacherCard, config: BuildConfig) -> dict[str, Codec]:
    """One codec per requested target, sized by the teacher's output shapes (a meta-device pass: no compute)."""
    codecs: dict[str, Codec] = {}
    for kind, shape in model.target_shapes(card.input_size, tuple(config.targets)).items():
        if kind == "logits" and config.codec == "sampled_logits":
            codecs[kind] = SampledLogitsCodec(samples=config.samples, num_classes=card.num_classes,
                                              temperature=config.sample_temperature,
                                              proposal_temperature=config.proposal_temperature)
        elif kind == "logits":
            codecs[kind] = TopKLogitsCodec(k=config.topk, num_classes=card.num_classes,
                                           precision=config.logit_precision, index_coding=config.index_coding)
        elif kind == "seg_logits":  # [C, S/8, S/8]: per-pixel top-k, the same math as logits
            codecs[kind] = SegTopKLogitsCodec(k=config.topk, num_classes=card.num_classes, height=shape[1],
                                              width=shape[2], precision=config.logit_precision,
                                              index_coding=config.index_coding)
        elif kind == "embedding":
            codecs[kind] = EmbeddingCodec(dim=shape[-1], precision=config.feature_precision)
        else:
            codecs[kind] = PatchCodec(channels=shape[0], grid=min(config.patch_grid, shape[-1]),
                                      precision=config.feature_precision)
    return codecs


def store_content(card: TeacherCard, source: Source, policy: CropFlip, codecs: dict[str, Codec],
                  config: BuildConfig) -> StoreContent:
    """The typed manifest content of this build (hashed into the store id)."""
    targets = {name: TargetRecord(kind=codec.kind, codec=codec.to_dict(),
                                  arrays={a: ArraySpec(shape, d.str) for a, (shape, d) in codec.arrays().items()})
               for name, codec in codecs.items()}
    return StoreContent(
        teacher=card,
        transfer_set=TransferSetRecord(spec=source.spec, fingerprint=source.fingerprint(), num_samples=len(source)),
        policy=PolicyRecord.from_dict(policy.to_record()), views=config.views, seed=config.seed, targets=targets)


def build(config: BuildConfig, teacher: tuple[TeacherModel, TeacherCard] | None = None) -> StoreManifest:
    """Build (or resume, or find already built) the store ``config.out``; returns its manifest.

    ``teacher`` lets a caller pass an already loaded ``(model, card)``; by default it is loaded
    from the zoo with ``create_teacher(config.teacher)``. Under torchrun / the DeepSpeed launcher every
    rank calls this with the same arguments and returns the same manifest.
    """
    rank, world, local_rank = _join_ranks()
    cuda = torch.cuda.is_available() and config.device in (None, "cuda")
    device = torch.device(f"cuda:{local_rank}" if cuda else (config.device or "cpu"))
    parent = open_store(config.extend) if config.extend else None
    embeddings = open_store(config.head_on) if config.head_on else None
    model, card = teacher or create_teacher(config.teacher or parent.manifest.content.teacher.name, device)
    model = model.to(device, memory_format=torch.channels_last).eval()
    if parent is None:
        check_teacher(card, model, config)
        warn_if_teacher_not_ahead(card)
        source = open_source(config.transfer_set)
        policy = create_policy(config.policy, size=card.input_size, **config.policy_args)
        codecs = make_codecs(model, card, config)
        content = store_content(card, source, policy, codecs, config)
        if embeddings is not None:
            content = _head_content(embeddings, model, content, config)
    else:
        source, policy, codecs, content = _extension(parent, card, config)
    found = _published_store(Location(config.out), content, config.catalog, config.format)
    if found is not None:  # nothing to write (--out may be read-only): no lock
        return found
    writer = (WdsWriter(config.out, content, source.encoded, unit_samples=config.unit_samples)
              if config.format == WDS_FORMAT else
              StoreWriter(config.out, content, unit_samples=config.unit_samples, chunk_samples=config.chunk_samples))
    # one writer per store: rank 0 holds the lock until the store is published
    with writer.lock().held(resume=config.resume) if rank == 0 else contextlib.nullcontext():
        _barrier(world)
        found = _published_store(Location(config.out), content, config.catalog, config.format)
        if found is not None:  # published by a build that held the lock until a moment ago
            return found
        if rank == 0:
            writer.create()
        _barrier(world)
        writer.check_created()
        first_view = parent.manifest.views if parent else 0
        dataset = ViewDataset(source, policy, content.views - first_view, content.seed, first_view)
        units = writer.pending_units(rank, world)
        log.info("rank %d of %d: %d of %d units to write", rank, world, len(units), writer.num_units)
        if embeddings is None:
            _run_teacher(model, device, writer, units, dataset, codecs, config, parent)
        else:
            _run_head(model, device, writer, units, embeddings, codecs)
        _barrier(world)
        if rank == 0:
            manifest = writer.finalize(library_version())
            log.info("store %s: %s", config.out, manifest.summary)
        _barrier(world)
        return manifest if rank == 0 else open_store(config.out).manifest


def _join_ranks() -> tuple[int, int, int]:
    """(rank, world, local rank) of a torchrun / DeepSpeed-launcher process group (gloo: the build only
    needs barriers), or of a world of one."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    if world > 1 and not torch.distributed.is_initialized():
        # a long build leaves ranks waiting at the final barrier for the slowest one: no 30-minute default timeout
        torch.distributed.init_process_group("gloo", timeout=datetime.timedelta(days=7))
    return int(os.environ.get("RANK", 0)), world, int(os.environ.get("LOCAL_RANK", 0))


def _barrier(world: int) -> None:
    if world > 1:
        torch.distributed.barrier()


def _extension(parent: ReinforcedStore, card: TeacherCard,
               config: BuildConfig) -> tuple[Source, CropFlip, dict[str, Codec], StoreContent]:
    """``--extend PARENT --add-views M``: the parent's transfer set, policy, seed and codecs, K+M views."""
    content = parent.manifest.content
    if config.add_views < 1:
        raise ValueError("--extend needs --add-views M with M >= 1")
    if card.to_dict() != content.teacher.to_dict():
        raise ValueError(f"--teacher is not the teacher of {parent.path}: "
                         f"{describe_mismatch(content.teacher.to_dict(), card.to_dict(), 'teacher.')}")
    source = open_source(content.transfer_set.spec)
    if source.fingerprint() != content.transfer_set.fingerprint:
        raise ValueError(f"transfer set {content.transfer_set.spec!r} changed since {parent.path} was built")
    policy = policy_from_record(content.policy.to_dict())
    codecs = {name: create_codec(**record.codec) for name, record in content.targets.items()}
    extended = dataclasses.replace(content, views=content.views + config.add_views,
                                   lineage={"parent": parent.manifest.store_id, "parent_views": content.views})
    return source, policy, codecs, extended


def _head_content(embeddings: ReinforcedStore, model: TeacherModel, content: StoreContent,
                  config: BuildConfig) -> StoreContent:
    """``--head-on STORE``: this build's content once STORE is checked to hold exactly what the teacher's backbone
    would compute here (same backbone weights and input, same transfer set, policy, views and seed)."""
    frozen = embeddings.manifest.content
    problems = []
    if embeddings.manifest.format != "zarr":
        problems.append(f"it is a {embeddings.manifest.format} store (--head-on reads zarr stores)")
    elif "embedding" not in frozen.targets:
        problems.append(f"it stores no embedding (targets: {', '.join(frozen.targets)})")
    if frozen.teacher.num_classes or frozen.teacher.weights_sha256 != backbone_sha256(model):
        problems.append(f"its teacher {frozen.teacher.name!r} is not this teacher's frozen backbone (weights differ)")
    if config.format != "zarr" or set(config.targets) != {"logits"}:
        problems.append("--head-on makes a zarr store of logits only")
    mine = {"teacher": {k: v for k, v in content.teacher.to_dict().items() if k in _BACKBONE_INPUT},
            "transfer_set": content.transfer_set.to_dict(), "policy": content.policy.to_dict(),
            "views": content.views, "seed": content.seed}
    theirs = {**{k: v for k, v in frozen.to_dict().items() if k in mine},
              "teacher": {k: v for k, v in frozen.teacher.to_dict().items() if k in _BACKBONE_INPUT}}
    if mine != theirs:
        problems.append(f"it was built with other settings ({describe_mismatch(theirs, mine)})")
    if problems:
        raise ValueError(f"--head-on {embeddings.path}: " + "; ".join(problems))
    return dataclasses.replace(content, lineage={"parent": embeddings.manifest.store_id, "head_on": "embedding"})


_BACKBONE_INPUT = ("library", "backbone", "input_size", "mean", "std")  # what, besides weights, sets the embedding


def _published_store(out: Location, content: StoreContent, catalog: str | None,
                     store_format: str) -> StoreManifest | None:
    """The published store at ``out`` if it holds exactly this content in this format (another: an error),
    else one with the same store id and format directly under ``catalog``, else None."""
    if out.exists("manifest.json"):
        store = open_store(out)
        if store.manifest.content != content or store.manifest.format != store_format:
            difference = describe_mismatch({"format": store.manifest.format, **store.manifest.content.to_dict()},
                                           {"format": store_format, **content.to_dict()})
            raise ValueError(f"{out} already holds a different store ({difference}); choose another --out")
        log.info("store %s already built (id %s)", out, store.manifest.store_id)
        return store.manifest
    found = find_store(catalog, content_id(content), store_format) if catalog else None
    if found is None:
        return None
    log.info("an identical store (id %s) is already published at %s: not rebuilt, use it as --store",
             content_id(content), found)
    return open_store(found).manifest


def _unit_batches(writer: StoreWriter, units: list[int], samples_per_batch: int) -> list[list[int]]:
    """Batches of sample indices that never straddle a unit: resumed runs batch exactly alike."""
    return [list(span[i: i + samples_per_batch]) for u in units
            for span in [writer.unit_range(u)] for i in range(0, len(span), samples_per_batch)]


@torch.inference_mode()
def _run_teacher(model: TeacherModel, device: torch.device, writer: StoreWriter, units: list[int],
                 dataset: ViewDataset, codecs: dict[str, Codec], config: BuildConfig,
                 parent: ReinforcedStore | None = None) -> None:
    """The teacher over ``units`` (this rank's), each committed when complete; with ``parent``, each unit's
    parent views are copied in front of the new ones."""
    samples_per_batch = max(1, config.batch_size // dataset.views)
    loader = DataLoader(dataset, batch_sampler=_unit_batches(writer, units, samples_per_batch),
                        num_workers=config.workers, pin_memory=device.type == "cuda", persistent_workers=False)
    total_views = sum(len(writer.unit_range(u)) for u in units) * dataset.views
    progress = progress_bar(total=total_views, unit="view", desc="teacher")
    unit_iter = iter(units)
    unit, buffer, skipped = next(unit_iter, None), UnitBuffer(), 0
    for batch in loader:
        views = batch["views"].flatten(0, 1).to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            outputs = model.forward_targets(views, tuple(codecs))
        failed = np.array([bool(e) for e in batch["error"]])
        keys = _view_keys(batch["index"].numpy(), dataset.seed, dataset.first_view, dataset.views)
        buffer.add(batch, _encode(outputs, codecs, failed, keys))
        skipped += int(failed.sum())
        progress.update(len(failed) * dataset.views)
        progress.set_postfix(skipped=skipped)
        if buffer.samples == len(writer.unit_range(unit)):
            buffer.commit(writer, dataset.source, unit, parent)
            unit, buffer = next(unit_iter, None), UnitBuffer()
    progress.close()


@torch.inference_mode()
def _run_head(model: TeacherModel, device: torch.device, writer: StoreWriter, units: list[int],
              embeddings: ReinforcedStore, codecs: dict[str, Codec]) -> None:
    """``--head-on``: each unit's logits = the teacher's head on the embeddings stored for its views, with their θ
    and sample rows as stored; committed unit by unit like a teacher pass."""
    samples, views, seed = embeddings.samples, embeddings.manifest.views, embeddings.manifest.content.seed
    progress = progress_bar(total=sum(len(writer.unit_range(u)) for u in units) * views, unit="view", desc="head")
    for unit in units:
        span = writer.unit_range(unit)
        stored = embeddings.read_range(span.start, span.stop, targets=("embedding",))  # not its patch maps
        payload = {name.split("/", 1)[1]: array.reshape(len(span) * views, *array.shape[2:])
                   for name, array in stored.items() if name != THETA}
        logits = model.head(embeddings.decode("embedding", payload, device))
        rows = samples.slice(span.start, len(span)).to_dicts()
        failed = np.array([row["status"] == "skipped" for row in rows])
        arrays, fidelity = _encode({"logits": logits}, codecs, failed, _view_keys(np.asarray(span), seed, 0, views))
        fidelity = {target: fidelity_stats(metrics) for target, metrics in fidelity.items()}
        writer.write_unit(unit, {**arrays, THETA: stored[THETA]}, rows, fidelity)
        progress.update(len(span) * views)
    progress.close()


def _view_keys(samples: np.ndarray, seed: int, first_view: int, views: int) -> np.ndarray:
    """``[samples * views, 3]`` int64 (seed, sample, view) of a batch's views, in the teacher's order: what a codec
    that draws keys its generator with (as θ is keyed)."""
    view_range = np.arange(first_view, first_view + views)
    return np.stack([np.full(len(samples) * views, seed), np.repeat(samples, views),
                     np.tile(view_range, len(samples))], axis=1).astype(np.int64)


def _encode(outputs: dict[str, torch.Tensor], codecs: dict[str, Codec], failed: np.ndarray,
            keys: np.ndarray) -> tuple[dict[str, np.ndarray], dict[str, dict[str, Any]]]:
    """Teacher outputs -> ``{"<target>/<array>": [samples, K, ...]}`` (zeros for skipped samples) and the
    batch's fidelity statistics over the views of the samples that decoded; ``keys`` from ``_view_keys``."""
    arrays, fidelity = {}, {}
    views = len(keys) // len(failed)
    keep_views = np.repeat(~failed, views)
    keep = torch.from_numpy(keep_views).to(next(iter(outputs.values())).device)
    for name, codec in codecs.items():
        for array, values in codec.encode(outputs[name], keys).items():
            values = values.reshape(len(failed), views, *values.shape[1:])
            values[failed] = 0  # a skipped sample stores zeros, flagged in samples.parquet
            arrays[f"{name}/{array}"] = values
        if keep.any():
            fidelity[name] = codec.fidelity(outputs[name][keep].float(), keys[keep_views])
    return arrays, fidelity


class UnitBuffer:
    """Batches of one store unit, gathered until the unit is complete, then written and committed."""

    def __init__(self):
        self.batches: list[dict[str, Any]] = []
        self.arrays: list[dict[str, np.ndarray]] = []
        self.fidelity: dict[str, dict[str, list[torch.Tensor]]] = {}
        self.samples = 0

    def add(self, batch: dict[str, Any], encoded: tuple[dict[str, np.ndarray], dict[str, dict[str, Any]]]) -> None:
        arrays, fidelity = encoded
        arrays[THETA] = batch[THETA].numpy()
        self.batches.append(batch)
        self.arrays.append(arrays)
        for target, metrics in fidelity.items():
            for metric, values in metrics.items():
                self.fidelity.setdefault(target, {}).setdefault(metric, []).append(values.cpu())
        self.samples += len(batch["error"])

    def commit(self, writer: StoreWriter, source: Source, unit: int, parent: ReinforcedStore | None = None) -> None:
        arrays = {name: np.concatenate([part[name] for part in self.arrays]) for name in writer.arrays}
        if parent is not None:  # the parent's views, exactly as stored, before the new ones
            span = writer.unit_range(unit)
            stored = parent.read_range(span.start, span.stop)
            arrays = {name: np.concatenate([stored[name], new], axis=1) for name, new in arrays.items()}
        heights = np.concatenate([b["height"].numpy() for b in self.batches])
        widths = np.concatenate([b["width"].numpy() for b in self.batches])
        errors = [e for b in self.batches for e in b["error"]]
        rows = [{"index": i, "key": str(source.keys[i]), "uri": str(source.uris[i]), "height": int(h),
                 "width": int(w), "status": "skipped" if e else "ok", "error": e or None}
                for i, h, w, e in zip(writer.unit_range(unit), heights, widths, errors)]
        for row in rows:
            if row["error"]:
                log.warning("skipped sample %d (%s): %s", row["index"], row["uri"], row["error"])
        fidelity = {target: fidelity_stats({m: torch.cat(v) for m, v in metrics.items()})
                    for target, metrics in self.fidelity.items()}
        writer.write_unit(unit, arrays, rows, fidelity)


def _policy_arg(text: str) -> tuple[str, Any]:
    """``KEY=VALUE`` with VALUE parsed as JSON when it is JSON (``scale=[0.5,1]``, ``num_ops=0``)."""
    key, sep, value = text.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def build_parser() -> argparse.ArgumentParser:
    """``reinforce.build``'s command line (``train.pipeline`` checks a recipe's section with it)."""
    parser = argparse.ArgumentParser(prog="python -m reinforce.build", description=__doc__.split("\n\n")[0],
                                     formatter_class=HelpFormatter)
    defaults = BuildConfig(teacher="", transfer_set="", out="")
    parser.add_argument("--teacher", default="",
                        help="zoo entry: a path or a name under $VFM_REINFORCE_HOME/teachers or ./teachers "
                             "(required unless --extend: then the parent's teacher by name)")
    parser.add_argument("--transfer-set", default="",
                        help="source spec, see reinforce.sources (required unless --extend)")
    parser.add_argument("--out", required=True, help="store to create: a directory or an fsspec URL (s3://...)")
    parser.add_argument("--format", choices=("zarr", WDS_FORMAT), default=defaults.format,
                        help="zarr: random access; wds: tar shards carrying the images, streamed by train.distill "
                             "(for transfer sets too large for random access)")
    parser.add_argument("--catalog", default=None,
                        help="folder or URL of published stores: an identical one there is returned, not rebuilt")
    parser.add_argument("--extend", default=None, metavar="STORE",
                        help="new store = STORE's views byte for byte + --add-views more (its teacher, policy, codecs)")
    parser.add_argument("--add-views", type=int, default=0, metavar="M", help="with --extend: views K..K+M-1")
    parser.add_argument("--head-on", default=None, metavar="STORE",
                        help="no backbone pass: logits = the teacher's head (a linear probe) on the embeddings STORE "
                             "holds, a store of the frozen VFM it probes with the same transfer set, policy, views "
                             "and seed (checked); the new store has STORE's views and θ")
    parser.add_argument("--resume", action="store_true",
                        help="take over the lock of an interrupted build of --out made on another host (one "
                             "whose process is gone from this host is taken over without it)")
    parser.add_argument("--targets", default=",".join(defaults.targets),
                        help="comma-separated targets from one teacher pass: logits, embedding, patch; "
                             "seg_logits (segmentation teachers: per-pixel top-k at 1/8 resolution)")
    parser.add_argument("--views", type=int, default=defaults.views, help="augmented views per sample (K)")
    parser.add_argument("--codec", choices=("topk_logits", "sampled_logits"), default=defaults.codec,
                        help="logits: the top-k + log-sum-exp (biased: the tail is spread evenly), or class ids drawn "
                             "from the teacher's softmax with their counts (unbiased; train.distill --loss auto: "
                             "sampled_ce)")
    parser.add_argument("--topk", type=int, default=defaults.topk, help="logits kept per view")
    parser.add_argument("--samples", type=int, default=defaults.samples, help="sampled_logits: draws per view")
    parser.add_argument("--sample-temperature", type=float, default=defaults.sample_temperature,
                        help="sampled_logits: temperature of the teacher softmax the draws estimate (train.distill "
                             "compares the student at this temperature)")
    parser.add_argument("--proposal-temperature", type=float, default=None,
                        help="sampled_logits: draw from the softmax at this temperature instead and store the "
                             "log-weight correction log p/q per id (fp16)")
    parser.add_argument("--logit-precision", choices=("uint8", "fp16"), default=defaults.logit_precision,
                        help="uint8: relative to the view's max with a per-view scale; fp16: exact raw logits")
    parser.add_argument("--index-coding", choices=("delta", "plain"), default=defaults.index_coding,
                        help="top-k class indices sorted and stored as gaps (delta) or as is")
    parser.add_argument("--feature-precision", choices=("int8", "fp16"), default=defaults.feature_precision,
                        help="embedding and patch values: int8 with a per-vector scale, or fp16")
    parser.add_argument("--patch-grid", type=int, default=defaults.patch_grid, help="patch maps pooled to GxG at most")
    parser.add_argument("--policy", default=defaults.policy, help="augmentation policy (reinforce.augment registry)")
    parser.add_argument("--policy-arg", type=_policy_arg, action="append", default=[], metavar="KEY=VALUE",
                        help="policy argument, repeatable, e.g. scale=[0.25,1] num_ops=2 magnitude=9")
    parser.add_argument("--num-classes", type=int, default=None, help="expected class count (checked)")
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size, help="teacher batch in views")
    parser.add_argument("--workers", type=int, default=defaults.workers, help="DataLoader decode/augment workers")
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--unit-samples", type=int, default=defaults.unit_samples, help="samples per shard / commit")
    parser.add_argument("--chunk-samples", type=int, default=defaults.chunk_samples, help="samples per read chunk")
    parser.add_argument("--device", default=None, help="cpu | cuda (default: cuda when available)")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)  # DeepSpeed
    return debug_flag(parser)


def parse_args(argv: list[str] | None = None) -> tuple[BuildConfig, bool]:
    """The build's config and whether ``--debug`` was given."""
    parser = build_parser()
    args = vars(parser.parse_args(argv))
    args.pop("local_rank")  # the launcher also sets LOCAL_RANK, which is what the build reads
    debug = args.pop("debug")
    if not args["extend"] and not (args["teacher"] and args["transfer_set"]):
        parser.error("--teacher and --transfer-set are required (unless --extend STORE)")
    if args["add_views"] and not args["extend"]:
        parser.error("--add-views needs --extend STORE")
    if args["head_on"] and args["extend"]:
        parser.error("--head-on makes a new store from a frozen store; --extend adds views to one: not both")
    args["targets"] = tuple(t.strip() for t in args["targets"].split(",") if t.strip())
    args["policy_args"] = dict(args.pop("policy_arg"))
    return BuildConfig(**args), debug


def main(argv: list[str] | None = None) -> int:
    keep_freed_memory()
    log_to_stderr()
    config, debug = parse_args(argv)
    with cli_errors("reinforce.build", debug):
        manifest = build(config)
    summary = manifest.summary
    out = Location(config.out)
    where = out if out.exists("manifest.json") else find_store(config.catalog, manifest.store_id, config.format)
    if int(os.environ.get("RANK", 0)) == 0:
        print(f"store {where} (id {manifest.store_id}): {summary['ok']} samples x {summary['views']} views "
              f"stored, {summary['skipped']} skipped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
