"""Transfer-set sources: every spec kind opens the same real images in a stable order."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch
from PIL import Image
from skimage import data as skdata

from reinforce import sources
from reinforce.sources import few_shot_split, open_source

PHOTOS = {"coffee": skdata.coffee, "chelsea": skdata.chelsea, "rocket": skdata.rocket}


@pytest.fixture(scope="module")
def photo_tree(tmp_path_factory):
    """An ImageFolder-style tree of real photographs (two classes) as PNG files."""
    root = tmp_path_factory.mktemp("photos")
    for name, load in PHOTOS.items():
        cls = "cat" if name == "chelsea" else "thing"
        (root / cls).mkdir(exist_ok=True)
        Image.fromarray(load()).save(root / cls / f"{name}.png")
    return root


def test_fashion_mnist_split_is_seeded_and_disjoint():
    labeled = open_source("fashion-mnist:train?shots=10&seed=3&part=labeled")
    unlabeled = open_source("fashion-mnist:train?shots=10&seed=3&part=unlabeled")
    assert len(labeled) == 100 and len(unlabeled) == 59_900
    assert np.bincount(labeled.labels).tolist() == [10] * 10
    assert not set(labeled.keys) & set(unlabeled.keys)
    again = open_source("fashion-mnist:train?shots=10&seed=3&part=labeled")
    assert labeled.fingerprint() == again.fingerprint()
    assert labeled.fingerprint() != open_source("fashion-mnist:train?shots=10&seed=4&part=labeled").fingerprint()
    image = labeled.load(0)
    assert image.dtype == torch.uint8 and image.shape == (3, 28, 28)


def test_few_shot_split_rejects_too_few_images():
    with pytest.raises(ValueError, match="fewer than shots"):
        few_shot_split(np.array([0, 0, 1]), shots=2)


def test_missing_fashion_mnist_says_how_to_get_it(monkeypatch, tmp_path):
    monkeypatch.setattr(sources, "FASHION_MNIST_DIR", tmp_path)
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        open_source("fashion-mnist:train")


def test_folder_imagefolder_manifest_and_tar_agree(photo_tree, tmp_path):
    folder = open_source(f"folder:{photo_tree}")
    tree = open_source(f"imagefolder:{photo_tree}")
    assert folder.labels is None and tree.class_names == ("cat", "thing")
    assert tree.labels.tolist() == [0, 1, 1]  # cat/chelsea, thing/coffee, thing/rocket
    manifest = tmp_path / "m.parquet"
    pl.DataFrame({"uri": [str(u) for u in tree.uris], "label": tree.labels}).write_parquet(manifest)
    from_manifest = open_source(str(manifest))
    shard = tmp_path / "shard-000.tar"
    with tarfile.open(shard, "w") as tar:
        for key, uri in zip(tree.keys, tree.uris):
            payload = Path(uri).read_bytes()
            info = tarfile.TarInfo(key.replace("/", "_"))
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    from_tar = open_source(str(shard))
    for i in range(3):
        expected = tree.load(i)
        assert torch.equal(folder.load(i), expected)
        assert torch.equal(from_manifest.load(i), expected)
        assert torch.equal(from_tar.load(i), expected)
    assert tuple(expected.shape[1:]) == PHOTOS["rocket"]().shape[:2]


def test_bad_specs_name_the_problem(tmp_path):
    with pytest.raises(ValueError, match="cannot open transfer set"):
        open_source("nothing-here")
    with pytest.raises(ValueError, match="unknown source option"):
        open_source("fashion-mnist:test?shot=3")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        open_source(f"folder:{tmp_path / 'missing'}")
