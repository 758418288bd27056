"""The one writer and reader of safetensors files: weights as readable as the json files beside them, and a
damaged or foreign file refused in one line.

``safetensors.torch.save_file`` (>= 0.8) writes through a 0600 temporary file, so a teacher or
student meant to be shared is unreadable to a colleague or a container running as another user,
while its json neighbours are not. ``save_tensors`` gives a new file the mode any new file gets
under the process umask (``0o666 & ~umask``) and an overwritten file its previous mode.

Weights arrive from others (a teacher zoo entry, a student directory, ``--weights``), so ``load_tensors``
turns safetensors' own errors (a corrupt or oversized header, a truncated file) and a missing file into an
``InputError`` naming the file: the CLIs print it as one line.

Example:
    >>> save_tensors({"weight": torch.zeros(3)}, "runs/student/model.safetensors")
    >>> load_tensors("runs/student/model.safetensors")["weight"].shape
    torch.Size([3])
"""

from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save, save_file

from stores.errors import InputError

__all__ = ["load_tensors", "save_tensors", "tensors_sha256"]


def load_tensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The tensors of the safetensors file ``path`` (on CPU); ``InputError`` naming it when it cannot be read."""
    try:
        return load_file(str(path))
    except FileNotFoundError:
        raise InputError(f"{path}: no such file") from None
    except SafetensorError as error:
        raise InputError(f"{path} is not a readable safetensors file ({str(error).splitlines()[0]})") from None


def save_tensors(tensors: dict[str, torch.Tensor], path: str | os.PathLike) -> Path:
    """Write ``tensors`` (moved to CPU, made contiguous) to ``path``; returns the path."""
    path = Path(path)
    mode = stat.S_IMODE(path.stat().st_mode) if path.exists() else 0o666 & ~_umask()
    save_file({name: tensor.detach().contiguous().cpu() for name, tensor in tensors.items()}, str(path))
    os.chmod(path, mode)
    return path


def tensors_sha256(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 of the file ``save_tensors`` would write for ``tensors`` (safetensors bytes are canonical: equal
    tensors under equal names give equal bytes), without writing it."""
    return hashlib.sha256(save({name: t.detach().contiguous().cpu() for name, t in tensors.items()})).hexdigest()


def _umask() -> int:
    """The process umask (Python has no getter: set it and put it back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask
