"""``python -m reinforce.upgrade OLD NEW``: convert a format-version-1 store to version 2, losslessly.

Version 1 held one target (top-k logits as ``logits_topk`` fp16, ``logits_idx``, ``logits_lse`` fp32) and
θ as int32 records ``[version, left, top, width, height, flip, (op, signed bin)...]`` indexing
torchvision's RandAugment table, whose names and order the project's own op table keeps. Version 2
stores the same logits as the ``logits`` target with the exact codec (``precision=fp16,
index_coding=plain``) and θ packed by ``rrc_flip_randaug``; replayed pixels are unchanged. No teacher
pass runs: the upgrade copies, it does not recompute.

Example:
    python -m reinforce.upgrade runs/old-store runs/old-store-v2
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from reinforce.augment import AugParams, create_policy
from stores.cli_errors import HelpFormatter, cli_errors, debug_flag
from stores.codecs import TopKLogitsCodec
from stores.lineage import library_version
from stores.manifest import ArraySpec, PolicyRecord, StoreContent, TargetRecord, TeacherCard, TransferSetRecord
from stores.store import ARRAYS_DIR, THETA, StoreManifest, StoreWriter

__all__ = ["main", "upgrade_v1"]

V1_ARRAYS = {"values": "logits_topk", "index": "logits_idx", "lse": "logits_lse"}
V1_POLICY_ARGS = ("size", "scale", "ratio", "flip_prob", "num_ops", "magnitude", "num_magnitude_bins")


def upgrade_v1(old: str | Path, new: str | Path) -> StoreManifest:
    """Write the version-2 equivalent of the version-1 store ``old`` at ``new``; returns its manifest."""
    old = Path(old)
    manifest = json.loads((old / "manifest.json").read_text())
    if manifest.get("format_version") != 1:
        raise ValueError(f"{old} is not a format-version-1 store (format_version {manifest.get('format_version')})")
    for record in manifest["files"]:  # sizes as recorded: a damaged v1 store is not silently converted
        file = old / record["path"]
        if ".." in Path(record["path"]).parts or not file.is_file() or file.stat().st_size != record["bytes"]:
            raise ValueError(f"{file} is missing or damaged; run the v1 `stores verify` or rebuild the store")
    content, policy = _v2_content(manifest["content"])
    writer = StoreWriter(new, content, **manifest["layout"])
    writer.create()
    group = zarr.open_group(old / ARRAYS_DIR, mode="r")
    rows = _v1_rows(old)
    for unit in writer.pending_units():
        span = slice(writer.unit_range(unit).start, writer.unit_range(unit).stop)
        arrays = {f"logits/{name}": group[v1][span] for name, v1 in V1_ARRAYS.items()}
        arrays[THETA] = _repack(group["params"][span], policy)
        writer.write_unit(unit, arrays, list(rows[span]))
    return writer.finalize(library_version())


def _v2_content(v1: dict[str, Any]) -> tuple[StoreContent, Any]:
    if v1["policy"]["name"] != "rrc_flip_randaug" or v1["codec"]["name"] != "topk_logits":
        raise ValueError(f"unknown v1 policy/codec {v1['policy']['name']!r}/{v1['codec']['name']!r}")
    policy = create_policy("rrc_flip_randaug", **{k: v1["policy"][k] for k in V1_POLICY_ARGS})
    codec = TopKLogitsCodec(k=v1["codec"]["k"], num_classes=v1["codec"]["num_classes"], precision="fp16",
                            index_coding="plain")
    arrays = {name: ArraySpec(shape, dtype.str) for name, (shape, dtype) in codec.arrays().items()}
    content = StoreContent(
        teacher=TeacherCard.from_dict(v1["teacher"], "content.teacher"),
        transfer_set=TransferSetRecord(spec=v1["transfer_set"]["spec"], fingerprint=v1["transfer_set"]["fingerprint"],
                                       num_samples=int(v1["num_samples"])),
        policy=PolicyRecord.from_dict(policy.to_record()), views=int(v1["views"]), seed=int(v1["seed"]),
        targets={"logits": TargetRecord(kind=codec.kind, codec=codec.to_dict(), arrays=arrays)})
    return content, policy


def _repack(params: np.ndarray, policy) -> np.ndarray:
    """int32 v1 records ``[N, K, 6 + 2n]`` -> the policy's packed θ ``[N, K, P]`` (skipped samples: zeros)."""
    flat = params.reshape(-1, params.shape[-1])
    records = [AugParams(tuple(int(v) for v in row[1:5]), bool(row[5]), tuple(zip(row[6::2].tolist(),
                                                                                    row[7::2].tolist())))
               for row in flat]
    packed = np.zeros((len(flat), policy.record_bytes), dtype=np.uint8)
    valid = flat[:, 0] != 0  # version 0: a skipped sample's zero record
    if valid.any():
        packed[valid] = policy.pack([r for r, ok in zip(records, valid) if ok])
    return packed.reshape(*params.shape[:2], policy.record_bytes)


def _v1_rows(old: Path) -> np.ndarray:
    import polars as pl

    return np.array(pl.read_parquet(old / "samples.parquet").to_dicts(), dtype=object)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m reinforce.upgrade", description=__doc__.split("\n\n")[0],
                                     formatter_class=HelpFormatter)
    parser.add_argument("old", help="format-version-1 store")
    parser.add_argument("new", help="where to write the version-2 store")
    args = debug_flag(parser).parse_args(argv)
    with cli_errors("reinforce.upgrade", args.debug):
        try:
            manifest = upgrade_v1(args.old, args.new)
        except KeyError as error:  # a v1 manifest field is missing
            raise ValueError(f"{args.old} is not a complete format-version-1 store (its manifest lacks {error})"
                             ) from None
    print(f"upgraded {args.old} -> {args.new} (format 2, id {manifest.store_id}, "
          f"{manifest.summary['ok']} samples x {manifest.views} views)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
