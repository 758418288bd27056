"""The store's manifest is untrusted input: other format versions, unknown keys and paths that leave the
store are refused in one line naming the problem, before any data file is touched. No teacher needed."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from reinforce.augment import create_policy
from stores import StoreFormatError, StoreManifest, create_codec, open_store
from stores.__main__ import main as stores_main
from stores.manifest import ArraySpec, PolicyRecord, StoreContent, TargetRecord, TeacherCard, TransferSetRecord
from stores.store import StoreWriter

SAMPLES, VIEWS = 4, 2


@pytest.fixture
def tiny_store(tmp_path) -> Path:
    """A 4-sample, 2-view store of int8 embeddings written through StoreWriter (synthetic teacher and images)."""
    codec = create_codec("embedding", dim=8, precision="int8")
    policy = create_policy("rrc_flip", size=8)
    content = StoreContent(
        teacher=TeacherCard(name="synthetic", library="timm", backbone="none", num_classes=0, class_names=(),
                            input_size=8, mean=(0.5,) * 3, std=(0.5,) * 3, adaptation={"mode": "frozen"}),
        transfer_set=TransferSetRecord(spec="synthetic", fingerprint="0", num_samples=SAMPLES),
        policy=PolicyRecord.from_dict(policy.to_record()), views=VIEWS, seed=0,
        targets={"embedding": TargetRecord(kind=codec.kind, codec=codec.to_dict(), arrays={
            name: ArraySpec(shape, dtype.str) for name, (shape, dtype) in codec.arrays().items()})})
    writer = StoreWriter(tmp_path / "store", content, unit_samples=SAMPLES, chunk_samples=2)
    writer.create()
    records = [policy.sample(0, i, v, 8, 8) for i in range(SAMPLES) for v in range(VIEWS)]
    payload = codec.encode(torch.randn(SAMPLES * VIEWS, 8, generator=torch.Generator().manual_seed(0)))
    arrays = {"theta": policy.pack(records).reshape(SAMPLES, VIEWS, -1),
              **{f"embedding/{name}": a.reshape(SAMPLES, VIEWS, *a.shape[1:]) for name, a in payload.items()}}
    rows = [{"index": i, "key": str(i), "uri": f"synthetic/{i}", "height": 8, "width": 8, "status": "ok",
             "error": None} for i in range(SAMPLES)]
    writer.write_unit(0, arrays, rows)
    writer.finalize("test")
    return tmp_path / "store"


def edit_manifest(store: Path, edit) -> None:
    manifest = json.loads((store / "manifest.json").read_text())
    edit(manifest)
    (store / "manifest.json").write_text(json.dumps(manifest))


def test_manifest_round_trips(tiny_store):
    data = json.loads((tiny_store / "manifest.json").read_text())
    manifest = StoreManifest.from_dict(data)
    assert json.loads(json.dumps(manifest.to_dict())) == data and manifest == open_store(tiny_store).manifest
    batch = open_store(tiny_store).read(np.arange(SAMPLES), np.ones(SAMPLES, dtype=np.int64))
    assert batch["embedding"]["values"].shape == (SAMPLES, 8) and batch["theta"].shape == (SAMPLES, 9)


@pytest.mark.e2e
def test_v1_store_is_refused_in_one_line(tmp_path, capsys):
    store = tmp_path / "old"
    store.mkdir()
    (store / "manifest.json").write_text(json.dumps({
        "format_version": 1, "store_id": "0" * 32, "num_samples": 4, "views": 2,
        "fields": {"logits_topk": {"shape": [5], "dtype": "<f2"}, "params": {"shape": [9], "dtype": "<i4"}}}))
    with pytest.raises(StoreFormatError) as error:
        open_store(store)
    message = str(error.value)
    assert "\n" not in message and "format-version-1" in message and "python -m reinforce.upgrade" in message
    result = subprocess.run([sys.executable, "-m", "stores", "inspect", str(store)], capture_output=True, text=True)
    assert result.returncode == 2 and result.stdout == ""  # an error, one line (stores.cli_errors)
    assert result.stderr.splitlines() == [f"stores inspect: error: {message}"]
    assert stores_main(["verify", str(store)]) == 2
    assert capsys.readouterr().err.splitlines() == [f"stores verify: {message}"]


@pytest.mark.parametrize(("where", "key"), [((), "extra_key"), (("content", "teacher"), "colour"),
                                            (("content", "targets", "embedding"), "note")])
def test_manifest_with_an_unknown_key_is_refused(tiny_store, where, key):
    def add_key(manifest):
        section = manifest
        for name in where:
            section = section[name]
        section[key] = 1

    edit_manifest(tiny_store, add_key)
    with pytest.raises(StoreFormatError, match=rf"unknown key\(s\) \['{key}'\]") as error:
        open_store(tiny_store)
    assert (".".join(where) or "manifest") in str(error.value)


@pytest.mark.parametrize("path", ["../x", "targets.zarr/../../x", "ABSOLUTE"])
def test_file_path_leaving_the_store_is_refused(tiny_store, path, capsys):
    """A path outside the store is refused while parsing, even when the file it names exists with the recorded
    size (so no check that stats or hashes it can pass)."""
    outside = tiny_store.parent / "x"
    outside.write_bytes(b"x" * 10)
    path = str(outside) if path == "ABSOLUTE" else path

    def point_outside(manifest):
        manifest["files"][0].update(path=path, bytes=outside.stat().st_size)

    edit_manifest(tiny_store, point_outside)
    with pytest.raises(StoreFormatError, match=re.escape(f"path '{path}' leaves the store")):
        open_store(tiny_store)
    assert stores_main(["verify", str(tiny_store)]) == 2
    assert f"'{path}' leaves the store" in capsys.readouterr().err


@pytest.mark.parametrize(("section", "name"), [("targets", "../logits"), ("arrays", "values/../../x")])
def test_target_and_array_names_must_be_plain(tiny_store, section, name):
    """Target and array names become directories under targets.zarr: nothing but identifiers."""
    def rename(manifest):
        targets = manifest["content"]["targets"]
        parent = targets if section == "targets" else targets["embedding"]["arrays"]
        parent[name] = parent.pop("embedding" if section == "targets" else "values")

    edit_manifest(tiny_store, rename)
    with pytest.raises(StoreFormatError, match=rf"name '{name}' is not a plain identifier"):
        open_store(tiny_store)
