"""A format-version-1 store upgrades losslessly: same arrays, same store id as a native version-2 build."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import polars as pl
import zarr

from reinforce.augment import policy_from_record
from reinforce.build import BuildConfig, build
from stores import open_store
from stores.store import ARRAYS_DIR, THETA


def write_v1(v2: Path, v1: Path) -> None:
    """The version-1 layout of the same content (as the format-1 writer laid it out): int32 θ records
    ``[version, box, flip, (op, bin)...]``, top-k arrays under global names, one ``codec``."""
    store = open_store(v2)
    content, group = store.manifest.content, zarr.open_group(v2 / ARRAYS_DIR, mode="r")
    policy = policy_from_record(content.policy.to_dict())
    n, k = store.manifest.num_samples, store.manifest.views
    records = policy.unpack(group[THETA][:].reshape(n * k, -1))
    params = np.array([[1, *r.box, int(r.flip), *[v for op in r.ops for v in op]] for r in records], np.int32)
    out = zarr.open_group(v1 / ARRAYS_DIR, mode="w", zarr_format=3)
    arrays = {"params": params.reshape(n, k, -1), "logits_topk": group["logits/values"][:],
              "logits_idx": group["logits/index"][:], "logits_lse": group["logits/lse"][:]}
    for name, values in arrays.items():
        out.create_array(name, data=values, chunks=(8, *values.shape[1:]))
    pl.read_parquet(v2 / "samples.parquet").write_parquet(v1 / "samples.parquet")
    codec = content.targets["logits"].codec
    v1_content = {"format_version": 1, "teacher": content.teacher.to_dict(),
                  "transfer_set": {"spec": content.transfer_set.spec, "fingerprint": content.transfer_set.fingerprint},
                  "num_samples": n, "views": k, "seed": content.seed,
                  "policy": {"name": "rrc_flip_randaug", "version": 1, **content.policy.args},
                  "codec": {"name": "topk_logits", "k": codec["k"], "num_classes": codec["num_classes"]},
                  "fields": {name: [list(a.shape[2:]), a.dtype.str] for name, a in arrays.items()}}
    files = [{"path": p.relative_to(v1).as_posix(), "bytes": p.stat().st_size, "sha256": ""}
             for p in sorted(v1.rglob("*")) if p.is_file()]
    (v1 / "manifest.json").write_text(json.dumps({
        "format_version": 1, "store_id": "v1", "content": v1_content, "layout": store.manifest.layout,
        "summary": {}, "files": files, "library_version": "0.1.0", "created_at": "2026-01-01T00:00:00+00:00"}))


def test_v1_store_upgrades_losslessly(lite0_teacher, tmp_path):
    model, card, _ = lite0_teacher
    native = tmp_path / "native"
    build(BuildConfig(teacher=card.name, transfer_set="fashion-mnist:test?limit=24", out=str(native), views=2,
                      topk=5, logit_precision="fp16", index_coding="plain", workers=0, unit_samples=16,
                      chunk_samples=8), teacher=(model, card))
    old, new = tmp_path / "old", tmp_path / "new"
    write_v1(native, old)
    refused = subprocess.run([sys.executable, "-m", "stores", "inspect", str(old)], capture_output=True, text=True)
    assert refused.returncode != 0 and "reinforce.upgrade" in refused.stderr
    run = subprocess.run([sys.executable, "-m", "reinforce.upgrade", str(old), str(new)], capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    upgraded, reference = open_store(new), open_store(native)
    assert upgraded.manifest.store_id == reference.manifest.store_id  # the same content, to the last field
    for name in ("theta", "logits/values", "logits/index", "logits/lse"):
        np.testing.assert_array_equal(zarr.open_array(new / ARRAYS_DIR / name, mode="r")[:],
                                      zarr.open_array(native / ARRAYS_DIR / name, mode="r")[:], err_msg=name)
    assert upgraded.samples.equals(reference.samples)
