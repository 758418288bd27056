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
import time
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from reinforce.augment import RandAugCropFlip
from reinforce.sources import Source, open_source
from reinforce.teachers import TeacherCard, TeacherModel, create_teacher
from stores.codecs import TopKLogitsCodec
from stores.store import FORMAT_VERSION, StoreManifest, StoreWriter, describe_mismatch, open_store

__all__ = ["BuildConfig", "ViewDataset", "build", "main"]

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True, kw_only=True)
class BuildConfig:
    """Everything ``reinforce.build`` needs; the CLI is a thin parser onto this."""

    teacher: str
    transfer_set: str
    out: str
    views: int = 4
    topk: int = 5
    size: int | None = None  # default: the teacher's input size; another value is an error
    num_classes: int | None = None  # optional guard: must match the teacher
    batch_size: int = 256  # teacher batch, in views
    workers: int = 2
    seed: int = 0
    scale: tuple[float, float] = (0.25, 1.0)
    num_ops: int = 2
    magnitude: int = 9
    unit_samples: int = 4096
    chunk_samples: int = 256
    device: str | None = None


class ViewDataset(Dataset):
    """Item i -> sample i's K views (uint8 ``[K, 3, S, S]``), records (int32 ``[K, P]``), size, error.

    A sample that fails to decode yields zero views and its error text instead of raising, so one
    corrupt file never stops a build.
    """

    def __init__(self, source: Source, policy: RandAugCropFlip, views: int, seed: int):
        self.source, self.policy, self.views, self.seed = source, policy, views, seed

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> dict[str, Any]:
        size, width = self.policy.size, self.policy.record_width
        try:
            image = self.source.load(index)
        except Exception as error:  # corrupt / unreadable: recorded, never fatal
            return {"views": torch.zeros(self.views, 3, size, size, dtype=torch.uint8),
                    "params": torch.zeros(self.views, width, dtype=torch.int32),
                    "height": 0, "width": 0, "error": f"{type(error).__name__}: {error}"}
        height, width_px = image.shape[-2:]
        records = [self.policy.sample(self.seed, index, v, height, width_px) for v in range(self.views)]
        return {"views": torch.stack([self.policy.apply(image, r) for r in records]),
                "params": torch.from_numpy(np.stack([r.to_array() for r in records])),
                "height": height, "width": width_px, "error": ""}


def check_teacher(card: TeacherCard, config: BuildConfig) -> int:
    """Fail before any work when the arguments contradict the teacher; returns the view size."""
    problems = []
    if config.num_classes is not None and config.num_classes != card.num_classes:
        problems.append(f"--num-classes {config.num_classes} but teacher {card.name!r} predicts {card.num_classes}")
    if config.size is not None and config.size != card.input_size:
        problems.append(f"--size {config.size} but teacher {card.name!r} takes {card.input_size}px inputs")
    if config.topk > card.num_classes:
        problems.append(f"--topk {config.topk} exceeds the teacher's {card.num_classes} classes")
    if problems:
        raise ValueError("teacher/argument mismatch: " + "; ".join(problems))
    return card.input_size


def build(config: BuildConfig, teacher: tuple[TeacherModel, TeacherCard] | None = None) -> StoreManifest:
    """Build (or resume, or find already built) the store ``config.out``; returns its manifest.

    ``teacher`` lets a caller pass an already loaded ``(model, card)``; by default it is loaded
    from the zoo with ``create_teacher(config.teacher)``.
    """
    device = torch.device(config.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model, card = teacher or create_teacher(config.teacher, device)
    model = model.to(device, memory_format=torch.channels_last).eval()
    size = check_teacher(card, config)
    source = open_source(config.transfer_set)
    policy = RandAugCropFlip(size=size, scale=config.scale, num_ops=config.num_ops, magnitude=config.magnitude)
    codec = TopKLogitsCodec(k=config.topk, num_classes=card.num_classes)
    fields = {"params": ((policy.record_width,), np.dtype(np.int32)), **codec.fields()}
    content = {
        "format_version": FORMAT_VERSION, "teacher": card.to_dict(),
        "transfer_set": {"spec": source.spec, "fingerprint": source.fingerprint()},
        "num_samples": len(source), "views": config.views, "seed": config.seed,
        "policy": policy.to_dict(), "codec": codec.to_dict(),
        "fields": {name: [list(shape), dtype.str] for name, (shape, dtype) in fields.items()},
    }
    existing = _existing_store(Path(config.out), content)
    if existing is not None:
        return existing
    writer = StoreWriter(config.out, content, fields, unit_samples=config.unit_samples,
                         chunk_samples=config.chunk_samples)
    pending = [u for u in range(writer.num_units) if u not in writer.committed_units()]
    _run_teacher(model, device, writer, pending, ViewDataset(source, policy, config.views, config.seed), codec, config)
    manifest = writer.finalize(_library_version())
    log.info("store %s: %s", config.out, manifest.summary)
    return manifest


def _existing_store(path: Path, content: dict[str, Any]) -> StoreManifest | None:
    """The published store at ``path`` if it holds exactly this content; an error if it holds other."""
    if not (path / "manifest.json").exists():
        return None
    store = open_store(path)
    if store.manifest.content != json.loads(json.dumps(content)):
        difference = describe_mismatch(store.manifest.content, content)
        raise ValueError(f"{path} already holds a different store ({difference}); choose another --out")
    log.info("store %s already built (id %s)", path, store.manifest.store_id)
    return store.manifest


def _unit_batches(writer: StoreWriter, units: list[int], samples_per_batch: int) -> list[list[int]]:
    """Batches of sample indices that never straddle a unit: resumed runs batch exactly alike."""
    return [list(span[i: i + samples_per_batch]) for u in units
            for span in [writer.unit_range(u)] for i in range(0, len(span), samples_per_batch)]


@torch.inference_mode()
def _run_teacher(model: TeacherModel, device: torch.device, writer: StoreWriter, units: list[int],
                 dataset: ViewDataset, codec: TopKLogitsCodec, config: BuildConfig) -> None:
    samples_per_batch = max(1, config.batch_size // config.views)
    loader = DataLoader(dataset, batch_sampler=_unit_batches(writer, units, samples_per_batch),
                        num_workers=config.workers, pin_memory=device.type == "cuda",
                        persistent_workers=False)
    cuda = device.type == "cuda"
    total_views = sum(len(writer.unit_range(u)) for u in units) * config.views
    progress = tqdm(total=total_views, unit="view", desc="teacher", dynamic_ncols=True, mininterval=1.0)
    buffer: list[tuple[dict[str, Any], dict[str, np.ndarray]]] = []
    unit_iter = iter(units)
    unit, filled, skipped, start = next(unit_iter, None), 0, 0, time.perf_counter()
    for batch in loader:
        views = batch["views"].flatten(0, 1).to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
            logits = model(views)
        samples = len(batch["error"])
        payload = {k: v.reshape(samples, config.views, *v.shape[1:]) for k, v in codec.encode(logits).items()}
        payload["params"] = batch["params"].numpy()
        failed = np.array([bool(e) for e in batch["error"]])
        for array in payload.values():
            array[failed] = 0  # a skipped sample stores zeros, flagged in samples.parquet
        skipped += int(failed.sum())
        buffer.append((batch, payload))
        filled += len(failed)
        progress.update(len(failed) * config.views)
        progress.set_postfix(img_s=f"{progress.n / (time.perf_counter() - start):.0f}", skipped=skipped)
        if filled == len(writer.unit_range(unit)):
            _commit_unit(writer, dataset.source, unit, buffer)
            buffer, filled, unit = [], 0, next(unit_iter, None)
    progress.close()


def _commit_unit(writer: StoreWriter, source: Source, unit: int,
                 buffer: list[tuple[dict[str, Any], dict[str, np.ndarray]]]) -> None:
    arrays = {name: np.concatenate([payload[name] for _, payload in buffer]) for name in writer.fields}
    heights = np.concatenate([b["height"].numpy() for b, _ in buffer])
    widths = np.concatenate([b["width"].numpy() for b, _ in buffer])
    errors = [e for b, _ in buffer for e in b["error"]]
    rows = [{"index": i, "key": str(source.keys[i]), "uri": str(source.uris[i]), "height": int(h), "width": int(w),
             "status": "skipped" if e else "ok", "error": e or None}
            for i, h, w, e in zip(writer.unit_range(unit), heights, widths, errors)]
    for row in rows:
        if row["error"]:
            log.warning("skipped sample %d (%s): %s", row["index"], row["uri"], row["error"])
    writer.write_unit(unit, arrays, rows)


def _library_version() -> str:
    try:
        return version("vfm-reinforce")
    except PackageNotFoundError:
        return "0+unknown"


def parse_args(argv: list[str] | None = None) -> BuildConfig:
    parser = argparse.ArgumentParser(prog="python -m reinforce.build", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    defaults = BuildConfig(teacher="", transfer_set="", out="")
    parser.add_argument("--teacher", required=True,
                        help="zoo entry: a path or a name under $VFM_REINFORCE_HOME/teachers or ./teachers")
    parser.add_argument("--transfer-set", required=True, help="source spec, see reinforce.sources")
    parser.add_argument("--out", required=True, help="store directory to create")
    parser.add_argument("--views", type=int, default=defaults.views, help="augmented views per sample (K)")
    parser.add_argument("--topk", type=int, default=defaults.topk, help="logits kept per view")
    parser.add_argument("--size", type=int, default=None, help="view size; must equal the teacher's input size")
    parser.add_argument("--num-classes", type=int, default=None, help="expected class count (checked)")
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size, help="teacher batch in views")
    parser.add_argument("--workers", type=int, default=defaults.workers, help="DataLoader decode/augment workers")
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--scale", type=float, nargs=2, default=defaults.scale, help="RandomResizedCrop area range")
    parser.add_argument("--num-ops", type=int, default=defaults.num_ops, help="RandAugment ops per view")
    parser.add_argument("--magnitude", type=int, default=defaults.magnitude, help="RandAugment magnitude (0-30)")
    parser.add_argument("--unit-samples", type=int, default=defaults.unit_samples, help="samples per shard / commit")
    parser.add_argument("--chunk-samples", type=int, default=defaults.chunk_samples, help="samples per read chunk")
    parser.add_argument("--device", default=None, help="cpu | cuda (default: cuda when available)")
    args = parser.parse_args(argv)
    return BuildConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in vars(args).items()})


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
