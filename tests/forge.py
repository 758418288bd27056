"""Forging bad stores the way a stranger (or a careless colleague) would: start from a real store built through
``python -m reinforce.build`` (real Fashion-MNIST images, the real Lite0 teacher), edit a file, then re-seal the
manifest (every recorded size and sha256, and the store id of an edited content) so that only the reader's own
checks stand between the edit and training."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import pickle
import shutil
import subprocess
import sys
import tarfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
from hypothesis import HealthCheck, settings
from support import REPO, cli_env

from reinforce.build import main as build_main
from stores.manifest import StoreContent, content_id
from stores.store import MANIFEST, SAMPLES_FILE

SAMPLES = 24
TRANSFER_SET = f"fashion-mnist:test?limit={SAMPLES}"
Member = tuple[tarfile.TarInfo, bytes]


def build_store(zoo_dir: Path, out: Path, store_format: str = "zarr") -> Path:
    """A 24-sample, 2-view store of logits and embeddings in units of 8 samples, through the build CLI."""
    assert build_main(["--teacher", str(zoo_dir), "--transfer-set", TRANSFER_SET, "--out", str(out),
                       "--format", store_format, "--targets", "logits,embedding", "--views", "2", "--topk", "5",
                       "--workers", "0", "--unit-samples", "8", "--chunk-samples", "8"]) == 0
    return out


def copy_store(store: Path, folder: Path, name: str = "forged") -> Path:
    target = folder / name
    shutil.copytree(store, target)
    return target


def reseal(store: Path) -> None:
    """Record every listed file's current size and sha256 (dropping records of deleted files) and the content's
    hash as the store id: what a forger does so that checksums alone catch nothing."""
    manifest = json.loads((store / MANIFEST).read_text())
    records = []
    for record in manifest["files"]:
        path = store / record["path"]
        if path.is_file():
            data = path.read_bytes()
            records.append({**record, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()})
    manifest["files"] = records
    with contextlib.suppress(ValueError, TypeError, KeyError, AttributeError):  # unparsable: the reader says so
        manifest["store_id"] = content_id(StoreContent.from_dict(manifest["content"]))
    (store / MANIFEST).write_text(json.dumps(manifest))


def edit_manifest(store: Path, edit: Callable[[dict[str, Any]], None]) -> None:
    manifest = json.loads((store / MANIFEST).read_text())
    edit(manifest)
    (store / MANIFEST).write_text(json.dumps(manifest))
    reseal(store)


def edit_samples(store: Path, edit: Callable[[pl.DataFrame], pl.DataFrame]) -> None:
    table = edit(pl.read_parquet(store / SAMPLES_FILE))
    table.write_parquet(store / SAMPLES_FILE)
    reseal(store)


def shard_members(shard: Path) -> list[Member]:
    with tarfile.open(shard) as tar:
        return [(info, tar.extractfile(info).read() if info.isfile() else b"") for info in tar.getmembers()]


def write_shard(shard: Path, members: list[Member]) -> None:
    """Pack ``members`` (TarInfo, payload) as the shard, sizes as the TarInfo declares for non-files."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for info, data in members:
            if info.isfile():
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
            else:
                tar.addfile(info)
    shard.write_bytes(buffer.getvalue())


def edit_shard(store: Path, edit: Callable[[list[Member]], list[Member]], shard: str) -> Path:
    path = store / shard
    write_shard(path, edit(shard_members(path)))
    reseal(store)
    return path


def member(name: str, data: bytes, kind: bytes = tarfile.REGTYPE, link: str = "") -> Member:
    info = tarfile.TarInfo(name)
    info.type, info.linkname, info.size = kind, link, len(data)
    return info, data


def npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=True)
    return buffer.getvalue()


def replace(members: list[Member], name: str, data: bytes) -> list[Member]:
    assert any(info.name == name for info, _ in members), name
    return [(info, data if info.name == name else payload) for info, payload in members]


def load_npy(members: list[Member], name: str) -> np.ndarray:
    return np.load(io.BytesIO(dict((info.name, data) for info, data in members)[name]))


class Payload:
    """Unpickling this creates ``marker``: proof that a reader ran code from the store."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def pickled(marker: Path) -> bytes:
    return pickle.dumps(Payload(marker))


def run_cli(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    """``python -m ARGS`` as a user runs it, from the repository, on the CPU."""
    env = cli_env()
    return subprocess.run([sys.executable, "-m", *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout)


def one_error_line(run: subprocess.CompletedProcess, *needles: str) -> str:
    """The run exited 2 with exactly one error line on stderr, no traceback, naming every needle."""
    lines = [line for line in run.stderr.splitlines() if "error" in line.lower() or line.startswith("stores verify")]
    assert run.returncode == 2 and "Traceback" not in run.stderr, run.stderr[-3000:]
    assert len(lines) == 1 and all(n in lines[0] for n in needles), (needles, run.stderr[-3000:])
    return lines[0]


def fuzz_settings(examples: int) -> settings:
    """Hypothesis settings of a fuzz test: derandomized (the same inputs every run), ``FUZZ_EXAMPLES`` examples
    (default ``examples``), no deadline, and the health checks that a store on disk trips switched off."""
    return settings(max_examples=int(os.environ.get("FUZZ_EXAMPLES", examples)), deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                           HealthCheck.data_too_large])
