"""Nearest-neighbour search and the selection strategies of ``reinforce.retrieve`` (faiss, torch, numpy).

Vectors are float32 ``[n, D]`` rows of unit norm, so inner product is cosine similarity; several encoders
are one vector each scaled by ``1/sqrt(E)`` and concatenated, whose inner product is the mean of the
per-encoder cosines (seed paper, Appendix B.2). Exact search on a GPU is ``TorchFlatIndex`` (blockwise matmul +
top-k): PyPI's faiss GPU wheels hold no kernels for H100-class GPUs (STACK-NOTES).
"""

from __future__ import annotations

import math

import faiss
import numpy as np
import torch

from reinforce.progress import progress_bar

__all__ = ["INDEX_KINDS", "STRATEGIES", "MaxSimilarity", "SearchIndex", "TorchFlatIndex", "best_matches", "combine",
           "make_index", "neighbours", "query_balanced", "similar_pairs", "unit_rows"]

INDEX_KINDS = ("flat", "ivfpq", "torch")
STRATEGIES = ("query-balanced", "best-matches", "random")
SEARCH_BLOCK = 4096  # queries per faiss call: one progress step
TRAIN_PER_LIST = 64  # IVF-PQ trains on a seeded sample of this many vectors per inverted list


def combine(per_encoder: list[np.ndarray]) -> np.ndarray:
    """Unit rows of each encoder ``[n, D_e]`` -> float32 ``[n, sum D_e]`` whose inner products are the mean of the
    per-encoder cosine similarities. Zero rows (images that failed to decode) stay zero."""
    if len({len(v) for v in per_encoder}) != 1:
        raise ValueError(f"encoders embedded different numbers of items: {[len(v) for v in per_encoder]}")
    scale = 1.0 / math.sqrt(len(per_encoder))
    return np.ascontiguousarray(np.concatenate([unit_rows(v) * scale for v in per_encoder], axis=1), np.float32)


def unit_rows(vectors: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm (zero rows left zero), float32."""
    vectors = np.asarray(vectors, np.float32)
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return np.divide(vectors, norms, out=np.zeros_like(vectors), where=norms > 0)


class TorchFlatIndex:
    """Exact inner-product search in torch, with faiss's ``ntotal``, ``d`` and ``search``: the gallery lives on
    ``device`` (fp16 on CUDA: 2 bytes per value; fp32 on CPU) and is scanned in blocks of ``block`` rows, so besides
    it a search holds only a ``[queries, block]`` fp32 score tile and the running top k (``neighbours`` sends at most
    ``SEARCH_BLOCK`` queries at a time). Exact ties across blocks go to the lower id, within one as topk orders them."""

    def __init__(self, vectors: np.ndarray, device: str | torch.device | None = None, block: int = 16384):
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.dtype = torch.float16 if self.device.type == "cuda" else torch.float32
        self.gallery = torch.from_numpy(np.ascontiguousarray(vectors, np.float32)).to(self.device, self.dtype)
        self.ntotal, self.d = self.gallery.shape
        self.block = block

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Like ``faiss.Index.search``: similarities float32 ``[Q, k]`` and ids int64 ``[Q, k]`` (-1: none), best
        first."""
        q = torch.from_numpy(np.ascontiguousarray(queries, np.float32)).to(self.device, self.dtype)
        sims = torch.full((len(q), k), -math.inf, device=self.device)
        ids = torch.full((len(q), k), -1, dtype=torch.int64, device=self.device)
        for start in range(0, self.ntotal, self.block):
            tile = self._scores(q, self.gallery[start: start + self.block])
            top = tile.topk(min(k, tile.shape[1]), dim=1)
            sims, order = torch.cat([sims, top.values], 1).sort(dim=1, descending=True, stable=True)
            ids = torch.cat([ids, top.indices + start], 1).gather(1, order)  # earlier blocks (lower ids) win ties
            sims, ids = sims[:, :k], ids[:, :k]
        return sims.cpu().numpy(), ids.cpu().numpy()

    def _scores(self, queries: torch.Tensor, block: torch.Tensor) -> torch.Tensor:
        """float32 ``[Q, B]`` inner products; half-precision inputs accumulate and return in fp32."""
        if self.dtype == torch.float32:
            return queries @ block.T
        return torch.mm(queries, block.T, out_dtype=torch.float32)


SearchIndex = faiss.Index | TorchFlatIndex  # what make_index returns and neighbours searches


def make_index(vectors: np.ndarray, kind: str = "flat", *, nprobe: int = 16, seed: int = 0) -> SearchIndex:
    """An inner-product index over ``vectors``: exact (``flat``; ``torch``: the same on a GPU, or the CPU) or IVF-PQ
    (``ivfpq``: sqrt(n) lists, up to 64 sub-quantisers of up to 8 bits, trained on a sample of the vectors) for
    galleries too large for exact search."""
    n, dim = vectors.shape
    if kind == "torch":
        return TorchFlatIndex(vectors)
    if kind == "flat":
        index = faiss.IndexFlatIP(dim)
    elif kind == "ivfpq":
        nlist = max(1, min(int(math.sqrt(n)), n // 39))  # faiss wants >= 39 training points per list
        subvectors = max(m for m in range(1, min(64, dim) + 1) if dim % m == 0)
        bits = max(1, min(8, int(math.log2(max(2, n // 39)))))
        index = faiss.IndexIVFPQ(faiss.IndexFlatIP(dim), dim, nlist, subvectors, bits, faiss.METRIC_INNER_PRODUCT)
        index.cp.seed = seed
        wanted = max(TRAIN_PER_LIST * nlist, 39 * 2**bits)  # k-means of the lists and of each sub-quantiser
        sample = np.random.default_rng(seed).choice(n, min(n, wanted), replace=False)
        index.train(vectors[np.sort(sample)])
        index.nprobe = min(nprobe, nlist)
    else:
        raise ValueError(f"unknown index {kind!r}; valid: {', '.join(INDEX_KINDS)}")
    index.add(vectors)
    return index


def neighbours(index: SearchIndex, queries: np.ndarray, k: int, allowed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` nearest allowed items of each query, best first: ids int64 ``[Q, k]`` (-1: none) and similarities
    float32 ``[Q, k]``. ``allowed`` is bool ``[index.ntotal]``; the search asks for enough extra to skip the rest."""
    wanted = min(index.ntotal, k + int((~allowed).sum()))
    ids = np.full((len(queries), k), -1, np.int64)
    sims = np.full((len(queries), k), -np.inf, np.float32)
    bar = progress_bar(total=len(queries), unit="query", desc=f"search k={k}")
    for start in range(0, len(queries), SEARCH_BLOCK):
        block_sims, block_ids = index.search(queries[start: start + SEARCH_BLOCK], wanted)
        for row, (found, sim) in enumerate(zip(block_ids, block_sims), start):
            ok = (found >= 0) & allowed[np.maximum(found, 0)]
            found, sim = found[ok][:k], sim[ok][:k]
            ids[row, : len(found)], sims[row, : len(found)] = found, sim
        bar.update(len(block_ids))
    bar.close()
    return ids, sims


def query_balanced(ids: np.ndarray, size: int, rng: np.random.Generator) -> tuple[np.ndarray, int] | None:
    """Seed paper §3.4 / B.5: the smallest k whose union of the queries' k-NN holds >= ``size`` unique items, then
    the k-th neighbours of randomly chosen queries dropped until exactly ``size`` remain. Returns the kept
    (query, rank) pairs as bool ``[Q, K]`` and k, or None when ``K`` columns are too few (search deeper)."""
    seen: set[int] = set()
    for k in range(1, ids.shape[1] + 1):
        column = ids[:, k - 1]
        seen.update(column[column >= 0].tolist())
        if len(seen) >= size:
            break
    else:
        return None
    keep = np.zeros(ids.shape, bool)
    keep[:, :k] = ids[:, :k] >= 0
    holders = np.bincount(ids[keep], minlength=int(ids.max()) + 1)  # kept pairs per item
    unique = len(seen)
    for query in rng.permutation(len(ids)):
        if unique == size:
            break
        item = ids[query, k - 1]
        if item >= 0:
            keep[query, k - 1] = False
            holders[item] -= 1
            unique -= int(holders[item] == 0)
    return keep, k


def best_matches(ids: np.ndarray, sims: np.ndarray, size: int) -> np.ndarray | None:
    """The ``size`` unique items of the highest-similarity (query, rank) pairs, whatever query they match; bool
    ``[Q, K]`` of each item's first pair, or None when ``K`` columns hold too few items."""
    order = np.argsort(-sims, axis=None, kind="stable")
    flat = ids.ravel()[order]
    order = order[flat >= 0]
    _, first = np.unique(ids.ravel()[order], return_index=True)
    if len(first) < size:
        return None
    keep = np.zeros(ids.size, bool)
    keep[order[np.sort(first)[:size]]] = True
    return keep.reshape(ids.shape)


def similar_pairs(vectors: np.ndarray, threshold: float) -> np.ndarray:
    """Row pairs ``(i, j)``, ``i < j``, with similarity > ``threshold`` (exact range search), int64 ``[M, 2]``."""
    if len(vectors) < 2:
        return np.zeros((0, 2), np.int64)
    index = faiss.IndexFlatIP(vectors.shape[1])
    index.add(vectors)
    lims, sims, found = index.range_search(vectors, threshold)
    rows = np.repeat(np.arange(len(vectors)), np.diff(lims.astype(np.int64)))
    pairs = np.stack([rows, found], axis=1)
    return pairs[(pairs[:, 0] < pairs[:, 1]) & (sims > threshold)]


class MaxSimilarity:
    """Nearest rows of a base set under the largest per-encoder cosine similarity: seed paper B.4 calls an image a
    possible leak when any of its encoders finds it near a task image. ``bases``: unit rows ``[n, D_e]`` per encoder."""

    def __init__(self, bases: list[np.ndarray]):
        self.bases = bases
        self.indexes = [make_index(base) for base in bases]

    def nearest(self, queries: list[np.ndarray], k: int) -> tuple[np.ndarray, np.ndarray]:
        """The ``k`` nearest base rows of each query (``[F, D_e]`` per encoder): similarities float32 ``[F, k]`` and
        rows int64 ``[F, k]``, best first; candidates are each encoder's own top k."""
        k = min(k, len(self.bases[0]))
        rows = np.concatenate([index.search(q, k)[1] for index, q in zip(self.indexes, queries)], axis=1)
        sims = np.max([np.einsum("fd,fcd->fc", q, base[rows]) for q, base in zip(queries, self.bases)], axis=0)
        best_rows, best_sims = np.zeros((len(rows), k), np.int64), np.zeros((len(rows), k), np.float32)
        for i, (row, sim) in enumerate(zip(rows, sims)):
            unique, first = np.unique(row, return_index=True)
            order = np.argsort(-sim[first], kind="stable")[:k]
            best_rows[i], best_sims[i] = unique[order], sim[first][order]
        return best_sims, best_rows
