"""``python -m stores inspect|verify STORE``: summarise a reinforced store or check it thoroughly."""

from __future__ import annotations

import argparse
import json
import sys

from stores.store import StoreCorruptError
from stores.verify import describe_store, verify_store


def _inspect(path: str) -> int:
    info = describe_store(path)
    policy = ", ".join(f"{k}={v}" for k, v in info["policy"].items())
    print(f"store        {info['path']}")
    print(f"id           {info['store_id']}")
    print(f"teacher      {info['teacher']} ({info['num_classes']} classes)")
    print(f"transfer set {info['transfer_set']}")
    print(f"samples      {info['samples_ok']} ok, {info['samples_skipped']} skipped")
    print(f"views        {info['views']} per sample")
    print(f"policy       {policy}  (θ: {info['theta_bytes_per_view']:.1f} B/view)")
    for name, target in info["targets"].items():
        codec = ", ".join(f"{k}={v}" for k, v in target["codec"].items())
        fidelity = "  ".join(f"{metric} mean {s['mean']:.4f} min {s['min']:.4f}"
                             for metric, s in target["fidelity"].items())
        print(f"target       {name} [{target['kind']}] {codec}: {target['bytes_per_view']:.1f} B/view")
        print(f"  fidelity   {fidelity or 'not recorded'}")
    print(f"layout       {json.dumps(info['layout'])}")
    print(f"bytes        {info['total_bytes']} total, {info['data_bytes']} under targets.zarr")
    print(f"per view     {info['bytes_per_view']:.1f} B data, {info['total_bytes_per_view']:.1f} B with all files")
    return 0


def _verify(path: str) -> int:
    problems = verify_store(path)
    if problems:
        print(f"stores verify: {problems[0]}" + (f" (+{len(problems) - 1} more)" if len(problems) > 1 else ""),
              file=sys.stderr)
        return 1
    info = describe_store(path)
    print(f"ok: {path} ({info['samples_ok'] + info['samples_skipped']} samples x {info['views']} views, "
          f"{info['total_bytes']} bytes, checksums and every chunk verified)")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m stores", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("inspect", help="print the manifest summary and bytes per view").add_argument("store")
    commands.add_parser("verify", help="checksums, shapes and a decode of every chunk").add_argument("store")
    args = parser.parse_args(argv)
    try:
        return _inspect(args.store) if args.command == "inspect" else _verify(args.store)
    except (FileNotFoundError, StoreCorruptError, ValueError) as error:
        print(f"stores {args.command}: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
