"""A webdataset store is input from someone else: each probe of issue 22 forged into a real store's shards (real
Fashion-MNIST images, the real Lite0 teacher) must make ``python -m stores verify`` exit 2 naming the shard and
member, and the training reader (``StreamReplay``, ``train.distill``) refuse it in one line; a planted pickle
never runs. Then a fuzzer: random member and byte mutations of a real shard end in a valid read or our one-line
error, never another exception."""

from __future__ import annotations

import gzip
import io
import json
import re
import tarfile
from pathlib import Path

import numpy as np
import pytest
from forge import (
    build_store,
    copy_store,
    edit_shard,
    fuzz_settings,
    load_npy,
    member,
    npy,
    one_error_line,
    pickled,
    replace,
    reseal,
    run_cli,
    shard_members,
)
from hypothesis import given
from hypothesis import strategies as st

from reinforce.replay import open_replay
from stores import StoreCorruptError, StoreFormatError
from stores.__main__ import main as stores_main
from stores.verify import verify_store
from stores.wds import read_shard

SHARDS = ("shards/shard-000000.tar", "shards/shard-000001.tar", "shards/shard-000002.tar")


@pytest.fixture(scope="module")
def wds_store(lite0_teacher, tmp_path_factory) -> Path:
    store = build_store(lite0_teacher[2], tmp_path_factory.mktemp("untrusted_wds") / "store", "wds")
    assert stores_main(["verify", str(store)]) == 0
    return store


def header_of(members, key: str) -> dict:
    return json.loads(dict((i.name, d) for i, d in members)[f"{key}.header.json"])


def with_header(members, key: str, **fields) -> list:
    return replace(members, f"{key}.header.json", json.dumps({**header_of(members, key), **fields}).encode())


def logits_index(members, key: str, value: int) -> list:
    record = load_npy(members, f"{key}.logits.npy")
    record["index"][0, 0] = value  # delta coding: the first index is the class itself
    return replace(members, f"{key}.logits.npy", npy(record))


def with_theta(members, key: str, dtype) -> list:
    return replace(members, f"{key}.theta.npy", npy(load_npy(members, f"{key}.theta.npy").astype(dtype)))


def image_as_link(members, key: str) -> list:
    """The image member becomes a hard link to another sample's image."""
    other = next(i.name for i, _ in members if i.name.endswith("image.png") and not i.name.startswith(key))
    return [member(i.name, b"", tarfile.LNKTYPE, other) if i.name == f"{key}.image.png" else (i, d)
            for i, d in members]


# probe -> (edit of one shard's members, given its first key and the marker file; what the error says)
PROBES = {
    "pickle .pyd member": (lambda m, k, marker: [*m, member(f"{k}.extra.pyd", pickled(marker))],
                           "not a member this format defines"),
    "pickle .pth member": (lambda m, k, marker: [*m, member(f"{k}.weights.pth", pickled(marker))],
                           "not a member this format defines"),
    ".txt.gz bomb": (lambda m, k, _: [*m, member(f"{k}.notes.txt.gz", gzip.compress(bytes(64 << 20), 9))],
                     "not a member this format defines"),
    "object-dtype .npy (pickle inside)": (
        lambda m, k, marker: replace(m, f"{k}.theta.npy", npy(np.array([pickled(marker), marker], dtype=object))),
        "not a plain .npy array"),
    "logit index beyond the class count": (lambda m, k, _: logits_index(m, k, 1000), "outside [0, 1000)"),
    "header index 10^6": (lambda m, k, _: with_header(m, k, index=10**6), "sample index 1000000"),
    "negative header index": (lambda m, k, _: with_header(m, k, index=-1), "sample index -1"),
    "string header index": (lambda m, k, _: with_header(m, k, index=k), "header index must be int"),
    "float θ": (lambda m, k, _: with_theta(m, k, np.float32), "float32"),
    "hard-link member for an image": (lambda m, k, _: image_as_link(m, k), "a hard link member"),
    "symlink member": (lambda m, k, _: [*m, member(f"{k}.image.jpg", b"", tarfile.SYMTYPE, "/etc/passwd")],
                       "a symbolic link member"),
    "unknown target member": (lambda m, k, _: [*m, member(f"{k}.patch.npy", npy(np.zeros(2, np.uint8)))],
                              "target 'patch' is not in the manifest"),
    "missing θ member": (lambda m, k, _: [(i, d) for i, d in m if i.name != f"{k}.theta.npy"], "no theta.npy"),
}


def forge(store: Path, probe: str, marker: Path) -> None:
    """The probe planted in every shard (so a streaming reader meets it whichever shard it draws first)."""
    edit, _ = PROBES[probe]
    for shard in SHARDS:
        first = shard_members(store / shard)[0][0].name.partition(".")[0]
        edit_shard(store, lambda members, key=first: edit(members, key, marker), shard)


@pytest.mark.parametrize("probe", sorted(PROBES))
def test_probe_fails_verify_and_the_stream_in_one_line(wds_store, tmp_path, capsys, probe):
    store, marker = copy_store(wds_store, tmp_path), tmp_path / "payload-ran"
    forge(store, probe, marker)
    capsys.readouterr()
    assert stores_main(["verify", str(store)]) == 2
    errors = capsys.readouterr().err.splitlines()
    needle = PROBES[probe][1]
    assert len(errors) == len(SHARDS) and all(str(store / "shards") in e and needle in e for e in errors), errors
    replay = open_replay(store, size=32)
    with pytest.raises(StoreCorruptError, match=re.escape(needle)):
        next(iter(replay.batches(4)))
    assert not marker.exists(), "the store's pickle ran"


@pytest.mark.e2e
def test_pickle_member_never_runs_in_distill(wds_store, tmp_path):
    store, marker = copy_store(wds_store, tmp_path), tmp_path / "payload-ran"
    forge(store, "pickle .pyd member", marker)
    run = run_cli("train.distill", "--store", str(store), "--student", "mobilenetv3_small_050", "--size", "32",
                  "--epochs", "1", "--batch-size", "8", "--out", str(tmp_path / "never"))
    one_error_line(run, str(store / "shards"), ".extra.pyd", "not a member this format defines")
    assert not marker.exists() and not (tmp_path / "never" / "model.safetensors").exists()


def test_decoder_is_the_same_whatever_wds_secure_says(wds_store, tmp_path, monkeypatch):
    """``WDS_SECURE`` changes nothing: the reader never hands a member to webdataset's decoders."""
    store, marker = copy_store(wds_store, tmp_path), tmp_path / "payload-ran"
    forge(store, "pickle .pyd member", marker)
    for secure in ("0", "1"):
        monkeypatch.setenv("WDS_SECURE", secure)
        assert any(".extra.pyd" in p for p in verify_store(store))
    assert not marker.exists()


def test_sample_table_and_shards_must_agree(wds_store, tmp_path, capsys):
    """A shard sample that the table says was skipped: verify names it, the stream refuses it."""
    import polars as pl
    from forge import edit_samples

    store = copy_store(wds_store, tmp_path)
    edit_samples(store, lambda t: t.with_columns(
        status=pl.when(pl.col("index") == 3).then(pl.lit("skipped")).otherwise(pl.col("status"))))
    capsys.readouterr()
    assert stores_main(["verify", str(store)]) == 2
    assert "samples [3] are not ok" in capsys.readouterr().err
    with pytest.raises(StoreCorruptError, match=r"sample 3, which samples\.parquet marks skipped"):
        for _ in zip(range(10), open_replay(store, size=32).batches(4)):
            pass


# --- fuzzing ------------------------------------------------------------------------------------------------------

CLEAN = (StoreCorruptError, StoreFormatError)
FUZZ = fuzz_settings(500)
NAMES = st.sampled_from(["000000000.header.json", "000000000.extra.pyd", "000000001.theta.npy", "../escape.npy",
                         "/abs.image.png", "000000000.image.PNG", "000000000.logits.npy.gz", "000000099.theta.npy",
                         "000000000", "shards/000000000.theta.npy", "000000000.image.png", "x" * 200])
TYPES = st.sampled_from([tarfile.SYMTYPE, tarfile.LNKTYPE, tarfile.DIRTYPE, tarfile.FIFOTYPE, tarfile.CHRTYPE,
                         tarfile.CONTTYPE])
DTYPES = st.sampled_from(["u1", "i1", "<u2", "<i4", "<f2", "<f4", "<f8", "|b1", "<U4", "|V3"])
JSON_VALUES = st.recursive(st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats() | st.text(max_size=8),
                           lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner,
                                                                                     max_size=3), max_leaves=8)


@st.composite
def mutated_members(draw, members: list) -> list:
    """1-3 edits of a shard's members: renamed, dropped, duplicated, retyped, a .npy or the header replaced."""
    members = list(members)
    for _ in range(draw(st.integers(1, 3))):
        if not members:
            break
        at = draw(st.integers(0, len(members) - 1))
        info, data = members[at]
        action = draw(st.sampled_from(["rename", "drop", "duplicate", "retype", "array", "header", "bytes"]))
        if action == "rename":
            members[at] = member(draw(NAMES), data)
        elif action == "drop":
            del members[at]
        elif action == "duplicate":
            members.insert(draw(st.integers(0, len(members))), (info, data))
        elif action == "retype":
            members[at] = member(info.name, b"", draw(TYPES), draw(NAMES))
        elif action == "array":
            shape = tuple(draw(st.lists(st.integers(0, 6), max_size=3)))
            array = np.zeros(shape, dtype=draw(DTYPES))
            members[at] = member(info.name, npy(array))
        elif action == "header":
            members[at] = member(info.name, json.dumps(draw(JSON_VALUES)).encode())
        else:
            members[at] = member(info.name, draw(st.binary(max_size=64)))
    return members


def outcome(store: Path, shard: str) -> str:
    """Decode the shard as every reader does, then verify the store: "ok" or the clean error's class."""
    from stores.store import open_store

    opened = open_store(store)
    try:
        for _ in read_shard(opened.location, shard, opened.manifest):
            pass
        result = "ok"
    except CLEAN as error:
        assert "\n" not in str(error), str(error)
        result = type(error).__name__
    problems = verify_store(store)
    assert all("\n" not in p for p in problems), problems
    return result


@pytest.fixture(scope="module")
def fuzz_copy(wds_store, tmp_path_factory) -> Path:
    return copy_store(wds_store, tmp_path_factory.mktemp("fuzz_wds"))


@pytest.mark.fuzz
@FUZZ
@given(data=st.data())
def test_fuzzed_shard(wds_store, fuzz_copy, data):
    shard, pristine = SHARDS[0], (wds_store / SHARDS[0]).read_bytes()
    try:
        if data.draw(st.booleans()):  # the tar's own bytes: headers, checksums, padding
            raw = bytearray(pristine)
            for _ in range(data.draw(st.integers(1, 8))):
                raw[data.draw(st.integers(0, len(raw) - 1))] = data.draw(st.integers(0, 255))
            (fuzz_copy / shard).write_bytes(bytes(raw[: data.draw(st.integers(1, len(raw)))]))
            reseal(fuzz_copy)
        else:
            from forge import write_shard

            write_shard(fuzz_copy / shard, data.draw(mutated_members(shard_members(wds_store / shard))))
            reseal(fuzz_copy)
        outcome(fuzz_copy, shard)
    finally:
        (fuzz_copy / shard).write_bytes(pristine)
        reseal(fuzz_copy)


def test_member_bytes_are_read_whole_only_within_bounds(wds_store, tmp_path):
    """A member declaring more bytes than its kind may hold is refused from its header, before its bytes are read
    (an 8 GiB declared size costs nothing)."""
    store = copy_store(wds_store, tmp_path)
    shard = store / SHARDS[0]
    members = shard_members(shard)
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.GNU_FORMAT) as tar:
        info = tarfile.TarInfo(members[0][0].name.partition(".")[0] + ".image.png")
        info.size = 8 << 30
        tar.addfile(info)  # header only: the declared bytes are not there
    shard.write_bytes(buffer.getvalue())
    reseal(store)
    problems = verify_store(store)
    assert len(problems) == 1 and "8589934592 bytes, more than this member may hold" in problems[0], problems
