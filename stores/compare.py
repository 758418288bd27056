"""What one store id promises, checked: two builds of one configuration hold the same store.

A store id is the hash of the build's configuration (teacher, transfer set, policy, seed, views, codecs), not of
its bytes. Two builds with one id — on one rank or several, on machines with other thread counts — hold
identical θ records (integer sampling), identical sample tables and identical integer codes that select (top-k
class indices), while values computed by the teacher in floating point may differ by **one rounding step of
their stored encoding**: a quantised code by 1, a float16/float32 value by one unit in the last place. Per-rank
thread counts change the order of the teacher's sums, and a value on a rounding boundary lands on either side
(15 of 48,000 entries of a 2-rank vs a 1-rank Lite0 build). Making every reduction order-independent would cost
the build its speed; this check is what a user comparing two stores can rely on instead.

Example:
    >>> report = compare_stores(open_store("runs/a"), open_store("runs/b"))
    >>> report.ok, report.rounding_steps          # True, {"logits/lse": 3, ...}
"""

from __future__ import annotations

import dataclasses

import numpy as np

from stores.store import THETA, ReinforcedStore, StoreFormatError, array_paths

__all__ = ["StoreComparison", "compare_stores"]

EXACT_ARRAYS = ("index",)  # integer codes that select (classes), not quantise a value: no rounding step allowed


@dataclasses.dataclass
class StoreComparison:
    """Outcome of ``compare_stores``: differences beyond the rule, and the rounding steps the rule allows."""

    errors: list[str] = dataclasses.field(default_factory=list)
    rounding_steps: dict[str, int] = dataclasses.field(default_factory=dict)  # array -> entries one step apart
    entries: int = 0

    @property
    def ok(self) -> bool:
        return not self.errors


def compare_stores(a: ReinforcedStore, b: ReinforcedStore, block: int = 4096) -> StoreComparison:
    """Compare ``b`` against ``a`` under ``STORE_ID_PROMISE``, ``block`` samples at a time (bounded memory)."""
    result = StoreComparison()
    if a.manifest.store_id != b.manifest.store_id:
        result.errors.append(f"store ids differ: {a.manifest.store_id} vs {b.manifest.store_id} (other "
                             "configurations: nothing to compare under one id)")
        return result
    if a.manifest.format != "zarr" or b.manifest.format != "zarr":
        raise StoreFormatError("comparing stores reads them at random: a webdataset store compares as the zarr "
                               "store it was exported from")
    if not a.samples.equals(b.samples):
        result.errors.append("sample tables differ (keys, sizes or skipped samples)")
    arrays = array_paths(a.manifest.content)
    for start in range(0, a.manifest.num_samples, block):
        stop = min(start + block, a.manifest.num_samples)
        left, right = a.read_range(start, stop), b.read_range(start, stop)
        for name, (_, dtype) in arrays.items():
            _compare_array(name, np.asarray(left[name]), np.asarray(right[name]), dtype, start, result)
    return result


def _compare_array(name: str, x: np.ndarray, y: np.ndarray, dtype: np.dtype, start: int,
                   result: StoreComparison) -> None:
    result.entries += x.size
    if name == THETA or name.rsplit("/", 1)[-1] in EXACT_ARRAYS:
        step = np.zeros_like(x, dtype=np.float64)
    elif np.issubdtype(dtype, np.integer):
        step = np.ones_like(x, dtype=np.float64)  # a quantised code: one level
    else:
        step = np.spacing(np.maximum(np.abs(x), np.abs(y)).astype(dtype)).astype(np.float64)  # one ulp
    gap = np.abs(x.astype(np.float64) - y.astype(np.float64))
    beyond = gap > step
    if beyond.any():
        sample = start + int(np.argwhere(beyond)[0][0])
        result.errors.append(f"{name}: {int(beyond.sum())} entries differ by more than one rounding step "
                             f"(first at sample {sample})")
    steps = int(((gap > 0) & ~beyond).sum())
    if steps:
        result.rounding_steps[name] = result.rounding_steps.get(name, 0) + steps
