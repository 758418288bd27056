"""A store is input from someone else. Hypothesis mutates a real store's manifest, sample table and zarr metadata
(an attacker edits a file and its recorded size and sha256 alike); every case must end in a valid read or one
clean, one-line error — never another exception, a hang, or a file opened outside the store."""

from __future__ import annotations

import collections
import contextlib
import copy
import hashlib
import io
import json
import os
import shutil
import signal
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pytest
from forge import fuzz_settings
from hypothesis import given
from hypothesis import strategies as st

from reinforce.build import BuildConfig, build
from stores import StoreCorruptError, StoreFormatError, open_store
from stores.store import ARRAYS_DIR, SAMPLES_FILE
from stores.verify import verify_store

CLEAN = (StoreFormatError, StoreCorruptError, FileNotFoundError)
OUTCOMES: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
ALLOWED_ROOTS = tuple({os.path.realpath(p) for p in (sys.prefix, sys.base_prefix, "/dev", "/proc", "/sys", "/usr",
                                                      "/etc/ld.so.cache")})
_opened: list[str] | None = None


def _audit(event: str, args: tuple) -> None:
    if _opened is not None and event == "open" and isinstance(args[0], (str, bytes, os.PathLike)):
        _opened.append(os.path.realpath(os.fsdecode(args[0])))


sys.addaudithook(_audit)


@pytest.fixture(scope="module")
def pristine(lite0_teacher, tmp_path_factory) -> Path:
    model, card, _ = lite0_teacher
    out = tmp_path_factory.mktemp("untrusted") / "store"
    build(BuildConfig(teacher=card.name, transfer_set="fashion-mnist:test?limit=16", out=str(out), views=2,
                      targets=("logits", "embedding"), workers=0, unit_samples=8, chunk_samples=8),
          teacher=(model, card))
    return out


def use(store: Path) -> None:
    """What a user of a shared store does: open it, read and decode every target of every sample, read the
    sample table, verify it."""
    opened = open_store(store)
    samples = np.arange(opened.manifest.num_samples)
    batch = opened.read(samples, np.zeros_like(samples))
    for target in opened.targets:
        opened.decode(target, batch[target])
    opened.samples  # noqa: B018 - reading and checking the table is the point
    problems = verify_store(store)
    if problems:
        raise StoreCorruptError(problems[0])


def outcome_of(kind: str, store: Path) -> str:
    """Run ``use`` under a 30 s alarm and the open-audit; return "ok" or the clean error's class name."""
    global _opened
    root = os.path.realpath(store)
    _opened = []

    def hang(*_):
        raise TimeoutError(f"{kind}: reading the mutated store hung")

    previous = signal.signal(signal.SIGALRM, hang)
    signal.alarm(30)
    try:
        use(store)
        result = "ok"
    except CLEAN as error:
        assert "\n" not in str(error), f"{kind}: a multi-line error: {error}"
        result = type(error).__name__
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
        opened, _opened = _opened, None
    outside = [p for p in opened if not (p == root or p.startswith(root + os.sep) or p.startswith(ALLOWED_ROOTS))]
    assert not outside, f"{kind}: opened files outside the store: {outside[:3]}"
    OUTCOMES[kind][result] += 1
    return result


@contextlib.contextmanager
def copy_of(store: Path):
    with tempfile.TemporaryDirectory() as folder:
        target = Path(folder) / "store"
        shutil.copytree(store, target)
        (Path(folder) / "secret").write_text("outside the store")
        yield target


def rewrite(store: Path, rel: str, data: bytes) -> None:
    """Replace ``rel`` and record its new size and sha256 in the manifest, as someone forging a store would."""
    (store / rel).write_bytes(data)
    manifest = json.loads((store / "manifest.json").read_text())
    for record in manifest["files"]:
        if record["path"] == rel:
            record.update(bytes=len(data), sha256=hashlib.sha256(data).hexdigest())
    (store / "manifest.json").write_text(json.dumps(manifest))


JSON = st.recursive(st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats() | st.text(max_size=12),
                    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner,
                                                                              max_size=3), max_leaves=6)
SPECIAL = st.sampled_from([0, -1, 2**63, True, "", "../secret", "/etc/passwd", [], {}, 1e308, "numcodecs.pickle",
                           "|O", "<V8", [2**40, 2**40]])


def paths_of(node: Any, prefix: tuple = ()) -> list[tuple]:
    found = [prefix]
    if isinstance(node, dict):
        for key, value in node.items():
            found += paths_of(value, (*prefix, key))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            found += paths_of(value, (*prefix, i))
    return found


@st.composite
def mutated(draw, document: Any) -> Any:
    """``document`` with 1-3 edits: a value replaced (by arbitrary or adversarial JSON), a key deleted, or added."""
    document = copy.deepcopy(document)
    for _ in range(draw(st.integers(1, 3))):
        paths = [p for p in paths_of(document) if p and not any(isinstance(k, int) and k > 2 for k in p)]
        if not paths:
            break
        path = draw(st.sampled_from(paths))
        parent = document
        for key in path[:-1]:
            parent = parent[key]
        action = draw(st.sampled_from(["replace", "special", "delete", "add"]))
        if action == "delete" and isinstance(parent, dict):
            del parent[path[-1]]
        elif action == "add" and isinstance(parent, dict):
            parent[draw(st.text(min_size=1, max_size=8))] = draw(JSON)
        else:
            parent[path[-1]] = draw(SPECIAL if action == "special" else JSON)
    return document


FUZZ = fuzz_settings(60)


@FUZZ
@given(data=st.data())
def test_fuzzed_manifest(pristine, data):
    original = json.loads((pristine / "manifest.json").read_text())
    with copy_of(pristine) as store:
        (store / "manifest.json").write_text(json.dumps(data.draw(mutated(original))))
        outcome_of("manifest", store)


@FUZZ
@given(data=st.data())
def test_fuzzed_zarr_metadata(pristine, data):
    rel = f"{ARRAYS_DIR}/zarr.json"  # the consolidated metadata of every array
    original = json.loads((pristine / rel).read_text())
    with copy_of(pristine) as store:
        rewrite(store, rel, json.dumps(data.draw(mutated(original))).encode())
        outcome_of("zarr metadata", store)


@FUZZ
@given(data=st.data())
def test_fuzzed_sample_table(pristine, data):
    original = (pristine / SAMPLES_FILE).read_bytes()
    with copy_of(pristine) as store:
        if data.draw(st.booleans()):  # damaged bytes
            damaged = bytearray(original)
            for _ in range(data.draw(st.integers(1, 8))):
                damaged[data.draw(st.integers(0, len(damaged) - 1))] = data.draw(st.integers(0, 255))
            payload = bytes(damaged[: data.draw(st.integers(1, len(damaged)))])
        else:  # a well-formed table that lies: rows dropped, reordered, columns renamed or retyped
            table = pl.read_parquet(io.BytesIO(original))
            table = table.sample(fraction=1.0, shuffle=True, seed=data.draw(st.integers(0, 9)))
            table = table.head(data.draw(st.integers(0, len(table))))
            if data.draw(st.booleans()):
                table = table.rename({"index": data.draw(st.sampled_from(["idx", "index2", "key2"]))})
            if data.draw(st.booleans()):
                table = table.with_columns(pl.col("status").str.replace("ok", data.draw(st.sampled_from(["OK", "x"]))))
            buffer = io.BytesIO()
            table.write_parquet(buffer)
            payload = buffer.getvalue()
        rewrite(store, SAMPLES_FILE, payload)
        outcome_of("sample table", store)


def test_paths_links_and_pickle_are_refused(pristine):
    """The attacks the fuzzer finds by chance, each asserted: a file path out of the store, a symbolic link to a
    file outside, a pickle codec and a huge shape in the zarr metadata. Also reports the fuzzing outcomes."""
    with copy_of(pristine) as store:
        manifest = json.loads((store / "manifest.json").read_text())
        secret = store.parent / "secret"
        manifest["files"][0].update(path="../secret", bytes=secret.stat().st_size)
        (store / "manifest.json").write_text(json.dumps(manifest))
        with pytest.raises(StoreFormatError, match="leaves the store"):
            open_store(store)
    with copy_of(pristine) as store:
        link = store / ARRAYS_DIR / "extra"
        link.symlink_to(store.parent / "secret")
        with pytest.raises(StoreFormatError, match="symbolic links"):
            open_store(store)
    rel = f"{ARRAYS_DIR}/zarr.json"
    for edit, named in (("pickle", r"targets.zarr/zarr.json: .*numcodecs\.pickle"), ("shape", "logits/values")):
        with copy_of(pristine) as store:
            metadata = json.loads((store / rel).read_text())
            array = metadata["consolidated_metadata"]["metadata"]["logits/values"]
            if edit == "pickle":
                array["codecs"][-1]["configuration"]["codecs"].insert(0, {"name": "numcodecs.pickle"})
            else:
                array["shape"] = [2**40, 2, 5]
            rewrite(store, rel, json.dumps(metadata).encode())
            with pytest.raises(StoreFormatError, match=named):
                use(store)
    print("\nfuzzed outcomes:", {kind: dict(counts) for kind, counts in OUTCOMES.items()})
