"""The one writer of safetensors files: weights as readable as the json files beside them.

``safetensors.torch.save_file`` (>= 0.8) writes through a 0600 temporary file, so a teacher or
student meant to be shared is unreadable to a colleague or a container running as another user,
while its json neighbours are not. ``save_tensors`` gives a new file the mode any new file gets
under the process umask (``0o666 & ~umask``) and an overwritten file its previous mode.

Example:
    >>> save_tensors({"weight": torch.zeros(3)}, "runs/student/model.safetensors")
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

import torch
from safetensors.torch import save_file

__all__ = ["save_tensors"]


def save_tensors(tensors: dict[str, torch.Tensor], path: str | os.PathLike) -> Path:
    """Write ``tensors`` (moved to CPU, made contiguous) to ``path``; returns the path."""
    path = Path(path)
    mode = stat.S_IMODE(path.stat().st_mode) if path.exists() else 0o666 & ~_umask()
    save_file({name: tensor.detach().contiguous().cpu() for name, tensor in tensors.items()}, str(path))
    os.chmod(path, mode)
    return path


def _umask() -> int:
    """The process umask (Python has no getter: set it and put it back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask
