"""Search throughput and index memory of ``reinforce.retrieve``'s indexes at a large gallery: faiss flat and
IVF-PQ, and the torch blockwise exact search (``--index torch``, what ``flat`` runs as on CUDA), side by side.

Why: exact inner product costs queries x gallery x D multiply-adds and 4 D bytes per gallery vector, which decides
when ``--index ivfpq`` must replace ``flat``; the torch row's ``vs_flat`` (its search time / faiss flat's, same run,
same vectors) says what the GPU path costs where it falls back to the CPU. Random unit vectors stand in for
embeddings: throughput and memory depend on the sizes only (recall on random vectors is a worst case for IVF-PQ,
reported for reference). Writes ``OUT`` (JSON) and prints a table.

Example:
    python benchmarks/retrieve.py --gallery 1000000 --dim 256 --queries 1000 --out docs/retrieve_bench.json
"""

from __future__ import annotations

import argparse
import json
import time

import faiss
import numpy as np
import torch

from reinforce.retrieve.search import TorchFlatIndex, make_index, unit_rows

KINDS = ("flat", "ivfpq", "torch")


def measure(kind: str, gallery: np.ndarray, queries: np.ndarray, k: int, nprobe: int) -> dict:
    """Build, size and search one index; returns its numbers and its neighbour ids."""
    started = time.perf_counter()
    index = make_index(gallery, kind, nprobe=nprobe)
    built = time.perf_counter() - started
    started = time.perf_counter()
    _, ids = index.search(queries, k)
    searched = time.perf_counter() - started
    on_torch = isinstance(index, TorchFlatIndex)
    size = index.gallery.nbytes if on_torch else int(faiss.serialize_index(index).nbytes)
    return {"index": kind, "device": str(index.device) if on_torch else "cpu", "build_s": round(built, 2),
            "search_s": round(searched, 3),
            "pairs_per_s": len(queries) * len(gallery) / searched, "queries_per_s": len(queries) / searched,
            "index_bytes": size, "bytes_per_vector": size / len(gallery), "ids": ids}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gallery", type=int, default=1_000_000, help="gallery vectors")
    parser.add_argument("--dim", type=int, default=256, help="embedding width")
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--k", type=int, default=100, help="neighbours per query")
    parser.add_argument("--nprobe", type=int, default=16)
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    args = parser.parse_args(argv)
    rng = np.random.default_rng(0)
    gallery = unit_rows(rng.standard_normal((args.gallery, args.dim), dtype=np.float32))
    queries = unit_rows(rng.standard_normal((args.queries, args.dim), dtype=np.float32))
    rows = [measure(kind, gallery, queries, args.k, args.nprobe) for kind in KINDS]
    exact = rows[0]["ids"]
    for row in rows:
        row["recall_at_k"] = float(np.mean([len(np.intersect1d(a, b)) / args.k for a, b in zip(exact, row.pop("ids"))]))
        row["vs_flat"] = round(row["search_s"] / rows[0]["search_s"], 2)
    result = {"gallery": args.gallery, "dim": args.dim, "queries": args.queries, "k": args.k, "nprobe": args.nprobe,
              "threads": faiss.omp_get_max_threads(), "torch_threads": torch.get_num_threads(), "rows": rows}
    print(f"{args.gallery:,} x {args.dim}-d gallery, {args.queries} queries, k={args.k}, "
          f"{result['threads']} faiss / {result['torch_threads']} torch threads")
    print("| index | device | build s | search s | search s / flat's | queries/s | query x gallery pairs/s | "
          "bytes/vector | recall@k |")
    print("|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['index']} | {row['device']} | {row['build_s']} | {row['search_s']} | {row['vs_flat']} | "
              f"{row['queries_per_s']:,.0f} | {row['pairs_per_s']:.3g} | {row['bytes_per_vector']:.1f} | "
              f"{row['recall_at_k']:.3f} |")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
