"""``python -m train.distill``: train a student on a reinforced store; the teacher is never loaded.

Each epoch shows every stored sample once, through one of its K stored views chosen from
(seed, epoch, sample), replayed by ``reinforce.replay`` at the student's size; the targets are the
store's cached teacher outputs decoded by their codecs. Each target gets the loss of its kind
(``--loss auto``: KL at temperature T for top-k logits — task-oriented transfer; cross-entropy against
the empirical distribution, at the store's sampling temperature, for sampled logits; contrastive for an
embedding and cosine for patch features — the task-agnostic baseline); several targets combine
with weights (``--targets logits,embedding:0.5``). Training always runs in a DeepSpeed engine (CPU:
gloo), one process or many under ``torchrun``; a checkpoint is written every epoch (only the last is kept), and a
rerun with ``--resume`` (and, say, a larger ``--epochs``) continues where the last one stopped. Checkpoints are
DeepSpeed's pickle files, trusted only as your own: ``--resume`` loads one only from a run's own ``--out``,
recorded in ``checkpoints/run.json``.

``--views K`` trains on the first K stored views only (the views ablation: they are exactly what a
K-view build stores). ``--online`` is the uncached ceiling the store is measured against: the
store's teacher (``--teacher``, default its zoo entry by name) runs in the loop on a fresh view of
every sample every epoch, drawn from the store's own policy and transfer set, with full logits.

``OUT`` holds ``deepspeed.json`` (the built-in config, when ``--deepspeed`` is not given: edit it and
pass it back), ``checkpoints/``, ``log.jsonl`` (one line per epoch: epoch, step, loss and each
target's loss), the final ``model.safetensors`` + ``student.json``, and ``rank{r}_samples.npy``: the
sample indices rank r consumed in this invocation, one row per epoch run (for auditing the split).
A student distilled without a logits target has no classifier; ``train.finetune`` gives it one.

Example:
    torchrun --nproc_per_node 2 -m train.distill --store runs/fmnist-lite0 \
        --student mobilenetv3_small_050 --size 32 --epochs 10 --temperature 2 --out runs/student
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import webdataset as wds
from torch.utils.data import BatchSampler, DataLoader, DistributedSampler

from reinforce.memory import keep_freed_memory
from reinforce.progress import progress_bar
from reinforce.replay import Replay, ReplayDataset, StreamReplay, open_replay
from reinforce.teachers import TeacherModel, create_teacher
from stores.cli_errors import HelpFormatter, cli_errors, debug_flag
from stores.cli_logging import log_to_stderr
from stores.errors import InputError
from stores.store import describe_mismatch
from train import deepspeed_glue
from train.losses import DistillObjective, create_loss, loss_for
from train.models import Student, create_student, save_student

__all__ = ["DistillConfig", "distill", "main"]

log = logging.getLogger(__name__)
CHECKPOINTS = "checkpoints"
RUN_RECORD = "run.json"  # the identity of the run that wrote checkpoints/, checked before --resume loads them


@dataclasses.dataclass(frozen=True, kw_only=True)
class DistillConfig:
    """Everything ``train.distill`` needs; the CLI is a thin parser onto this."""

    store: str
    student: str
    out: str
    targets: tuple[str, ...] | None = None  # default: every target the store holds
    losses: tuple[str, ...] = ("auto",)  # one per target, or one for all; auto: by the target's kind
    weights: dict[str, float] = dataclasses.field(default_factory=dict)  # per target, default 1
    epochs: int = 10
    temperature: float = 2.0
    size: int | None = None  # default: the store's view size
    batch_size: int = 128  # per rank
    lr: float = 2e-3
    deepspeed: str | None = None  # JSON config; default: train.deepspeed_glue.default_config()
    workers: int = 2
    seed: int = 0
    resume: bool = False  # continue from this run's own checkpoint (pickle: never loaded without it)
    views: int | None = None  # replay only the first K stored views (default: all)
    online: bool = False  # run the teacher on fresh views every step instead of reading cached targets
    teacher: str | None = None  # online: the store's teacher directory (default: its zoo entry by name)


def _identity(batch: Any) -> Any:
    """collate_fn: ``__getitems__`` already returns a collated batch (module-level so workers can use it)."""
    return batch


@torch.no_grad()
def build_objective(student: Student, replay: Replay, config: DistillConfig) -> DistillObjective:
    """The student and one loss per target, sized from the decoded shape of each target (a decode of zeros shaped
    as the manifest says: no read, any store format) and a probe forward."""
    kinds = {name: replay.store.manifest.content.targets[name].kind for name in replay.targets}
    codecs = {name: replay.store.codec(name) for name in replay.targets}
    names = config.losses * len(kinds) if len(config.losses) == 1 else config.losses
    if len(names) != len(kinds):
        raise ValueError(f"--loss gives {len(names)} losses for {len(kinds)} targets {list(kinds)}")
    content = replay.store.manifest.content
    sample = replay.decode({name: {a: np.zeros((1, *spec.shape), spec.dtype)
                                   for a, spec in content.targets[name].arrays.items()} for name in replay.targets})
    blank = torch.zeros(1, 3, replay.size, replay.size, dtype=torch.uint8)
    probe = student.eval().forward_parts(blank, {"embedding", "feature_map"})
    losses = {}
    for (name, kind), loss_name in zip(kinds.items(), names):
        decoded = "log_probs" if config.online else codecs[name].decoded  # online: the teacher's own logits
        loss_name = loss_for(loss_name, kind, decoded)
        teacher_size = sample[name].shape[1]  # embedding dim or patch channels
        # an empirical target estimates the teacher's softmax at the temperature the store drew at
        temperature = codecs[name].temperature if decoded == "empirical" else config.temperature
        losses[name] = create_loss(loss_name, temperature=temperature,
                                   student_dim=probe["embedding"].shape[-1], teacher_dim=teacher_size,
                                   student_channels=probe["feature_map"].shape[1], teacher_channels=teacher_size)
    unknown = sorted(set(config.weights) - set(kinds))
    if unknown:
        raise ValueError(f"weights given for {unknown}, which are not distilled targets {list(kinds)}")
    return DistillObjective(student.train(), losses, config.weights)


def online_teacher(replay: ReplayDataset, config: DistillConfig) -> TeacherModel:
    """The store's teacher, for ``--online``: refused unless its card is the one the store records."""
    if replay.targets not in (("logits",), ("seg_logits",)):  # checked before the weights are read and hashed
        raise ValueError(f"--online distills the teacher's task predictions (logits or seg_logits) only; "
                         f"--targets gives {list(replay.targets)}")
    expected = replay.store.manifest.content.teacher
    model, card = create_teacher(config.teacher or expected.name)
    if card.to_dict() != expected.to_dict():
        raise ValueError(f"--teacher {config.teacher or expected.name!r} is not the teacher of store "
                         f"{config.store!r}: {describe_mismatch(expected.to_dict(), card.to_dict(), 'teacher.')}")
    return model.requires_grad_(False)


def make_loader(dataset: Replay, config: DistillConfig, rank: int,
                world: int) -> DataLoader | wds.WebLoader:
    """``len(dataset) // (world * batch_size)`` whole batches per rank, the same on every rank (collectives never
    wait on a rank that ran out). zarr: equal, disjoint shards per rank (drop_last), reshuffled by ``set_epoch``;
    webdataset: each rank's endless resampled stream (``StreamReplay.batches``) cut to that many batches."""
    batches_per_rank = len(dataset) // (world * config.batch_size)
    if batches_per_rank == 0:
        raise ValueError(f"{len(dataset)} samples over {world} rank(s) make no full batch of {config.batch_size}")
    if isinstance(dataset, StreamReplay):  # with_epoch counts batches on a WebLoader
        return wds.WebLoader(dataset.batches(config.batch_size), batch_size=None, collate_fn=_identity,
                             num_workers=config.workers).with_epoch(batches_per_rank).with_length(batches_per_rank,
                                                                                                   silent=True)
    sampler = DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=True, seed=config.seed,
                                 drop_last=True)
    return DataLoader(dataset, batch_sampler=BatchSampler(sampler, config.batch_size, drop_last=True),
                      collate_fn=_identity, num_workers=config.workers, persistent_workers=False)


def check_resume(config: DistillConfig, identity: dict[str, Any]) -> bool:
    """Whether to load the checkpoint under ``OUT/checkpoints``, decided before DeepSpeed starts.

    DeepSpeed checkpoints are pickle files: loading one runs whatever code it holds. So one is loaded only when
    asked (``--resume``) and only when ``checkpoints/run.json``, written by the run that saved it, records this
    run's identity (store, student, size, ranks, losses, views); never a checkpoint found in a directory someone
    gave you. Without ``--resume`` a directory that holds one is refused rather than silently restarted."""
    directory = Path(config.out) / CHECKPOINTS
    found = (directory / "latest").exists()
    if not config.resume:
        if found:
            raise InputError(f"{directory} holds a checkpoint: rerun with --resume to continue your own run "
                             "(checkpoints are pickle files: load only your own), or choose another --out")
        return False
    if not found:
        raise InputError(f"--resume: no checkpoint under {directory}")
    try:
        recorded = json.loads((directory / RUN_RECORD).read_text())
    except (OSError, ValueError):
        raise InputError(f"--resume: {directory / RUN_RECORD} is missing or unreadable, so {directory} was not "
                         "written by a train.distill run of this --out; refusing to load its pickle files") from None
    expected = json.loads(json.dumps(identity))
    if recorded != expected:
        raise InputError(f"--resume: the checkpoint in {directory} belongs to another run "
                         f"({describe_mismatch(recorded, expected)}); use another --out")
    return True


def resume(engine, config: DistillConfig) -> tuple[int, int]:
    """Load the checkpoint ``check_resume`` allowed; returns (epochs done, steps done)."""
    path, state = engine.load_checkpoint(str(Path(config.out) / CHECKPOINTS))
    if path is None:
        raise InputError(f"checkpoint under {Path(config.out) / CHECKPOINTS} could not be loaded")
    log.info("resumed from %s: epoch %d, step %d", path, state["epoch"], state["step"])
    return int(state["epoch"]), int(state["step"])


def batch_targets(batch: dict[str, Any], replay: Replay, teacher: TeacherModel | None,
                  device: torch.device) -> dict[str, torch.Tensor]:
    """Cached targets decoded, or (online) the teacher's predictions (logits, 1/8 seg_logits) on this batch's
    fresh views."""
    if teacher is None:
        return replay.decode(batch["targets"], device)
    views = batch["teacher_views"].to(device).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode(), torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda"):
        return {kind: value.float() for kind, value in teacher.forward_targets(views, replay.targets).items()}


def train_epoch(engine, loader: DataLoader | wds.WebLoader, replay: Replay, config: DistillConfig, epoch: int,
                rank: int, teacher: TeacherModel | None = None) -> tuple[dict[str, float], np.ndarray]:
    """One pass; returns the mean losses over all ranks (total and per target) and the samples this rank saw."""
    engine.train()
    names = list(engine.module.losses)
    totals, seen = torch.zeros(len(names) + 2, dtype=torch.float64), []
    progress = progress_bar(loader, desc=f"epoch {epoch + 1}/{config.epochs}", unit="batch", disable=rank != 0)
    for batch in progress:
        views = batch["views"].to(engine.device).contiguous(memory_format=torch.channels_last)
        seen.append(batch["index"].numpy())
        loss, parts = engine(views, batch_targets(batch, replay, teacher, engine.device))
        engine.backward(loss)
        engine.step()
        values = [loss.item(), *(parts[name].item() for name in names)]
        totals += torch.tensor([v * len(views) for v in values] + [len(views)], dtype=torch.float64)
        progress.set_postfix(loss=f"{values[0]:.4f}")
    if torch.distributed.is_initialized():
        torch.distributed.all_reduce(totals)
    means = (totals[:-1] / totals[-1].clamp_min(1)).tolist()
    return {"loss": means[0], **{f"loss_{name}": value for name, value in zip(names, means[1:])}}, np.concatenate(seen)


def distill(config: DistillConfig) -> dict[str, Any]:
    """Run (or continue) distillation; returns the history stage written into ``student.json``."""
    replay = open_replay(config.store, targets=config.targets, size=config.size, seed=config.seed,
                         views=config.views, online=config.online)
    content = replay.store.manifest.content
    teacher = online_teacher(replay, config) if config.online else None
    torch.manual_seed(config.seed)  # same initial student and projections on every rank and every rerun
    dense = "seg_logits" in replay.targets
    class_names = content.teacher.class_names if {"logits", "seg_logits"} & set(replay.targets) else ()
    student, card = create_student(config.student, class_names=class_names, input_size=replay.size,
                                   task="segmentation" if dense else "classification")
    objective = build_objective(student, replay, config)
    rank, world = deepspeed_glue.init_distributed()
    Path(config.out).mkdir(parents=True, exist_ok=True)
    if rank != 0:
        log.setLevel(logging.WARNING)  # one copy of the per-epoch log
    elif config.deepspeed is None:  # the built-in config, for the user to edit and pass back with --deepspeed
        deepspeed_glue.write_default_config(Path(config.out) / "deepspeed.json")
    losses = {name: type(loss).name for name, loss in objective.losses.items()}
    identity = {"store_id": replay.store.manifest.store_id, "student": config.student, "size": replay.size,
                "world": world, "losses": losses, "views": replay.views, "online": config.online}
    resuming = check_resume(config, identity)
    # before the first checkpoint: what --resume checks before it loads one. A resumed run's record is already this
    # identity (checked) and is not written again: the other ranks are reading it in check_resume right now
    if rank == 0 and not resuming:
        (Path(config.out) / CHECKPOINTS).mkdir(exist_ok=True)
        (Path(config.out) / CHECKPOINTS / RUN_RECORD).write_text(json.dumps(identity, indent=1, sort_keys=True))
    loader = make_loader(replay, config, rank, world)
    ds_config = deepspeed_glue.resolve_config(deepspeed_glue.load_config(config.deepspeed),
                                              batch_size=config.batch_size, lr=config.lr,
                                              total_steps=config.epochs * len(loader))
    engine = deepspeed_glue.initialize(objective, ds_config)
    start_epoch, start_step = resume(engine, config) if resuming else (0, 0)
    if teacher is not None:
        teacher.to(engine.device)
    seen = _run_epochs(engine, replay, loader, config, start_epoch, identity, teacher)
    stage = {"stage": "distill", "store_id": identity["store_id"],
             "teacher": {"name": content.teacher.name, "weights_sha256": content.teacher.weights_sha256},
             "transfer_set": {"spec": content.transfer_set.spec, "fingerprint": content.transfer_set.fingerprint},
             "targets": list(replay.targets), "losses": losses,
             "weights": objective.weights, "epochs": config.epochs,
             "temperature": objective.losses["logits"].temperature if "logits" in objective.losses
             else config.temperature,
             "steps": int(engine.global_steps), "size": replay.size, "views": replay.views, "online": config.online,
             "resumed_from": {"epoch": start_epoch, "step": start_step} if start_epoch else None,
             "world_size": world, "batch_size": config.batch_size}
    if rank == 0:
        save_student(engine.module.student, card.with_stage(**stage), config.out)
    np.save(Path(config.out) / f"rank{rank}_samples.npy", np.stack(seen) if seen else np.zeros((0, 0), np.int64))
    return stage


def _run_epochs(engine, replay: Replay, loader: DataLoader | wds.WebLoader, config: DistillConfig,
                start_epoch: int, identity: dict[str, Any], teacher: TeacherModel | None) -> list[np.ndarray]:
    """Epochs ``start_epoch..epochs-1``, a checkpoint after each (on every rank: it is collective)."""
    rank = int(torch.distributed.get_rank()) if torch.distributed.is_initialized() else 0
    seen = []
    for epoch in range(start_epoch, config.epochs):
        if isinstance(loader, DataLoader):  # a webdataset stream reseeds itself from replay.epoch
            loader.batch_sampler.sampler.set_epoch(epoch)
        replay.set_epoch(epoch)
        started = time.perf_counter()
        losses, indices = train_epoch(engine, loader, replay, config, epoch, rank, teacher)
        seen.append(indices)
        step = int(engine.global_steps)
        log.info("epoch %d/%d: %s, step %d, %.1f s", epoch + 1, config.epochs,
                 ", ".join(f"{k} {v:.4f}" for k, v in losses.items()), step, time.perf_counter() - started)
        if rank == 0:
            with open(Path(config.out) / "log.jsonl", "a") as f:
                f.write(json.dumps({"epoch": epoch + 1, "step": step, **losses}) + "\n")
        engine.save_checkpoint(str(Path(config.out) / CHECKPOINTS),
                               client_state={"epoch": epoch + 1, "step": step, **identity})
        if rank == 0:  # save_checkpoint ends in a barrier: every rank has written the new one
            _keep_latest_checkpoint(Path(config.out) / CHECKPOINTS)
    return seen


def _keep_latest_checkpoint(directory: Path) -> None:
    """Delete every checkpoint but the one ``latest`` names: ``--resume`` needs no other, and they add up (a small
    student's is ~11 MB; the comparison's 48 runs of 33 epochs kept 17 GB and filled a disk)."""
    latest = (directory / "latest").read_text().strip()
    for tag in directory.glob("global_step*"):
        if tag.is_dir() and tag.name != latest:
            shutil.rmtree(tag)


def _targets(text: str | None) -> tuple[tuple[str, ...] | None, dict[str, float]]:
    """``logits,embedding:0.5`` -> (("logits", "embedding"), {"embedding": 0.5})."""
    if not text:
        return None, {}
    names, weights = [], {}
    for item in text.split(","):
        name, _, weight = item.strip().partition(":")
        names.append(name)
        if weight:
            weights[name] = float(weight)
    return tuple(names), weights


def build_parser() -> argparse.ArgumentParser:
    """``train.distill``'s command line (``train.pipeline`` checks a recipe's section with it)."""
    parser = argparse.ArgumentParser(prog="python -m train.distill", description=__doc__.split("\n\n")[0],
                                     formatter_class=HelpFormatter)
    defaults = DistillConfig(store="", student="", out="")
    parser.add_argument("--store", required=True, help="reinforced store directory (reinforce.build --out)")
    parser.add_argument("--student", required=True, help="timm architecture, e.g. mobilenetv3_small_050")
    parser.add_argument("--out", required=True, help="run directory: checkpoints, logs, final student")
    parser.add_argument("--targets", default=None,
                        help="store targets to distill, with optional weights: logits,embedding:0.5 (default: all)")
    parser.add_argument("--loss", default="auto",
                        help="auto (by target kind and codec: top-k logits kl, sampled logits sampled_ce at the "
                             "store's sampling temperature, embedding contrastive, patch cosine), or loss names one "
                             "per target: kl | sampled_ce | contrastive | cosine | pixel_kl")
    parser.add_argument("--epochs", type=int, default=defaults.epochs, help="total epochs (a rerun continues)")
    parser.add_argument("--temperature", type=float, default=defaults.temperature,
                        help="distillation T (sampled targets: the store's sampling T instead)")
    parser.add_argument("--size", type=int, default=None, help="student input size (default: the store's)")
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size, help="micro-batch per rank")
    parser.add_argument("--lr", type=float, default=defaults.lr, help="peak learning rate ('auto' in the config)")
    parser.add_argument("--deepspeed", default=None, help="DeepSpeed JSON config (default: built in)")
    parser.add_argument("--workers", type=int, default=defaults.workers, help="DataLoader workers per rank")
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--resume", action="store_true",
                        help="continue this run from its checkpoint under --out (DeepSpeed pickle files: only your "
                             "own run's, recorded in checkpoints/run.json, are loaded)")
    parser.add_argument("--views", type=int, default=None, help="replay only the first K stored views (default: all)")
    parser.add_argument("--online", action="store_true",
                        help="uncached ceiling: the store's teacher runs on a fresh view of every sample every step")
    parser.add_argument("--teacher", default=None, help="--online: the store's teacher (default: its zoo entry)")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)  # DeepSpeed
    return debug_flag(parser)


def parse_args(argv: list[str] | None = None) -> tuple[DistillConfig, bool]:
    """The run's config and whether ``--debug`` was given."""
    parser = build_parser()
    args = vars(parser.parse_args(argv))
    args.pop("local_rank")  # the DeepSpeed launcher passes it and sets LOCAL_RANK, which init_distributed reads
    args["targets"], args["weights"] = _targets(args["targets"])
    args["losses"] = tuple(name.strip() for name in args.pop("loss").split(","))
    debug = args.pop("debug")
    return DistillConfig(**args), debug


def main(argv: list[str] | None = None) -> int:
    keep_freed_memory()
    log_to_stderr()
    config, debug = parse_args(argv)
    with cli_errors("train.distill", debug):
        if config.epochs < 1 or config.temperature <= 0:
            raise ValueError("--epochs must be >= 1 and --temperature > 0")
        stage = distill(config)
    if stage["steps"] and (torch.distributed.get_rank() if torch.distributed.is_initialized() else 0) == 0:
        print(f"student {config.out}: {stage['epochs']} epochs, {stage['steps']} steps")
    return 0


if __name__ == "__main__":
    sys.exit(main())
