"""``python -m reinforce.build``: run a teacher once over K augmented views of every transfer-set
sample and store its compressed predictions plus the exact augmentation records.

DataLoader workers decode and augment (one item = one sample's K views, uint8); the teacher runs
batched on the main process (bf16 autocast + channels_last on CUDA). Work is committed one store
unit (a shard of samples) at a time, so a killed build resumes where it stopped and produces the
same arrays as an uninterrupted one.

Example:
    python -m reinforce.build --teacher ft_lite0 --transfer-set "fashion-mnist:train?shots=10&part=unlabeled" \
        --views 4 --topk 5 --batch-size 256 --out runs/fmnist-ft_lite0
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from reinforce.augment import CropFlip, create_policy
from reinforce.progress import progress_bar
from reinforce.sources import Source, open_source
from reinforce.teachers import TeacherCard, TeacherModel, create_teacher
from stores.codecs import Codec, EmbeddingCodec, PatchCodec, TopKLogitsCodec
from stores.manifest import ArraySpec, PolicyRecord, StoreContent, TargetRecord, TransferSetRecord
from stores.store import THETA, StoreManifest, StoreWriter, describe_mismatch, fidelity_stats, open_store

__all__ = ["BuildConfig", "ViewDataset", "build", "main"]

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True, kw_only=True)
class BuildConfig:
    """Everything ``reinforce.build`` needs; the CLI is a thin parser onto this."""

    teacher: str
    transfer_set: str
    out: str
    targets: tuple[str, ...] = ("logits",)  # any of logits, embedding, patch: one teacher pass gives all
    views: int = 4
    topk: int = 5
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


class ViewDataset(Dataset):
    """Item i -> sample i's K views (uint8 ``[K, 3, S, S]``), packed θ (uint8 ``[K, P]``), size, error.

    A sample that fails to decode yields zero views and its error text instead of raising, so one
    corrupt file never stops a build.
    """

    def __init__(self, source: Source, policy: CropFlip, views: int, seed: int):
        self.source, self.policy, self.views, self.seed = source, policy, views, seed

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> dict[str, Any]:
        size = self.policy.size
        try:
            image = self.source.load(index)
        except Exception as error:  # corrupt / unreadable: recorded, never fatal
            return {"views": torch.zeros(self.views, 3, size, size, dtype=torch.uint8),
                    THETA: torch.zeros(self.views, self.policy.record_bytes, dtype=torch.uint8),
                    "height": 0, "width": 0, "error": f"{type(error).__name__}: {error}"}
        height, width = image.shape[-2:]
        records = [self.policy.sample(self.seed, index, v, height, width) for v in range(self.views)]
        return {"views": torch.stack([self.policy.apply(image, r) for r in records]),
                THETA: torch.from_numpy(self.policy.pack(records)),
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
    if "logits" in config.targets and config.topk > card.num_classes:
        problems.append(f"--topk {config.topk} exceeds the teacher's {card.num_classes} classes")
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


@torch.inference_mode()
def make_codecs(model: TeacherModel, card: TeacherCard, config: BuildConfig, device: torch.device) -> dict[str, Codec]:
    """One codec per requested target, sized by a probe forward of one blank view."""
    probe = model.forward_targets(torch.zeros(1, 3, card.input_size, card.input_size, dtype=torch.uint8,
                                              device=device), tuple(config.targets))
    codecs: dict[str, Codec] = {}
    for kind, output in probe.items():
        if kind == "logits":
            codecs[kind] = TopKLogitsCodec(k=config.topk, num_classes=card.num_classes,
                                           precision=config.logit_precision, index_coding=config.index_coding)
        elif kind == "embedding":
            codecs[kind] = EmbeddingCodec(dim=output.shape[-1], precision=config.feature_precision)
        else:
            codecs[kind] = PatchCodec(channels=output.shape[1], grid=min(config.patch_grid, output.shape[-1]),
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
    from the zoo with ``create_teacher(config.teacher)``.
    """
    device = torch.device(config.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model, card = teacher or create_teacher(config.teacher, device)
    model = model.to(device, memory_format=torch.channels_last).eval()
    check_teacher(card, model, config)
    warn_if_teacher_not_ahead(card)
    source = open_source(config.transfer_set)
    policy = create_policy(config.policy, size=card.input_size, **config.policy_args)
    codecs = make_codecs(model, card, config, device)
    content = store_content(card, source, policy, codecs, config)
    existing = _existing_store(Path(config.out), content)
    if existing is not None:
        return existing
    writer = StoreWriter(config.out, content, unit_samples=config.unit_samples, chunk_samples=config.chunk_samples)
    pending = [u for u in range(writer.num_units) if u not in writer.committed_units()]
    _run_teacher(model, device, writer, pending, ViewDataset(source, policy, config.views, config.seed), codecs, config)
    manifest = writer.finalize(library_version())
    log.info("store %s: %s", config.out, manifest.summary)
    return manifest


def _existing_store(path: Path, content: StoreContent) -> StoreManifest | None:
    """The published store at ``path`` if it holds exactly this content; an error if it holds other."""
    if not (path / "manifest.json").exists():
        return None
    store = open_store(path)
    if store.manifest.content != content:
        difference = describe_mismatch(store.manifest.content.to_dict(), content.to_dict())
        raise ValueError(f"{path} already holds a different store ({difference}); choose another --out")
    log.info("store %s already built (id %s)", path, store.manifest.store_id)
    return store.manifest


def _unit_batches(writer: StoreWriter, units: list[int], samples_per_batch: int) -> list[list[int]]:
    """Batches of sample indices that never straddle a unit: resumed runs batch exactly alike."""
    return [list(span[i: i + samples_per_batch]) for u in units
            for span in [writer.unit_range(u)] for i in range(0, len(span), samples_per_batch)]


@torch.inference_mode()
def _run_teacher(model: TeacherModel, device: torch.device, writer: StoreWriter, units: list[int],
                 dataset: ViewDataset, codecs: dict[str, Codec], config: BuildConfig) -> None:
    samples_per_batch = max(1, config.batch_size // config.views)
    loader = DataLoader(dataset, batch_sampler=_unit_batches(writer, units, samples_per_batch),
                        num_workers=config.workers, pin_memory=device.type == "cuda", persistent_workers=False)
    total_views = sum(len(writer.unit_range(u)) for u in units) * config.views
    progress = progress_bar(total=total_views, unit="view", desc="teacher")
    unit_iter = iter(units)
    unit, buffer, skipped = next(unit_iter, None), UnitBuffer(), 0
    for batch in loader:
        views = batch["views"].flatten(0, 1).to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            outputs = model.forward_targets(views, tuple(codecs))
        failed = np.array([bool(e) for e in batch["error"]])
        buffer.add(batch, _encode(outputs, codecs, failed, config.views))
        skipped += int(failed.sum())
        progress.update(len(failed) * config.views)
        progress.set_postfix(skipped=skipped)
        if buffer.samples == len(writer.unit_range(unit)):
            buffer.commit(writer, dataset.source, unit)
            unit, buffer = next(unit_iter, None), UnitBuffer()
    progress.close()


def _encode(outputs: dict[str, torch.Tensor], codecs: dict[str, Codec], failed: np.ndarray,
            views: int) -> tuple[dict[str, np.ndarray], dict[str, dict[str, Any]]]:
    """Teacher outputs -> ``{"<target>/<array>": [samples, K, ...]}`` (zeros for skipped samples) and the
    batch's fidelity statistics over the views of the samples that decoded."""
    arrays, fidelity = {}, {}
    keep = torch.from_numpy(np.repeat(~failed, views)).to(next(iter(outputs.values())).device)
    for name, codec in codecs.items():
        for array, values in codec.encode(outputs[name]).items():
            values = values.reshape(len(failed), views, *values.shape[1:])
            values[failed] = 0  # a skipped sample stores zeros, flagged in samples.parquet
            arrays[f"{name}/{array}"] = values
        if keep.any():
            fidelity[name] = codec.fidelity(outputs[name][keep].float())
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

    def commit(self, writer: StoreWriter, source: Source, unit: int) -> None:
        arrays = {name: np.concatenate([part[name] for part in self.arrays]) for name in writer.arrays}
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


def library_version() -> str:
    try:
        return version("vfm-reinforce")
    except PackageNotFoundError:
        return "0+unknown"


def _policy_arg(text: str) -> tuple[str, Any]:
    """``KEY=VALUE`` with VALUE parsed as JSON when it is JSON (``scale=[0.5,1]``, ``num_ops=0``)."""
    key, sep, value = text.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def parse_args(argv: list[str] | None = None) -> BuildConfig:
    parser = argparse.ArgumentParser(prog="python -m reinforce.build", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    defaults = BuildConfig(teacher="", transfer_set="", out="")
    parser.add_argument("--teacher", required=True,
                        help="zoo entry: a path or a name under $VFM_REINFORCE_HOME/teachers or ./teachers")
    parser.add_argument("--transfer-set", required=True, help="source spec, see reinforce.sources")
    parser.add_argument("--out", required=True, help="store directory to create")
    parser.add_argument("--targets", default=",".join(defaults.targets),
                        help="comma-separated targets from one teacher pass: logits, embedding, patch")
    parser.add_argument("--views", type=int, default=defaults.views, help="augmented views per sample (K)")
    parser.add_argument("--topk", type=int, default=defaults.topk, help="logits kept per view")
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
    args = vars(parser.parse_args(argv))
    args["targets"] = tuple(t.strip() for t in args["targets"].split(",") if t.strip())
    args["policy_args"] = dict(args.pop("policy_arg"))
    return BuildConfig(**args)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    config = parse_args(argv)
    try:
        manifest = build(config)
    except (ValueError, FileNotFoundError) as error:
        print(f"reinforce.build: error: {error}", file=sys.stderr)
        return 2
    summary = manifest.summary
    print(f"store {config.out} (id {manifest.store_id}): {summary['ok']} samples x {summary['views']} views stored, "
          f"{summary['skipped']} skipped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
