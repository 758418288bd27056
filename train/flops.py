"""Training compute per result row, in FLOPs, counted by building the models (the paper's Fig. 3): teacher
adaptation + teacher pass (teacher forward FLOPs per view x views stored by the build) + student (3 x student
forward FLOPs per image x images seen in distillation and finetuning). Forward FLOPs are measured once per
(model, size) with ``torch.utils.flop_counter.FlopCounterMode`` and cached in ``RUN/flops.json``.

Example:
    >>> FlopsCounter(Path("runs/pipeline")).cell(teacher_dir, store_dir, model_dir)
    {'teacher_adapt_flops': ..., 'teacher_pass_flops': ..., 'student_flops': ..., 'compute_flops': ...}
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Callable
from pathlib import Path

from reinforce.teachers import read_teacher_card
from stores.location import Location
from stores.store import read_manifest
from train.models import read_student_card

__all__ = ["FlopsCounter", "forward_flops"]


def forward_flops(model: Callable, views) -> int:
    """FLOPs of one forward pass of ``views`` (FlopCounterMode counts a multiply-add as 2)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter, torch.inference_mode():
        model(views)
    return int(counter.get_total_flops())


class FlopsCounter:
    """Forward FLOPs per image, measured once per (model, size) and cached in ``RUN/flops.json``."""

    def __init__(self, run_dir: Path):
        self.path = run_dir / "flops.json"
        self.cache = json.loads(self.path.read_text()) if self.path.exists() else {}
        self.lock = threading.Lock()  # cells running side by side (``jobs``) measure a model once

    def forward(self, key: str, build: Callable[[], tuple[Callable, int]]) -> int:
        """FLOPs of one uint8 view through ``build()``'s model (``(callable, size)``), cached under ``key``."""
        with self.lock:
            if key not in self.cache:
                import torch

                model, size = build()
                self.cache[key] = forward_flops(model, torch.zeros(1, 3, size, size, dtype=torch.uint8))
                tmp = self.path.with_name(self.path.name + ".tmp")
                tmp.write_text(json.dumps(self.cache, indent=1))
                os.replace(tmp, self.path)
            return self.cache[key]

    def teacher_forward(self, teacher_dir: Path) -> int:
        card = read_teacher_card(teacher_dir)

        def build():
            from reinforce.teachers import create_teacher

            model, loaded = create_teacher(str(teacher_dir))
            # a classifier: the backbone (its head adds ~nothing); a segmenter: backbone + DeepLab head at stride 8
            return (model if dense else model.features), loaded.input_size

        dense = card.adaptation.get("task") == "segmentation"
        return self.forward(f"teacher:{card.library}:{card.backbone}@{card.input_size}" + ("/seg" * dense), build)

    def student_forward(self, arch: str, size: int, task: str = "classification") -> int:
        def build():
            from train.models import create_student

            return create_student(arch, class_names=tuple("0123456789"), input_size=size, task=task)[0].eval(), size

        return self.forward(f"student:{arch}@{size}" + ("/seg" if task == "segmentation" else ""), build)

    def teacher_adapt(self, teacher_dir: Path) -> int:
        """Teacher passes spent on adapting the saved teacher: probe features (lp) or 3x per trained image (ft); a
        segmentation lp trains its head on fresh views, one backbone forward per image per step. Like the students',
        the cross-validation runs that chose the setting are not counted (their seconds are)."""
        adaptation = read_teacher_card(teacher_dir).adaptation
        images = adaptation.get("train_images", 0)
        if adaptation["mode"] not in ("lp", "ft") or not images:
            return 0
        batch = min(adaptation["batch_size"], images)
        if adaptation.get("task") == "segmentation":  # lp runs the frozen backbone forward on every step's batch
            passes = (3 if adaptation["mode"] == "ft" else 1) * adaptation["steps"] * batch
        elif adaptation["mode"] == "lp":
            passes = images * (adaptation.get("lp_views", 0) + 1)
        else:
            passes = 3 * adaptation["steps"] * batch
        return self.teacher_forward(teacher_dir) * passes  # the model trained; selection runs are not counted

    def student_images(self, model_dir: Path) -> tuple[str, int, int, str]:
        """(arch, size, images seen in every training stage, task) of a student directory."""
        card = read_student_card(model_dir)
        images = 0
        for stage in card.history:
            if stage["stage"] == "distill":
                images += stage["steps"] * stage["batch_size"] * stage.get("world_size", 1)
            else:
                batch = min(stage["batch_size"], stage.get("train_images", stage["batch_size"]))
                images += stage.get("steps_run", stage["steps"]) * batch  # the final model's run
        return card.arch, card.input_size, images, card.task

    def cell(self, teacher_dir: Path | None, store_dir: Path | None, model_dir: Path) -> dict[str, int]:
        """The compute columns of one result row (teacher and store are None for labeled-only)."""
        arch, size, images, task = self.student_images(model_dir)
        student = 3 * self.student_forward(arch, size, task) * images
        adapt = passes = 0
        if teacher_dir is not None and store_dir is not None:
            manifest = read_manifest(Location(store_dir))
            adapt = self.teacher_adapt(teacher_dir)
            distill = next(s for s in read_student_card(model_dir).history
                           if s["stage"] == "distill")
            if distill.get("online"):  # the teacher ran on every image the student saw
                views = distill["steps"] * distill["batch_size"] * distill.get("world_size", 1)
            else:  # a views ablation pays only for the views it reads (a build of that many)
                views = manifest.summary["stored_views"] * distill.get("views", manifest.views) // manifest.views
            passes = self.teacher_forward(teacher_dir) * views
        return {"teacher_adapt_flops": adapt, "teacher_pass_flops": passes, "student_flops": student,
                "compute_flops": adapt + passes + student}
