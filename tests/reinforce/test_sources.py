"""Transfer-set sources: every spec kind opens the same real images in a stable order."""

from __future__ import annotations

import hashlib
import importlib.util
import io
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch
from PIL import Image
from skimage import data as skdata

from reinforce import sources
from reinforce.sources import (
    fashion_mnist,
    few_shot_split,
    files,
    list_sources,
    open_source,
    register_source,
    registry,
    segmentation,
)
from reinforce.sources import photos as package_photos

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


@pytest.fixture(scope="module")
def retrieval_manifest(tmp_path_factory) -> Path:
    """A ``reinforce.retrieve``-shaped manifest: 2 crops (``rrc_flip`` θ records) of each scikit-image photograph."""
    import json

    from reinforce.augment import create_policy

    photos = open_source("skimage:photos")
    policy = create_policy("rrc_flip", size=64, scale=(0.08, 1.0), flip_prob=0.0)
    rows = [(i, c, policy.sample(0, i, c, *photos.load(i).shape[-2:])) for i in range(len(photos)) for c in range(2)]
    path = tmp_path_factory.mktemp("retrieved") / "retrieved.parquet"
    pl.DataFrame({"key": [f"{photos.keys[i]}@crop{c}" for i, c, _ in rows],
                  "uri": [str(photos.uris[i]) for i, _, _ in rows],
                  "theta": [row.tobytes() for row in policy.pack([theta for _, _, theta in rows])],
                  "policy": [json.dumps(policy.to_record())] * len(rows)}).write_parquet(path)
    return path


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
    monkeypatch.setenv("FASHION_MNIST_DIR", str(tmp_path))  # read when opened, not at import
    assert fashion_mnist.fashion_mnist_dir() == tmp_path
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist") as error:
        open_source("fashion-mnist:train")
    assert str(tmp_path) in str(error.value)
    monkeypatch.delenv("FASHION_MNIST_DIR")
    assert fashion_mnist.fashion_mnist_dir() == fashion_mnist.DEFAULT_FASHION_MNIST_DIR


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


def test_bad_specs_name_the_problem(tmp_path, photo_dir):
    """Every "cannot read this source" error names the spec forms a person can give instead."""
    forms = re.escape(sources.SPEC_FORMS)
    with pytest.raises(ValueError, match=f"cannot open transfer set 'nothing-here'.*{forms}"):
        open_source("nothing-here")
    with pytest.raises(ValueError, match="unknown source option"):
        open_source("fashion-mnist:test?shot=3")
    with pytest.raises(FileNotFoundError, match=f"does not exist.*{forms}"):
        open_source(f"folder:{tmp_path / 'missing'}")
    with pytest.raises(ValueError, match=f"images outside class directories.*folder:DIR.*{forms}"):
        open_source(f"imagefolder:{photo_dir}")
    with pytest.raises(ValueError, match=f"has no labels.*{forms}"):
        open_source(f"{photo_dir}?shots=1")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=f"no images .* found.*{forms}"):
        open_source(str(tmp_path / "empty"))


# --- the registry and the package-photo sources ---------------------------------------------------

LABELED = {"fashion-mnist", "imagefolder", "sklearn:digits"}


@pytest.fixture(scope="module")
def seg_tree(tmp_path_factory) -> Path:
    """A ``segfolder:`` of three Fashion-MNIST mosaics (PNG images + masks + classes.txt)."""
    root = tmp_path_factory.mktemp("segfolder")
    mosaics = open_source("fashion-mnist-seg:test?limit=3")
    (root / "images").mkdir()
    (root / "masks").mkdir()
    (root / "classes.txt").write_text("\n".join(mosaics.class_names))
    for i in range(3):
        Image.fromarray(mosaics.load(i).permute(1, 2, 0).numpy()).save(root / "images" / f"{i}.png")
        Image.fromarray(mosaics.load_mask(i).numpy()).save(root / "masks" / f"{i}.png")
    return root


def example_spec(prefix: str, photo_tree: Path, retrieval_manifest: Path, seg_tree: Path) -> str:
    """One quick spec per registered prefix; a new registration fails here until it gets one."""
    examples = {
        "fashion-mnist-seg": "fashion-mnist-seg:test@64,grid=2?limit=50",
        "segfolder": f"segfolder:{seg_tree}",
        "fashion-mnist": "fashion-mnist:test?limit=100",
        "folder": f"folder:{photo_tree}",
        "imagefolder": f"imagefolder:{photo_tree}",
        "skimage:photos": "skimage:photos",
        "sklearn:images": "sklearn:images",
        "sklearn:digits": "sklearn:digits",
        "photo-crops": "photo-crops:16@48,seed=1",
        "retrieved": f"retrieved:{retrieval_manifest}",
    }
    if prefix not in examples:
        pytest.fail(f"source {prefix!r} is registered but has no example spec in tests/test_sources.py")
    return examples[prefix]


def clear_caches() -> None:
    """Forget every decoded image, so the next load decodes from the packages again."""
    for fn in (package_photos._photo, package_photos._photos_digest, package_photos._digits, fashion_mnist.read_idx,
               package_photos._matplotlib_photo_paths, segmentation._mosaic, segmentation._item_order):
        fn.cache_clear()


@pytest.mark.parametrize("prefix", list_sources())
def test_every_registered_source_opens_deterministically(prefix, photo_tree, retrieval_manifest, seg_tree):
    spec = example_spec(prefix, photo_tree, retrieval_manifest, seg_tree)
    first = open_source(spec)
    indices = sorted({0, len(first) // 2, len(first) - 1})
    images = [first.load(i) for i in indices]
    clear_caches()
    second = open_source(spec)
    assert second.spec == spec and len(second) == len(first) > 0
    assert second.keys.tolist() == first.keys.tolist() and len(set(first.keys.tolist())) == len(first)
    assert second.uris.tolist() == first.uris.tolist()
    assert second.fingerprint() == first.fingerprint()
    assert (first.labels is not None) == (prefix in LABELED)
    for i, image in zip(indices, images):
        assert image.dtype == torch.uint8 and image.ndim == 3 and image.shape[0] == 3
        assert torch.equal(second.load(i), image)


def test_package_photo_sources_hold_the_expected_photographs():
    photos = open_source("skimage:photos")
    assert photos.keys.tolist() == list(package_photos.SKIMAGE_PHOTOS) and len(photos) == 19
    coffee = photos.load(photos.keys.tolist().index("coffee"))
    assert torch.equal(coffee, torch.from_numpy(skdata.coffee()).permute(2, 0, 1))
    camera = photos.load(photos.keys.tolist().index("camera"))  # grayscale → 3 equal channels
    assert torch.equal(camera[0], torch.from_numpy(skdata.camera())) and torch.equal(camera[0], camera[2])
    assert open_source("sklearn:images").keys.tolist() == ["china", "flower"]
    if importlib.util.find_spec("matplotlib") is not None:  # its sample photograph joins the crop pool
        assert package_photos._package_photo_names()[-1] == "matplotlib/grace_hopper"
    digits = open_source("sklearn:digits")
    assert len(digits) == 1797 and digits.class_names == tuple("0123456789")
    assert sorted(set(digits.labels.tolist())) == list(range(10))
    assert digits.load(0).shape == (3, 8, 8) and int(max(digits.load(i).max() for i in range(20))) == 255
    assert len(open_source("sklearn:digits?shots=5&seed=1&part=labeled")) == 50


def test_photo_crops_are_distinct_sized_replayable_and_prefix_stable():
    crops = open_source("photo-crops:64")
    images = [crops.load(i) for i in range(64)]
    assert all(image.shape == (3, 96, 96) and image.dtype == torch.uint8 for image in images)
    assert len({hashlib.sha256(image.numpy().tobytes()).hexdigest() for image in images}) == 64
    limited = open_source("photo-crops:500?limit=64")  # crop i does not depend on N
    assert limited.uris.tolist() == crops.uris.tolist() and len(limited) == 64
    assert open_source("photo-crops:64@32").load(0).shape == (3, 32, 32)
    assert open_source("photo-crops:64,seed=1").uris.tolist() != crops.uris.tolist()
    assert open_source("photo-crops:64").fingerprint() == crops.fingerprint()
    # the URI alone re-renders the crop: exact pixels at scale 1, PIL bicubic otherwise
    assert torch.equal(files.load_file("photo-crops:skimage/astronaut#10,20,50,50@50"),
                       torch.from_numpy(skdata.astronaut()[20:70, 10:60]).permute(2, 0, 1))
    expected = Image.fromarray(skdata.rocket()).resize((40, 40), Image.Resampling.BICUBIC, box=(5, 6, 105, 106))
    assert torch.equal(files.load_file("photo-crops:skimage/rocket#5,6,100,100@40"),
                       torch.from_numpy(np.asarray(expected).copy()).permute(2, 0, 1))

    # kept crops are handed out as copies: a caller writing into one does not change the next load
    first = files.load_file("photo-crops:skimage/rocket#5,6,100,100@40")
    first.zero_()
    assert torch.equal(files.load_file("photo-crops:skimage/rocket#5,6,100,100@40"),
                       torch.from_numpy(np.asarray(expected).copy()).permute(2, 0, 1))


@pytest.mark.e2e
def test_photo_crops_are_the_same_in_a_fresh_process():
    crops = open_source("photo-crops:8@32")
    here = [crops.fingerprint(), *(hashlib.sha256(crops.load(i).numpy().tobytes()).hexdigest() for i in range(8))]
    script = ("import hashlib; from reinforce.sources import open_source; s = open_source('photo-crops:8@32'); "
              "print(s.fingerprint()); "
              "[print(hashlib.sha256(s.load(i).numpy().tobytes()).hexdigest()) for i in range(8)]")
    there = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout.split()
    assert there == here


def test_package_uris_load_through_a_manifest(tmp_path):
    uris = [*open_source("photo-crops:3@24").uris, "skimage:photos#moon", "sklearn:images#flower", "sklearn:digits#7"]
    pl.DataFrame({"uri": uris}).write_parquet(tmp_path / "m.parquet")
    manifest = open_source(str(tmp_path / "m.parquet"))
    assert manifest.uris.tolist() == uris
    assert torch.equal(manifest.load(3)[0], torch.from_numpy(skdata.moon()))
    assert manifest.load(0).shape == (3, 24, 24) and manifest.load(5).shape == (3, 8, 8)


def test_registry_errors_name_the_registered_sources(monkeypatch, photo_tree):
    with pytest.raises(ValueError, match="cannot open transfer set") as error:
        open_source("no-such-source:abc")
    assert all(prefix in str(error.value) for prefix in list_sources())
    with pytest.raises(ValueError, match=r"photo-crops:N\[@SIZE\]"):
        open_source("photo-crops:many")
    with pytest.raises(ValueError, match="takes no argument"):
        open_source("skimage:photos:extra")
    with pytest.raises(ValueError, match="already registered"):
        register_source("folder")(lambda rest: None)
    monkeypatch.setattr(registry, "_SOURCES", dict(registry._SOURCES))
    register_source("test-folder")(files._folder)
    assert "test-folder" in list_sources("test-*")
    custom = open_source(f"test-folder:{photo_tree}?limit=2")
    assert custom.spec == f"test-folder:{photo_tree}?limit=2" and len(custom) == 2
