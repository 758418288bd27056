"""Shared fixtures: the real Lite0 ImageNet teacher (built once per session) and real photos."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from PIL import Image

PHOTO_NAMES = ("astronaut", "chelsea", "coffee", "rocket", "immunohistochemistry", "hubble_deep_field")


@pytest.fixture(scope="session")
def vfm_home(tmp_path_factory) -> Path:
    """A private $VFM_REINFORCE_HOME, so the converted weights cache never touches the user's."""
    home = tmp_path_factory.mktemp("vfm_home")
    previous = os.environ.get("VFM_REINFORCE_HOME")
    os.environ["VFM_REINFORCE_HOME"] = str(home)
    yield home
    if previous is None:
        os.environ.pop("VFM_REINFORCE_HOME", None)
    else:
        os.environ["VFM_REINFORCE_HOME"] = previous


@pytest.fixture(scope="session")
def lite0_teacher(vfm_home):
    """``(model, card, zoo_dir)``: real pretrained Lite0 with its 1000-class head, 64 px input."""
    from reinforce.teachers import embedded_imagenet_teacher, save_teacher

    model, card = embedded_imagenet_teacher(64)
    zoo_dir = vfm_home / "teachers" / "lite0_in1k"
    card = save_teacher(model, card, zoo_dir)
    return model, card, zoo_dir


@pytest.fixture(scope="session")
def random_weights():
    """``fn(library, name, path) -> str``: a random backbone's state_dict as a local checkpoint (stands in for
    real weights, which this machine cannot download)."""
    from reinforce.teachers import create_backbone
    from reinforce.tensor_files import save_tensors

    def write(library: str, name: str, path) -> str:
        return str(save_tensors(create_backbone(library, name).library_state_dict(), path))
    return write


@pytest.fixture(scope="session")
def photo_dir(tmp_path_factory) -> Path:
    """Real RGB photographs from scikit-image, written as PNG files (a ``folder:`` transfer set)."""
    from skimage import data as skdata

    root = tmp_path_factory.mktemp("photos")
    for name in PHOTO_NAMES:
        Image.fromarray(getattr(skdata, name)()).save(root / f"{name}.png")
    return root
