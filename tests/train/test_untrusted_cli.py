"""A zarr store is input from someone else too: each probe of issue 22 forged into a real store (built through
``python -m reinforce.build``), then used through the commands a user runs. ``stores verify`` exits 2 with one line
per problem naming the file; the readers refuse in one line; nothing reads zeros for a missing shard, nothing
recurses into a deep document, nothing materialises a huge transfer-set spec, nothing prints a raw control
character. Then a fuzzer of the zarr shards' bytes."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import zarr
from forge import (
    SAMPLES,
    build_store,
    copy_store,
    edit_manifest,
    edit_samples,
    fuzz_settings,
    one_error_line,
    reseal,
    run_cli,
)
from hypothesis import given
from hypothesis import strategies as st

from reinforce.export_wds import main as export_main
from reinforce.replay import open_replay
from stores import StoreCorruptError, StoreFormatError, open_store
from stores.__main__ import main as stores_main
from stores.store import ARRAYS_DIR, MANIFEST, array_paths
from stores.verify import verify_store

SHARD = f"{ARRAYS_DIR}/logits/values/c/1/0/0"  # samples 8..15 of one array


@pytest.fixture(scope="module")
def zarr_store(lite0_teacher, tmp_path_factory) -> Path:
    store = build_store(lite0_teacher[2], tmp_path_factory.mktemp("untrusted_cli") / "store")
    assert stores_main(["verify", str(store)]) == 0
    return store


def verify_lines(store: Path, capsys) -> list[str]:
    """``python -m stores verify STORE`` (in process): exit status 2 and its stderr lines."""
    capsys.readouterr()
    assert stores_main(["verify", str(store)]) == 2
    lines = capsys.readouterr().err.splitlines()
    assert lines and all(line.startswith("stores verify: ") for line in lines), lines
    return lines


def read_everything(store: Path) -> None:
    """What training reads: every sample's every view of every target, decoded."""
    opened = open_store(store)
    samples = np.arange(SAMPLES)
    for view in range(opened.manifest.views):
        batch = opened.read(samples, np.full(SAMPLES, view))
        for target in opened.targets:
            opened.decode(target, batch[target])


def test_every_chunk_the_layout_implies_is_written_and_listed(zarr_store):
    """``write_empty_chunks``: a shard of zeros is a file like any other, so a missing file is never data."""
    store = open_store(zarr_store)
    listed = {record.path for record in store.manifest.files}
    implied = {store.shard_file(name, chunk) for name in array_paths(store.manifest.content) for chunk in range(3)}
    assert len(implied) == 3 * 7 and implied <= listed


@pytest.mark.e2e
def test_missing_shard_is_an_error_in_verify_and_on_read(zarr_store, tmp_path, capsys):
    store = copy_store(zarr_store, tmp_path)
    (store / SHARD).unlink()
    reseal(store)  # the forger also drops its record: checksums alone see nothing
    lines = verify_lines(store, capsys)
    assert len(lines) == 1 and f"{store / SHARD}: missing from the manifest" in lines[0], lines
    with pytest.raises(StoreCorruptError, match="it would read as zeros"):
        read_everything(store)
    run = run_cli("train.distill", "--store", str(store), "--student", "mobilenetv3_small_050", "--size", "32",
                  "--epochs", "1", "--batch-size", "8", "--workers", "0", "--out", str(tmp_path / "never"))
    one_error_line(run, str(store / ARRAYS_DIR / "logits" / "values"), "would read as zeros")


def test_chunk_missing_from_a_shard_index(zarr_store, tmp_path, capsys):
    """The shard file is there but its index marks the chunk absent, crc32c recomputed: zarr itself would return
    its fill value; verify and the reader refuse."""
    import google_crc32c

    store = copy_store(zarr_store, tmp_path)
    path = store / SHARD
    data = bytearray(path.read_bytes())
    data[-20:-4] = b"\xff" * 16  # one chunk per shard here: its (offset, nbytes) as zarr marks an absent chunk
    data[-4:] = np.uint32(google_crc32c.value(bytes(data[-20:-4]))).tobytes()
    path.write_bytes(bytes(data))
    reseal(store)
    assert not zarr.open_array(zarr.storage.LocalStore(store / ARRAYS_DIR / "logits" / "values"))[8:16].any()
    lines = verify_lines(store, capsys)
    assert len(lines) == 1 and "logits/values: samples 8..15: the index of shard file" in lines[0], lines
    with pytest.raises(StoreCorruptError, match="lists no such chunk"):
        read_everything(store)


def test_index_beyond_the_class_count(zarr_store, tmp_path, capsys):
    store = copy_store(zarr_store, tmp_path)
    index = zarr.open_array(zarr.storage.LocalStore(store / ARRAYS_DIR / "logits" / "index"), mode="r+")
    index[0, 0, 0] = 1000  # sample 0, view 0: delta coding, so its first index is the class
    reseal(store)
    lines = verify_lines(store, capsys)
    assert len(lines) == 1 and "logits/index: samples 0..7" in lines[0] and "outside [0, 1000)" in lines[0], lines
    with pytest.raises(StoreCorruptError, match=r"outside \[0, 1000\)"):
        read_everything(store)


def test_null_status_in_the_sample_table(zarr_store, tmp_path, capsys):
    store = copy_store(zarr_store, tmp_path)
    edit_samples(store, lambda t: t.with_columns(
        status=pl.when(pl.col("index") == 5).then(None).otherwise(pl.col("status"))))
    lines = verify_lines(store, capsys)
    assert len(lines) == 1 and "samples.parquet: null values in column(s) status" in lines[0], lines
    with pytest.raises(StoreFormatError, match="null values"):
        open_replay(store, size=32)


@pytest.mark.parametrize("document", [MANIFEST, f"{ARRAYS_DIR}/zarr.json"])
def test_deeply_nested_json_is_one_line(zarr_store, tmp_path, capsys, document):
    """A few hundred levels of nesting: refused by the depth bound before any recursive parser sees it."""
    store = copy_store(zarr_store, tmp_path)
    path = store / document
    data = json.loads(path.read_text())
    data["attributes" if document != MANIFEST else "summary"] = json.loads("[" * 400 + "]" * 400)
    path.write_text(json.dumps(data))
    if document != MANIFEST:
        reseal(store)
    lines = verify_lines(store, capsys)
    assert len(lines) == 1 and f"{path}: JSON nested 40" in lines[0], lines
    if document == MANIFEST:
        with pytest.raises(SystemExit) as exit_:
            stores_main(["inspect", str(store)])
        assert exit_.value.code == 2 and len(capsys.readouterr().err.splitlines()) == 1
    with pytest.raises(StoreFormatError, match="JSON nested 401 levels deep"):
        read_everything(store)


def test_huge_transfer_set_spec_is_refused_before_anything_is_made(zarr_store, tmp_path, capsys):
    store = copy_store(zarr_store, tmp_path)
    edit_manifest(store, lambda m: m["content"]["transfer_set"].update(spec="photo-crops:100000000"))
    started = time.perf_counter()
    with pytest.raises(SystemExit) as exit_:
        export_main([str(store), "--out", str(tmp_path / "never")])
    error = capsys.readouterr().err.strip()
    assert exit_.value.code == 2 and "declares 100000000 samples, the store records 24" in error, error
    with pytest.raises(StoreFormatError, match="declares 100000000 samples"):
        open_replay(store, size=32)
    assert time.perf_counter() - started < 10 and not (tmp_path / "never").exists()


def test_control_characters_are_escaped_in_what_is_printed(zarr_store, tmp_path, capsys):
    store = copy_store(zarr_store, tmp_path)
    name = "lite0\x00\n\u202e\x1b[2Jevil"
    edit_manifest(store, lambda m: m["content"]["teacher"].update(name=name))
    capsys.readouterr()
    assert stores_main(["inspect", str(store)]) == 0 and stores_main(["ls", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "lite0\\x00\\n\\u202e\\x1b[2Jevil" in out
    assert not any(ch in out.replace("\n", "") for ch in "\x00\u202e\x1b"), out


def test_stray_files_fail_verify_and_are_never_published(zarr_store, tmp_path, capsys):
    store = copy_store(zarr_store, tmp_path)
    stray = store / ARRAYS_DIR / "logits" / "values" / "c" / "9" / "0" / "0"
    stray.parent.mkdir(parents=True)
    shutil.copy(store / SHARD, stray)
    lines = verify_lines(store, capsys)
    assert lines == [f"stores verify: {stray}: not in the manifest (no checksum covers it)"], lines
    stray.unlink()
    (store / "notes.txt").write_text("a stray file")
    published = tmp_path / "published"
    assert stores_main(["publish", str(store), str(published)]) == 0
    files = sorted(str(p.relative_to(published)) for p in published.rglob("*") if p.is_file())
    assert files == sorted([MANIFEST, *(r.path for r in open_store(store).manifest.files)])
    assert stores_main(["verify", str(published)]) == 0


# --- fuzzing ------------------------------------------------------------------------------------------------------

FUZZ = fuzz_settings(500)


@pytest.fixture(scope="module")
def fuzz_copy(zarr_store, tmp_path_factory) -> Path:
    return copy_store(zarr_store, tmp_path_factory.mktemp("fuzz_zarr"))


@pytest.mark.fuzz
@FUZZ
@given(data=st.data())
def test_fuzzed_zarr_shards(zarr_store, fuzz_copy, data):
    """Bytes of 1-2 shard files flipped, cut, replaced or the file deleted (its record dropped or kept), checksums
    re-sealed or not: reading every value and verifying end in values or our one-line error; a deleted shard
    never reads as zeros."""
    shards = sorted(r.path for r in open_store(zarr_store).manifest.files if "/c/" in r.path)
    chosen = data.draw(st.lists(st.sampled_from(shards), min_size=1, max_size=2, unique=True))
    deleted = False
    try:
        for rel in chosen:
            path, original = fuzz_copy / rel, (zarr_store / rel).read_bytes()
            action = data.draw(st.sampled_from(["flip", "cut", "replace", "delete"]))
            if action == "delete":
                path.unlink()
                deleted = True
            elif action == "flip":
                raw = bytearray(original)
                for _ in range(data.draw(st.integers(1, 8))):
                    raw[data.draw(st.integers(0, len(raw) - 1))] = data.draw(st.integers(0, 255))
                path.write_bytes(bytes(raw))
            elif action == "cut":
                path.write_bytes(original[: data.draw(st.integers(0, len(original) - 1))])
            else:
                path.write_bytes(data.draw(st.binary(max_size=256)))
        if data.draw(st.booleans()):
            reseal(fuzz_copy)
        try:
            read_everything(fuzz_copy)
            assert not deleted, "a deleted shard read as values"
        except (StoreCorruptError, StoreFormatError, FileNotFoundError) as error:
            assert "\n" not in str(error), str(error)
        problems = verify_store(fuzz_copy)
        assert all("\n" not in p for p in problems) and (problems or not deleted), problems
    finally:
        shutil.copy(zarr_store / MANIFEST, fuzz_copy / MANIFEST)
        for rel in chosen:
            shutil.copy(zarr_store / rel, fuzz_copy / rel)
