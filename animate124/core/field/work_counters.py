"""Work counters: how much field work a step does, counted where the work is launched.

Counted from host-side shapes only (no device synchronisation, no extra kernels), so the counts cost nothing on the
GPU and any machine can measure them: a change that removes work shows on the CPU before it is timed on a GPU.
Counting is off unless a :class:`WorkCounts` context is open (the step benchmark opens one per step).

Keys (each a number of points or rays, summed over the calls in the context):

- ``rays``: rays rendered; ``samples_marched``: samples left after the occupancy grid; ``samples``: samples left
  after the alpha threshold and the transmittance early stop, evaluated by the field with gradient;
- ``normal_samples``: samples that get a normal; ``normal_queries``: the density queries their finite differences
  make (6 per sample with central differences, 3 with forward ones);
- ``grid{D}d_fwd`` / ``grid{D}d_bwd``: points through a D-dimensional hash grid's forward / backward (a forward run
  again in a backward, by checkpointing, counts as a forward too);
- ``triton_launches``: Triton kernel launches of the hash grids.
"""

from __future__ import annotations

from collections import Counter
from typing import Optional

__all__ = ["WorkCounts", "count", "counting"]

_active: Optional[Counter] = None


class WorkCounts:
    """Context manager: while open, :func:`count` adds to ``self.counts`` (one context at a time; a nested one
    collects apart and hands the outer one back when it closes)."""

    def __init__(self) -> None:
        self.counts: Counter = Counter()
        self._outer: Optional[Counter] = None

    def __enter__(self) -> "WorkCounts":
        global _active
        self._outer, _active = _active, self.counts
        return self

    def __exit__(self, *exc) -> bool:
        global _active
        _active = self._outer
        return False


def count(key: str, n: int = 1) -> None:
    """Add ``n`` to ``key`` in the open :class:`WorkCounts` (nothing when none is open)."""
    if _active is not None:
        _active[key] += int(n)


def counting() -> bool:
    """Whether a :class:`WorkCounts` is open (callers skip counts that would cost work to compute)."""
    return _active is not None
