"""``python -m stores inspect|verify STORE``, ``ls ROOT``, ``publish STORE URL``: summarise a reinforced store,
check it thoroughly, list the stores published under a folder or URL (a catalog), or copy one there. A zarr store
becomes webdataset shards that carry the images with ``python -m reinforce.export_wds`` (the images are the
transfer set's, which ``stores`` knows nothing of).
STORE and ROOT are local paths or fsspec URLs (``s3://bucket/stores``)."""

from __future__ import annotations

import argparse
import json
import sys

from stores.catalog import list_stores, publish_store
from stores.cli_errors import HelpFormatter, cli_errors, debug_flag
from stores.codecs import create_codec
from stores.compare import compare_stores
from stores.manifest import STORE_ID_PROMISE
from stores.store import open_store
from stores.untrusted import printable
from stores.verify import describe_store, verify_store

LS_COLUMNS = ("name", "store_id", "teacher", "transfer_set", "targets", "views", "samples", "bytes", "created_at")


def _line(text: str) -> None:
    """Print one line of what a store says, its control characters escaped (a store is someone else's text)."""
    print(printable(text))


def _inspect(path: str) -> int:
    info = describe_store(path)
    policy = ", ".join(f"{k}={v}" for k, v in info["policy"].items())
    _line(f"store        {info['path']}")
    _line(f"id           {info['store_id']}")
    _line(f"teacher      {info['teacher']} ({info['num_classes']} classes)")
    _line(f"transfer set {info['transfer_set']}")
    _line(f"samples      {info['samples_ok']} ok, {info['samples_skipped']} skipped")
    _line(f"views        {info['views']} per sample")
    _line(f"policy       {policy}  (θ: {info['theta_bytes_per_view']:.1f} B/view)")
    for name, target in info["targets"].items():
        codec = ", ".join(f"{k}={v}" for k, v in target["codec"].items())
        fidelity = "  ".join(f"{metric} mean {s['mean']:.4f} min {s['min']:.4f}"
                             for metric, s in target["fidelity"].items())
        _line(f"target       {name} [{target['kind']}] {codec}: {target['bytes_per_view']:.1f} B/view")
        _line(f"  fidelity   {fidelity or 'not recorded'}")
        dense = getattr(create_codec(**target["codec"]), "dense_bytes_per_view", None)
        if dense:  # per-pixel targets: what float16 logit maps would cost
            _line(f"  vs dense   fp16 logits {dense} B/view: {dense / target['bytes_per_view']:.1f}x the stored bytes")
    _line(f"layout       {json.dumps(info['layout'])}")
    _line(f"bytes        {info['total_bytes']} total, {info['data_bytes']} under {info['data_dir']}")
    _line(f"per view     {info['bytes_per_view']:.1f} B data, {info['total_bytes_per_view']:.1f} B with all files")
    return 0


def _verify(path: str) -> int:
    problems = verify_store(path)
    if problems:  # a bad store is bad input: exit 2, as every command's errors
        for problem in problems:
            print(f"stores verify: {problem}", file=sys.stderr)
        return 2
    info = describe_store(path)
    print(f"ok: {path} ({info['samples_ok'] + info['samples_skipped']} samples x {info['views']} views, "
          f"{info['total_bytes']} bytes, checksums and every chunk verified)")
    return 0


def _compare(path: str, other: str) -> int:
    """``verify STORE --against OTHER``: STORE is verified first; OTHER is only read (verify it on its own too)."""
    status = _verify(path)
    if status:
        return status
    report = compare_stores(open_store(path), open_store(other))
    if not report.ok:
        print(f"stores verify: {path} differs from {other}: " + "; ".join(report.errors), file=sys.stderr)
        return 2
    steps = sum(report.rounding_steps.values())
    detail = ", ".join(f"{name} {count}" for name, count in sorted(report.rounding_steps.items()))
    print(f"same store as {other}: {report.entries} entries, {steps} one rounding step apart"
          + (f" ({detail})" if detail else "") + f" [rule: {STORE_ID_PROMISE}]")
    return 0


def _ls(root: str, as_json: bool) -> int:
    rows = list_stores(root)
    if as_json:
        print(json.dumps(rows, indent=1))
        return 0
    cells = [[_cell(row.get(column, row.get("error", ""))) if column != "name" else printable(row["name"])
              for column in LS_COLUMNS] for row in rows]
    widths = [max(len(column), *(len(row[i]) for row in cells)) for i, column in enumerate(LS_COLUMNS)]
    for line in [list(LS_COLUMNS), *cells]:
        print("  ".join(cell.ljust(width) for cell, width in zip(line, widths)).rstrip())
    if not rows:
        print(f"(no published stores under {root})", file=sys.stderr)
    return 0


def _cell(value) -> str:
    return printable(",".join(value) if isinstance(value, dict) else value)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m stores", description=__doc__, formatter_class=HelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("inspect", help="print the manifest summary and bytes per view",
                        formatter_class=HelpFormatter).add_argument("store")
    verify = commands.add_parser("verify", help="checksums, shapes and a decode of every chunk",
                                 formatter_class=HelpFormatter)
    verify.add_argument("store")
    verify.add_argument("--against", metavar="OTHER", help="also compare with another build of the same store id: "
                        "what one id promises (README 'What a store id promises')")
    ls = commands.add_parser("ls", help="the stores published under a folder or URL", formatter_class=HelpFormatter)
    ls.add_argument("root")
    ls.add_argument("--json", action="store_true", help="one JSON list instead of a table")
    publish = commands.add_parser("publish", help="copy a store to another folder or URL (manifest last)",
                                  formatter_class=HelpFormatter)
    publish.add_argument("store")
    publish.add_argument("destination")
    args = debug_flag(parser).parse_args(argv)
    with cli_errors(f"stores {args.command}", args.debug):
        if args.command == "ls":
            return _ls(args.root, args.json)
        if args.command == "publish":
            print(f"published {args.store} -> {publish_store(args.store, args.destination)}")
            return 0
        if args.command == "inspect":
            return _inspect(args.store)
        return _compare(args.store, args.against) if args.against else _verify(args.store)


if __name__ == "__main__":
    sys.exit(main())
