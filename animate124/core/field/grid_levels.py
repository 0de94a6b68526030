"""The per-level layout of a multiresolution hash grid, shared by the torch encoding and the Triton kernels.

For level ``l`` of ``n_levels`` (tiny-cuda-nn ``HashGrid``, float32 arithmetic): ``scale_l = exp2(l *
log2(per_level_scale)) * base_resolution - 1``, ``resolution_l = ceil(scale_l) + 1``, table entries ``size_l =
min(resolution_l ** D, 2 ** log2_hashmap_size)`` rounded up to a multiple of 8; a level is dense when its grid fits
its table. The levels are stacked in one table; ``offsets`` says where each starts.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

__all__ = ["HashGridLevels", "hash_grid_levels", "level_table", "HASH_PRIMES", "MERGE_RUNS_MAX_RES"]

# tiny-cuda-nn's per-dimension hash factors (dimension 0 uses 1 for memory coherence).
HASH_PRIMES = (1, 2654435761, 805459861, 3674653429, 2097192037, 1434869437, 2165219737)

# Levels up to this resolution merge runs in the Triton backward: the default grid's levels 0-6 (16 to 148), whose
# cells hold several consecutive samples of a ray at 256 steps per ray. On an H200 the default recipe's dynamic step
# spent 296 instead of 361 ms in its backward; merging every level saved no more.
MERGE_RUNS_MAX_RES = 160


@dataclass(frozen=True)
class HashGridLevels:
    """Per-level layout of a hash grid: everything the kernels need besides the table itself.

    ``scales`` are the float32 values of ``scale_l`` (stored as Python floats, exactly representable in float32);
    ``offsets`` has ``n_levels + 1`` entries (the last one is the table's total number of entries).
    """

    scales: tuple[float, ...]
    resolutions: tuple[int, ...]
    sizes: tuple[int, ...]
    offsets: tuple[int, ...]
    dense: tuple[bool, ...]


def hash_grid_levels(
    n_input_dims: int, n_levels: int, log2_hashmap_size: int, base_resolution: int, per_level_scale: float
) -> HashGridLevels:
    """Compute resolution, table size, offset and dense/hashed kind of every level, as tiny-cuda-nn does (float32)."""
    log2_scale = np.log2(np.float32(per_level_scale))
    scales, resolutions, sizes, offsets, dense = [], [], [], [0], []
    for level in range(n_levels):
        scale = np.exp2(np.float32(level) * log2_scale) * np.float32(base_resolution) - np.float32(1.0)
        resolution = int(np.ceil(scale)) + 1
        n_dense = resolution**n_input_dims
        size = min(_next_multiple(min(n_dense, 2**31 - 1), 8), 2**log2_hashmap_size)
        scales.append(float(scale))
        resolutions.append(resolution)
        sizes.append(size)
        offsets.append(offsets[-1] + size)
        dense.append(n_dense <= size)
    return HashGridLevels(tuple(scales), tuple(resolutions), tuple(sizes), tuple(offsets), tuple(dense))


def level_table(levels: HashGridLevels, device: torch.device | str = "cpu") -> Tensor:
    """Pack the per-level layout for the kernels: int32 ``[L, 5]`` rows (scale bits, resolution, size, offset, dense).

    The float32 scale is stored bit-cast to int32 so that ``module.half()`` cannot round it.
    """
    scale_bits = torch.tensor(levels.scales, dtype=torch.float32).view(torch.int32)
    cols = [torch.tensor(v, dtype=torch.int64) for v in (levels.resolutions, levels.sizes, levels.offsets[:-1])]
    dense = torch.tensor(levels.dense, dtype=torch.int64)
    table = torch.stack([scale_bits.long(), *cols, dense], dim=1)
    return table.to(torch.int32).to(device)


def _next_multiple(value: int, multiple: int) -> int:
    return (value + multiple - 1) // multiple * multiple
