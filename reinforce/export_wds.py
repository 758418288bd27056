"""``python -m reinforce.export_wds STORE --out DIR``: copy a zarr store into webdataset shards that carry the images.

θ and targets are copied byte for byte (``stores.wds.export_wds``); the images come from the store's transfer set,
reopened and checked unchanged (``reinforce.replay.transfer_set``), as the file's own bytes where it has a file,
else a lossless PNG. ``stores`` knows nothing of images, so this command lives here. STORE and DIR are local paths
or fsspec URLs.

Example:
    python -m reinforce.export_wds runs/fmnist-lite0 --out runs/fmnist-lite0-wds --maxsize 268435456
"""

from __future__ import annotations

import argparse
import sys

from reinforce.replay import transfer_set
from stores.cli_errors import HelpFormatter, cli_errors, debug_flag
from stores.store import SHARDS_DIR, open_store
from stores.wds import export_wds

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m reinforce.export_wds", description=__doc__.split("\n\n")[0],
                                     formatter_class=HelpFormatter)
    parser.add_argument("store", help="the zarr store to copy: a directory or an fsspec URL")
    parser.add_argument("--out", required=True, help="the new store: a directory or an fsspec URL")
    parser.add_argument("--maxsize", type=int, default=256 << 20, help="about this many bytes per shard")
    parser.add_argument("--maxcount", type=int, default=100_000, help="at most this many samples per shard")
    args = debug_flag(parser).parse_args(argv)
    with cli_errors("reinforce.export_wds", args.debug):
        store = open_store(args.store)
        manifest = export_wds(store, args.out, transfer_set(store).encoded, maxsize=args.maxsize,
                              maxcount=args.maxcount)
    shards = sum(f.path.startswith(SHARDS_DIR + "/") for f in manifest.files)
    print(f"exported {args.store} -> {args.out} (id {manifest.store_id}): {manifest.summary['ok']} samples in "
          f"{shards} shards of {manifest.layout['unit_samples']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
