"""DeepSpeed set-up shared by the training commands: one editable JSON config, one init path.

Every training run goes through a real DeepSpeed engine, also on a CPU-only machine (gloo,
``DS_ACCELERATOR=cpu``) and also as a single process without a launcher, so the code that runs on
a laptop is the code that runs on a GPU node. Values set to ``"auto"`` in a config are filled in
from the command line (batch size, learning rate, schedule length); explicit values are kept.

Example:
    >>> write_default_config("ds.json")                     # edit it, then pass --deepspeed ds.json
    >>> rank, world = init_distributed()
    >>> engine = initialize(model, resolve_config(load_config("ds.json"), batch_size=64, lr=2e-3,
    ...                                           total_steps=1000))
"""

from __future__ import annotations

import copy
import json
import os
import socket
from pathlib import Path
from typing import Any

import torch

__all__ = ["default_config", "init_distributed", "initialize", "load_config", "resolve_config",
           "write_default_config"]

AUTO = "auto"


def default_config(*, cuda: bool | None = None) -> dict[str, Any]:
    """AdamW (torch implementation: no op builds; ``fused``, one kernel over every parameter, on CPU too) +
    warmup-cosine schedule + clipping; bf16 autocast on CUDA.

    bf16 goes through ``torch_autocast`` only: DeepSpeed's ``bf16`` mode casts parameters but not
    BatchNorm buffers, which fails on CPU and changes BatchNorm numerics on GPU.
    """
    cuda = torch.cuda.is_available() if cuda is None else cuda
    return {
        "train_micro_batch_size_per_gpu": AUTO,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": 1.0,
        "steps_per_print": 10**9,  # progress comes from our own logging
        "optimizer": {"type": "AdamW",
                      "params": {"lr": AUTO, "betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": 0.05,
                                 "torch_adam": True, "fused": True}},
        "scheduler": {"type": "WarmupCosineLR",
                      "params": {"total_num_steps": AUTO, "warmup_num_steps": AUTO, "warmup_min_ratio": 0.0,
                                 "cos_min_ratio": 0.01, "warmup_type": "linear"}},
        "torch_autocast": {"enabled": cuda, "dtype": "bfloat16"},
        "zero_optimization": {"stage": 0},
        "wall_clock_breakdown": False,
    }


def write_default_config(path: str | os.PathLike, *, cuda: bool | None = None) -> Path:
    """Write the default config as JSON for the user to edit; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(default_config(cuda=cuda), indent=2) + "\n")
    return path


def load_config(path: str | os.PathLike | None) -> dict[str, Any]:
    """A user's JSON config, or the default one when ``path`` is None."""
    if path is None:
        return default_config()
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"DeepSpeed config {str(path)!r} does not exist; "
                                "create one with train.deepspeed_glue.write_default_config")
    return json.loads(path.read_text())


def resolve_config(config: dict[str, Any], *, batch_size: int, lr: float, total_steps: int) -> dict[str, Any]:
    """Replace ``"auto"`` values with the run's (warmup: 5% of the steps); explicit values in the file win."""
    config = copy.deepcopy(config)
    warmup = max(1, total_steps // 20)
    _fill(config, ("train_micro_batch_size_per_gpu",), batch_size)
    _fill(config, ("optimizer", "params", "lr"), lr)
    _fill(config, ("scheduler", "params", "total_num_steps"), max(1, total_steps))
    _fill(config, ("scheduler", "params", "warmup_num_steps"), min(warmup, max(1, total_steps)))
    _fill(config, ("scheduler", "params", "warmup_max_lr"), lr)
    leftover = [key for key, value in _walk(config) if value == AUTO]
    if leftover:
        raise ValueError(f"DeepSpeed config keeps 'auto' where no value is known: {', '.join(leftover)}")
    return config


def _fill(config: dict[str, Any], keys: tuple[str, ...], value: Any) -> None:
    node = config
    for key in keys[:-1]:
        node = node.get(key)
        if not isinstance(node, dict):
            return
    if node.get(keys[-1]) == AUTO:
        node[keys[-1]] = value


def _walk(node: Any, prefix: str = ""):
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _walk(value, f"{prefix}.{key}" if prefix else key)
    else:
        yield prefix, node


def init_distributed() -> tuple[int, int]:
    """Join the process group started by torchrun/deepspeed, or make a world of one; returns (rank, world).

    Chooses the CPU accelerator (gloo) when there is no GPU, before DeepSpeed is imported.
    """
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    import deepspeed

    deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo",
                               verbose=False)
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def initialize(model: torch.nn.Module, config: dict[str, Any]):
    """``deepspeed.initialize`` on all trainable parameters; returns the engine (optimizer and schedule inside).

    Parameters are made contiguous first: DeepSpeed broadcasts them as flat byte views, which
    channels_last weights do not allow. Without ZeRO the engine keeps the parameter objects, so
    they go back to channels_last afterwards (in place: the optimizer still holds the same tensors).
    """
    import deepspeed

    model = model.to(memory_format=torch.contiguous_format)
    engine, _, _, _ = deepspeed.initialize(
        model=model, model_parameters=[p for p in model.parameters() if p.requires_grad], config=config)
    if engine.zero_optimization_stage() == 0:  # unflattened weights: channels_last again (2x faster convs on CPU)
        engine.module.to(memory_format=torch.channels_last)
    return engine
