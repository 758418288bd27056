"""``python -m train.distill``: train a student on a reinforced store; the teacher is never loaded.

Each epoch shows every stored sample once, through one of its K stored views chosen from
(seed, epoch, sample). The view is re-rendered from the stored augmentation record at the
student's size, and the target is the stored teacher prediction decoded by the store's codec.
Loss: ``T² · KL(teacher_T ‖ student_T)``. Training always runs in a DeepSpeed engine (CPU: gloo),
one process or many under ``torchrun``; a checkpoint is written every epoch and picked up again
automatically, so a rerun with a larger ``--epochs`` continues where the last one stopped.

``OUT`` holds ``deepspeed.json`` (the built-in config, when ``--deepspeed`` is not given: edit it and
pass it back), ``checkpoints/``, ``log.jsonl`` (one line per epoch: epoch, step, loss), the final
``model.safetensors`` + ``student.json``, and ``rank{r}_samples.npy``: the sample indices rank r
consumed in this invocation, one row per epoch run (for auditing the data split).

Example:
    torchrun --nproc_per_node 2 -m train.distill --store runs/fmnist-lite0 \
        --student mobilenetv3_small_050 --size 32 --epochs 10 --temperature 2 --out runs/student
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import BatchSampler, DataLoader, Dataset, DistributedSampler
from tqdm import tqdm

from reinforce.augment import AugParams, RandAugCropFlip
from reinforce.sources import Source, open_source
from stores.codecs import create_codec
from stores.store import ReinforcedStore, StoreCorruptError, open_store
from train import deepspeed_glue
from train.models import create_student, save_student

__all__ = ["DistillConfig", "StoreViews", "distill", "kd_loss", "main"]

log = logging.getLogger(__name__)
CHECKPOINTS = "checkpoints"


@dataclasses.dataclass(frozen=True, kw_only=True)
class DistillConfig:
    """Everything ``train.distill`` needs; the CLI is a thin parser onto this."""

    store: str
    student: str
    out: str
    epochs: int = 10
    temperature: float = 2.0
    size: int | None = None  # default: the store's view size
    batch_size: int = 128  # per rank
    lr: float = 2e-3
    deepspeed: str | None = None  # JSON config; default: train.deepspeed_glue.default_config()
    workers: int = 2
    seed: int = 0
    resume: bool = False  # require a checkpoint (one is always used when present)


class StoreViews(Dataset):
    """Position p -> ok sample ``indices[p]``: one stored view re-rendered at ``size`` + its targets.

    Batches come through ``__getitems__`` so a batch's targets cost one ``store.read``. Holds only
    numpy state (no polars), so fork-based DataLoader workers are safe.
    """

    def __init__(self, store: ReinforcedStore, source: Source, indices: np.ndarray, size: int, seed: int):
        content = store.manifest.content
        self.store, self.source, self.indices, self.size, self.seed = store, source, indices, size, seed
        self.policy = RandAugCropFlip.from_dict(content["policy"])
        self.views = int(content["views"])
        self.set_epoch(0)

    def __len__(self) -> int:
        return len(self.indices)

    def set_epoch(self, epoch: int) -> None:
        """Pick each sample's view for ``epoch``: a function of (seed, epoch, sample index) only."""
        rng = np.random.default_rng([self.seed, epoch])
        self.view_of = rng.integers(0, self.views, size=int(self.indices.max(initial=0)) + 1)

    def __getitem__(self, position: int) -> dict[str, torch.Tensor]:
        return {k: v[0] for k, v in self.__getitems__([position]).items()}

    def __getitems__(self, positions: list[int]) -> dict[str, torch.Tensor]:
        samples = self.indices[np.asarray(positions, dtype=np.int64)]
        views = self.view_of[samples]
        stored = self.store.read(samples, views)
        rendered = [self.policy.apply(self.source.load(int(i)), AugParams.from_array(p), size=self.size)
                    for i, p in zip(samples, stored.pop("params"))]
        payload = {k: torch.from_numpy(v.astype(np.int32) if v.dtype == np.uint16 else v) for k, v in stored.items()}
        return {"views": torch.stack(rendered), "index": torch.from_numpy(samples), **payload}


def _identity(batch: Any) -> Any:
    """collate_fn: ``__getitems__`` already returns a collated batch (module-level so workers can use it)."""
    return batch


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """``T² · KL(softmax(teacher/T) ‖ softmax(student/T))``, mean over the batch (Hinton et al. scaling)."""
    student = F.log_softmax(student_logits.float() / temperature, dim=-1)
    teacher = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    return F.kl_div(student, teacher, log_target=True, reduction="batchmean") * temperature**2


def open_inputs(config: DistillConfig) -> tuple[ReinforcedStore, Source, np.ndarray]:
    """Store, its transfer set (checked against the recorded fingerprint) and the ok sample indices."""
    store = open_store(config.store)
    spec = store.manifest.content["transfer_set"]
    source = open_source(spec["spec"])
    if source.fingerprint() != spec["fingerprint"]:
        raise ValueError(f"transfer set {spec['spec']!r} no longer matches the store {config.store!r} "
                         "(fingerprint differs): the images changed since the build")
    samples = store.samples
    ok = samples.filter(samples["status"] == "ok")["index"].to_numpy().astype(np.int64)
    if len(ok) == 0:
        raise ValueError(f"store {config.store!r} has no usable samples")
    return store, source, ok


def make_loader(dataset: StoreViews, config: DistillConfig, rank: int, world: int) -> DataLoader:
    """Equal, disjoint shards per rank (drop_last) cut into whole batches; reshuffled by ``set_epoch``."""
    sampler = DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=True, seed=config.seed,
                                 drop_last=True)
    batches = BatchSampler(sampler, config.batch_size, drop_last=True)
    if len(batches) == 0:
        raise ValueError(f"{len(dataset)} samples over {world} rank(s) make no full batch of {config.batch_size}")
    return DataLoader(dataset, batch_sampler=batches, collate_fn=_identity, num_workers=config.workers,
                      persistent_workers=False)


def resume(engine, config: DistillConfig, identity: dict[str, Any]) -> tuple[int, int]:
    """Load the checkpoint under ``OUT/checkpoints`` if any; returns (epochs done, steps done)."""
    directory = Path(config.out) / CHECKPOINTS
    if not (directory / "latest").exists():
        if config.resume:
            raise FileNotFoundError(f"--resume: no checkpoint under {str(directory)!r}")
        return 0, 0
    path, state = engine.load_checkpoint(str(directory))
    if path is None:
        raise ValueError(f"checkpoint under {str(directory)!r} could not be loaded")
    saved = {k: state.get(k) for k in identity}
    if saved != identity:
        raise ValueError(f"checkpoint in {str(directory)!r} belongs to another run ({saved} != {identity}); "
                         "use another --out")
    log.info("resumed from %s: epoch %d, step %d", path, state["epoch"], state["step"])
    return int(state["epoch"]), int(state["step"])


def train_epoch(engine, loader: DataLoader, codec, config: DistillConfig, epoch: int,
                rank: int) -> tuple[float, np.ndarray]:
    """One pass; returns the mean loss over all ranks and the sample indices this rank consumed."""
    engine.train()
    total, seen = torch.zeros(2, dtype=torch.float64), []
    progress = tqdm(loader, desc=f"epoch {epoch + 1}/{config.epochs}", disable=rank != 0, dynamic_ncols=True,
                    mininterval=1.0)
    for batch in progress:
        views = batch.pop("views").to(engine.device).contiguous(memory_format=torch.channels_last)
        seen.append(batch.pop("index").numpy())
        targets = codec.decode_logits({k: v.to(engine.device) for k, v in batch.items()})
        loss = kd_loss(engine(views), targets, config.temperature)
        engine.backward(loss)
        engine.step()
        total += torch.tensor([loss.item() * len(views), len(views)], dtype=torch.float64)
        progress.set_postfix(loss=f"{loss.item():.4f}")
    if torch.distributed.is_initialized():
        torch.distributed.all_reduce(total)
    return float(total[0] / total[1].clamp_min(1)), np.concatenate(seen)


def distill(config: DistillConfig) -> dict[str, Any]:
    """Run (or continue) distillation; returns the history stage written into ``student.json``."""
    store, source, ok = open_inputs(config)
    content = store.manifest.content
    size = config.size or int(content["policy"]["size"])
    torch.manual_seed(config.seed)  # same initial student on every rank and every rerun
    model, card = create_student(config.student, class_names=tuple(content["teacher"]["class_names"]),
                                 input_size=size)
    rank, world = deepspeed_glue.init_distributed()
    Path(config.out).mkdir(parents=True, exist_ok=True)
    if rank != 0:
        log.setLevel(logging.WARNING)  # one copy of the per-epoch log
    elif config.deepspeed is None:  # the built-in config, for the user to edit and pass back with --deepspeed
        deepspeed_glue.write_default_config(Path(config.out) / "deepspeed.json")
    dataset = StoreViews(store, source, ok, size, config.seed)
    loader = make_loader(dataset, config, rank, world)
    ds_config = deepspeed_glue.resolve_config(deepspeed_glue.load_config(config.deepspeed),
                                              batch_size=config.batch_size, lr=config.lr,
                                              total_steps=config.epochs * len(loader))
    engine = deepspeed_glue.initialize(model, ds_config)
    identity = {"store_id": store.manifest.store_id, "student": config.student, "size": size, "world": world}
    start_epoch, start_step = resume(engine, config, identity)
    seen = _run_epochs(engine, dataset, loader, create_codec(**content["codec"]), config, start_epoch, identity)
    stage = {"stage": "distill", "store_id": store.manifest.store_id, "epochs": config.epochs,
             "temperature": config.temperature, "steps": int(engine.global_steps), "size": size,
             "resumed_from": {"epoch": start_epoch, "step": start_step} if start_epoch else None,
             "world_size": world, "batch_size": config.batch_size}
    if rank == 0:
        save_student(engine.module, card.with_stage(**stage), config.out)
    out = Path(config.out)
    np.save(out / f"rank{rank}_samples.npy", np.stack(seen) if seen else np.zeros((0, 0), dtype=np.int64))
    return stage


def _run_epochs(engine, dataset: StoreViews, loader: DataLoader, codec, config: DistillConfig,
                start_epoch: int, identity: dict[str, Any]) -> list[np.ndarray]:
    """Epochs ``start_epoch..epochs-1``, a checkpoint after each (on every rank: it is collective)."""
    rank = int(torch.distributed.get_rank()) if torch.distributed.is_initialized() else 0
    seen = []
    for epoch in range(start_epoch, config.epochs):
        loader.batch_sampler.sampler.set_epoch(epoch)
        dataset.set_epoch(epoch)
        started = time.perf_counter()
        loss, indices = train_epoch(engine, loader, codec, config, epoch, rank)
        seen.append(indices)
        step = int(engine.global_steps)
        log.info("epoch %d/%d: loss %.4f, step %d, %.1f s", epoch + 1, config.epochs, loss, step,
                 time.perf_counter() - started)
        if rank == 0:
            with open(Path(config.out) / "log.jsonl", "a") as f:
                f.write(json.dumps({"epoch": epoch + 1, "step": step, "loss": loss}) + "\n")
        engine.save_checkpoint(str(Path(config.out) / CHECKPOINTS),
                               client_state={"epoch": epoch + 1, "step": step, **identity})
    return seen


def parse_args(argv: list[str] | None = None) -> DistillConfig:
    parser = argparse.ArgumentParser(prog="python -m train.distill", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    defaults = DistillConfig(store="", student="", out="")
    parser.add_argument("--store", required=True, help="reinforced store directory (reinforce.build --out)")
    parser.add_argument("--student", required=True, help="timm architecture, e.g. mobilenetv3_small_050")
    parser.add_argument("--out", required=True, help="run directory: checkpoints, logs, final student")
    parser.add_argument("--epochs", type=int, default=defaults.epochs, help="total epochs (a rerun continues)")
    parser.add_argument("--temperature", type=float, default=defaults.temperature, help="distillation T")
    parser.add_argument("--size", type=int, default=None, help="student input size (default: the store's)")
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size, help="micro-batch per rank")
    parser.add_argument("--lr", type=float, default=defaults.lr, help="peak learning rate ('auto' in the config)")
    parser.add_argument("--deepspeed", default=None, help="DeepSpeed JSON config (default: built in)")
    parser.add_argument("--workers", type=int, default=defaults.workers, help="DataLoader workers per rank")
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--resume", action="store_true", help="fail unless a checkpoint exists under --out")
    return DistillConfig(**vars(parser.parse_args(argv)))


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    config = parse_args(argv)
    if config.epochs < 1 or config.temperature <= 0:
        print("train.distill: error: --epochs must be >= 1 and --temperature > 0", file=sys.stderr)
        return 2
    try:
        stage = distill(config)
    except (ValueError, FileNotFoundError, StoreCorruptError) as error:
        print(f"train.distill: error: {error}", file=sys.stderr)
        return 2
    if stage["steps"] and (torch.distributed.get_rank() if torch.distributed.is_initialized() else 0) == 0:
        print(f"student {config.out}: {stage['epochs']} epochs, {stage['steps']} steps")
    return 0


if __name__ == "__main__":
    sys.exit(main())
