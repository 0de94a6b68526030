"""Multiresolution hash encoding (Instant-NGP) for 3-D and 4-D inputs, with tiny-cuda-nn ``HashGrid`` semantics.

For level ``l`` (0-based) of ``n_levels``, all arithmetic in float32 as tiny-cuda-nn does it:

- ``scale_l = exp2(l * log2(per_level_scale)) * base_resolution - 1``, ``resolution_l = ceil(scale_l) + 1``;
- ``size_l`` (table entries of the level) ``= min(resolution_l ** D, 2 ** log2_hashmap_size)`` rounded up to a
  multiple of 8; the levels are stacked in one table ``embeddings[sum(size), F]`` (``level_offsets`` gives where
  each level starts);
- a point ``x`` in ``[0, 1]^D`` has grid position ``p = fma(x, scale_l, 0.5)``, cell ``g = floor(p)`` and fraction
  ``w = p - g``; its feature is the (d)-linear interpolation of the ``2**D`` corners ``g + b`` (``b`` in ``{0,1}^D``)
  with weights ``prod_d (b_d ? w_d : 1 - w_d)``;
- a corner's table index is the dense index ``sum_d c_d * resolution_l ** d`` when the level's grid fits its table
  (``resolution_l ** D <= size_l``), else the spatial hash ``xor_d (c_d * primes[d])`` in uint32 arithmetic, both
  modulo ``size_l``. The 0.5 offset can make the last corner of a dense level wrap around (as in tiny-cuda-nn).

Output: ``[N, n_levels * n_features_per_level]``, level-major (column ``l * F + f``), float32. Levels at or above
``n_active_levels`` (coarse-to-fine training) output zeros and receive no gradient.

Inputs outside ``[0, 1]`` are clamped to it (tiny-cuda-nn would wrap them around instead); the clamp makes the
gradient with respect to such inputs zero.

Backends (``implementation``): ``"torch"`` (pure PyTorch reference, any device, differentiable in the embeddings and
in ``x``), ``"triton"`` (CUDA kernels with their own backward, for the embeddings and for ``x``; see
``hashgrid_triton``), ``"tcnn"`` (tinycudann, when installed) and ``"auto"`` (Triton for CUDA inputs
when ``triton`` imports, torch otherwise), chosen from the input's device at every call.
"""

from __future__ import annotations

import importlib.util
import math
import os
from typing import Literal

import torch
from jaxtyping import Float
from torch import Tensor

from animate124.core.field.grid_levels import (
    HASH_PRIMES,
    MERGE_RUNS_MAX_RES,
    HashGridLevels,
    hash_grid_levels,
    level_table,
)
from animate124.core.field.work_counters import count, counting

__all__ = ["HashGridEncoding", "hash_grid_encode_torch"]

Implementation = Literal["auto", "torch", "triton", "tcnn"]
_IMPLEMENTATIONS = ("auto", "torch", "triton", "tcnn")
_TRITON_MAX_DIMS = 4  # the kernels unroll at most 4 coordinates

def hash_grid_encode_torch(
    x: Float[Tensor, "N D"], embeddings: Float[Tensor, "E F"], levels: HashGridLevels, n_active_levels: int
) -> Float[Tensor, "N LF"]:
    """Pure-PyTorch hash-grid encoding (the reference twin of the Triton kernels).

    Args:
        x: points in ``[0, 1]^D`` (not clamped here), float32.
        embeddings: the stacked per-level tables, float32.
        levels: layout from ``hash_grid_levels``.
        n_active_levels: levels at or above it output zeros.
    Returns:
        ``[N, L * F]`` features, differentiable in ``embeddings`` and in ``x``.
    """
    n, d = x.shape
    f = embeddings.shape[1]
    bits = _corner_bits(d, x.device)  # [C, D], C = 2**D; corner c has bit d = (c >> d) & 1
    outs = []
    for level in range(len(levels.resolutions)):
        if level >= n_active_levels:
            outs.append(x.new_zeros(n, f))
            continue
        # 1. Grid position with a single rounding, like fmaf(x, scale, 0.5) (x * scale is exact in float64).
        pos = (x.double() * levels.scales[level] + 0.5).float()
        cell = torch.floor(pos.detach())
        frac = pos - cell
        corners = cell.long()[:, None, :] + bits[None]  # [N, C, D]
        # 2. Weights: product over dimensions, dimension 0 first (tiny-cuda-nn's order).
        w = torch.where(bits[None].bool(), frac[:, None, :], 1.0 - frac[:, None, :])
        weight = w[..., 0]
        for dim in range(1, d):
            weight = weight * w[..., dim]
        # 3. Table index and gather.
        index = _corner_index(corners, levels.resolutions[level], levels.sizes[level], levels.dense[level])
        # index_select's backward is an atomic index_add (plain indexing's sorts the indices: slower on CUDA).
        values = embeddings.index_select(0, (index + levels.offsets[level]).reshape(-1)).view(n, -1, f)  # [N, C, F]
        outs.append((weight[..., None] * values).sum(dim=1))
    return torch.cat(outs, dim=1)


class HashGridEncoding(torch.nn.Module):
    """Multiresolution hash encoding with tiny-cuda-nn ``HashGrid`` semantics (see the module docstring).

    Args:
        n_input_dims: D, the number of input coordinates (1 to 7; 3 for space, 4 for space-time).
        n_levels: L, number of resolution levels.
        n_features_per_level: F, features per level (1, 2, 4 or 8, as in tiny-cuda-nn).
        log2_hashmap_size: log2 of the largest per-level table.
        base_resolution: resolution of the coarsest level (its grid scale is ``base_resolution - 1``).
        per_level_scale: growth factor of the scale between levels.
        implementation: ``"auto"``, ``"torch"``, ``"triton"`` or ``"tcnn"`` (see the module docstring).
        init_scale: embeddings start as U(-init_scale, init_scale) (tiny-cuda-nn uses 1e-4).
        generator: optional CPU generator for the initialisation.
        merge_runs_max_res: Triton backward only: levels of resolution <= this add the gradient of a run of
            consecutive points with the same table row with one atomic (``hashgrid_triton.KernelConfig``); 0: off.
            Default ``MERGE_RUNS_MAX_RES``.

    Attributes:
        embeddings: ``nn.Parameter [total_entries, F]`` float32, levels stacked at ``level_offsets``.
        n_output_dims: ``L * F``.
        n_active_levels: coarse-to-fine masking; levels at or above it output zeros and get no gradient.
    """

    def __init__(
        self,
        n_input_dims: int,
        n_levels: int = 16,
        n_features_per_level: int = 2,
        log2_hashmap_size: int = 19,
        base_resolution: int = 16,
        per_level_scale: float = 1.447269237440378,
        implementation: Implementation = "auto",
        init_scale: float = 1e-4,
        generator: torch.Generator | None = None,
        merge_runs_max_res: int = MERGE_RUNS_MAX_RES,
    ):
        super().__init__()
        if isinstance(merge_runs_max_res, bool) or not isinstance(merge_runs_max_res, int) or merge_runs_max_res < 0:
            raise ValueError(f"merge_runs_max_res={merge_runs_max_res!r} must be an int >= 0 (0: off)")
        self.merge_runs_max_res = merge_runs_max_res
        _check_args(n_input_dims, n_levels, n_features_per_level, log2_hashmap_size, base_resolution,
                    per_level_scale, implementation, init_scale)
        self.n_input_dims = n_input_dims
        self.n_levels = n_levels
        self.n_features_per_level = n_features_per_level
        self.log2_hashmap_size = log2_hashmap_size
        self.base_resolution = base_resolution
        self.per_level_scale = float(per_level_scale)
        self.implementation = implementation
        self.n_output_dims = n_levels * n_features_per_level
        self.levels = hash_grid_levels(n_input_dims, n_levels, log2_hashmap_size, base_resolution, per_level_scale)
        self._n_active_levels = n_levels
        table = torch.empty(self.levels.offsets[-1], n_features_per_level, dtype=torch.float32)
        table.uniform_(-init_scale, init_scale, generator=generator)
        self.embeddings = torch.nn.Parameter(table)
        # Per-level layout for the Triton kernels; follows the module across devices, not saved in checkpoints.
        self.register_buffer("_level_table", level_table(self.levels), persistent=False)
        self._tcnn_modules: dict[str, torch.nn.Module] = {}  # built on first tcnn call, one per CUDA device

    @property
    def level_resolutions(self) -> tuple[int, ...]:
        return self.levels.resolutions

    @property
    def level_offsets(self) -> tuple[int, ...]:
        """Start row of each level in ``embeddings``, plus the total row count at the end."""
        return self.levels.offsets

    @property
    def n_active_levels(self) -> int:
        return self._n_active_levels

    @n_active_levels.setter
    def n_active_levels(self, value: int) -> None:
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= self.n_levels:
            raise ValueError(f"n_active_levels={value!r} must be an int in [0, {self.n_levels}] (n_levels)")
        self._n_active_levels = value

    def extra_repr(self) -> str:
        return (f"n_input_dims={self.n_input_dims}, n_levels={self.n_levels}, "
                f"n_features_per_level={self.n_features_per_level}, log2_hashmap_size={self.log2_hashmap_size}, "
                f"base_resolution={self.base_resolution}, per_level_scale={self.per_level_scale}, "
                f"implementation={self.implementation!r}, n_active_levels={self.n_active_levels}")

    def forward(self, x: Float[Tensor, "*B D"]) -> Float[Tensor, "*B LF"]:
        """Encode points ``x`` (last dim D, any leading dims; clamped to [0, 1]) into ``[..., L * F]`` float32."""
        if not isinstance(x, Tensor) or x.ndim < 1 or x.shape[-1] != self.n_input_dims:
            shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"x has shape {shape}, expected [..., {self.n_input_dims}] (n_input_dims); "
                             "reshape the points or build the encoding with the right n_input_dims")
        if x.device != self.embeddings.device:
            raise ValueError(f"x is on {x.device} but embeddings are on {self.embeddings.device}; move one of them")
        lead = x.shape[:-1]
        points = x.reshape(-1, self.n_input_dims).float().clamp(0.0, 1.0)
        backend = self._backend(points)
        if backend == "torch":
            out = hash_grid_encode_torch(points, self.embeddings, self.levels, self.n_active_levels)
        elif backend == "triton":
            from animate124.core.field.hashgrid_triton import KernelConfig, hash_grid_encode_triton

            out = hash_grid_encode_triton(points, self.embeddings, self.levels, self.n_active_levels,
                                          table=self._level_table,
                                          config=KernelConfig(merge_runs_max_res=self.merge_runs_max_res))
        else:
            out = self._forward_tcnn(points)
        if counting():
            self._count(points.shape[0], out)
        return out.reshape(*lead, self.n_output_dims)

    def _count(self, n: int, out: Tensor) -> None:
        """Work counters: ``n`` points through this grid's forward, and through its backward when a gradient reaches
        ``out`` (a hook: no device work)."""
        key = f"grid{self.n_input_dims}d"
        count(f"{key}_fwd", n)
        if out.requires_grad:
            out.register_hook(lambda grad: count(f"{key}_bwd", n))

    def embedding_grad(self, x: Float[Tensor, "N D"], grad_out: Float[Tensor, "N LF"],
                       out: Tensor | None = None) -> Float[Tensor, "E F"]:
        """The gradient of ``sum(grad_out * self(x))`` with respect to ``embeddings``, without building a graph
        for it: the Triton backward kernel alone on CUDA (the features at ``x`` are not computed again), the
        forward again under autograd on the other backends. ``x`` as for :meth:`forward`; ``out``: a table to add
        the gradient to (returned), instead of a new one."""
        points = x.reshape(-1, self.n_input_dims).float().clamp(0.0, 1.0)
        grad_out = grad_out.reshape(points.shape[0], self.n_output_dims)
        count(f"grid{self.n_input_dims}d_bwd", points.shape[0])
        if self._backend(points) == "triton":
            from animate124.core.field.hashgrid_triton import KernelConfig, embedding_grad_triton

            return embedding_grad_triton(points, grad_out, self.embeddings, self.levels, self.n_active_levels,
                                         table=self._level_table,
                                         config=KernelConfig(merge_runs_max_res=self.merge_runs_max_res), out=out)
        with torch.enable_grad():
            if self._backend(points) == "torch":
                encoded = hash_grid_encode_torch(points, self.embeddings, self.levels, self.n_active_levels)
            else:
                encoded = self._forward_tcnn(points)
            count(f"grid{self.n_input_dims}d_fwd", points.shape[0])
            grad = torch.autograd.grad(encoded, self.embeddings, grad_out)[0]
        return grad if out is None else out.add_(grad)

    def _backend(self, x: Tensor) -> str:
        if self.implementation == "torch":
            return "torch"
        if self.implementation == "tcnn":
            return "tcnn"
        interpreted = os.environ.get("TRITON_INTERPRET", "0") == "1"
        fits = self.n_input_dims <= _TRITON_MAX_DIMS
        if self.implementation == "triton":
            if not fits:
                raise ValueError(f"implementation='triton' supports n_input_dims <= {_TRITON_MAX_DIMS} (got "
                                 f"{self.n_input_dims}); use implementation='torch'")
            if not _triton_available():
                raise ValueError("implementation='triton' but triton does not import; `pip install triton` or use "
                                 "implementation='torch'")
            if x.device.type != "cuda" and not interpreted:
                raise ValueError(f"implementation='triton' needs CUDA inputs (got {x.device}); move the module to "
                                 "CUDA, set TRITON_INTERPRET=1 (slow, for tests) or use implementation='torch'")
            return "triton"
        return "triton" if fits and x.device.type == "cuda" and _triton_available() else "torch"

    def __getstate__(self) -> dict:
        # tinycudann modules hold native handles that cannot be pickled or deep-copied; they are rebuilt lazily
        state = self.__dict__.copy()
        state["_tcnn_modules"] = {}
        return state

    def _forward_tcnn(self, x: Tensor) -> Tensor:
        spec = importlib.util.find_spec("tinycudann")
        if spec is None:
            raise ValueError("implementation='tcnn' but tinycudann is not installed; install it with `pip install "
                             "git+https://github.com/NVlabs/tiny-cuda-nn/#subdirectory=bindings/torch` or use "
                             "implementation='auto'")
        if x.device.type != "cuda":
            raise ValueError(f"implementation='tcnn' needs CUDA inputs (got {x.device}); use implementation='auto'")
        from tinycudann.modules import _C, _module_function  # the autograd function behind tcnn.Encoding

        module = self._tcnn_modules.get(str(x.device))
        if module is None:
            module = self._tcnn_modules[str(x.device)] = self._build_tcnn(x.device)
        # Same steps as tcnn.Encoding.forward, but with our table: tinycudann's flat parameter vector is our
        # [entries, F] table in row-major order, so gradients land in `embeddings` (the only parameter).
        n = x.shape[0]
        granularity = int(_C.batch_size_granularity())
        padded = x if n % granularity == 0 else torch.nn.functional.pad(x, [0, 0, 0, granularity - n % granularity])
        out = _module_function.apply(module.native_tcnn_module, padded.contiguous(), self.embeddings.reshape(-1),
                                     module.loss_scale)
        out = out[:n, : self.n_output_dims].float()
        if self.n_active_levels < self.n_levels:
            keep = torch.arange(self.n_output_dims, device=x.device) < self.n_active_levels * self.n_features_per_level
            out = out * keep
        return out

    def _build_tcnn(self, device: torch.device) -> torch.nn.Module:
        import tinycudann as tcnn

        config = {"otype": "HashGrid", "n_levels": self.n_levels, "n_features_per_level": self.n_features_per_level,
                  "log2_hashmap_size": self.log2_hashmap_size, "base_resolution": self.base_resolution,
                  "per_level_scale": self.per_level_scale, "interpolation": "Linear"}
        with torch.cuda.device(device):
            module = tcnn.Encoding(self.n_input_dims, config, dtype=torch.float32)
        if module.params.numel() != self.embeddings.numel():
            raise ValueError(f"tinycudann allocates {module.params.numel()} parameters, ours {self.embeddings.numel()}:"
                             " this tinycudann version lays out HashGrid differently; use implementation='triton'")
        module.params = None  # its own copy of the table is never used
        return module


def _check_args(d, n_levels, f, log2_size, base_res, scale, implementation, init_scale) -> None:
    checks = [
        ("n_input_dims", d, isinstance(d, int) and 1 <= d <= len(HASH_PRIMES), "an int in [1, 7]"),
        ("n_levels", n_levels, isinstance(n_levels, int) and 1 <= n_levels <= 32, "an int in [1, 32]"),
        ("n_features_per_level", f, f in (1, 2, 4, 8), "1, 2, 4 or 8"),
        ("log2_hashmap_size", log2_size, isinstance(log2_size, int) and 3 <= log2_size <= 30, "an int in [3, 30]"),
        ("base_resolution", base_res, isinstance(base_res, int) and base_res >= 2, "an int >= 2"),
        ("per_level_scale", scale, isinstance(scale, (int, float)) and math.isfinite(scale) and scale >= 1.0,
         "a finite float >= 1"),
        ("implementation", implementation, implementation in _IMPLEMENTATIONS, f"one of {_IMPLEMENTATIONS}"),
        ("init_scale", init_scale, isinstance(init_scale, (int, float)) and init_scale >= 0, "a float >= 0"),
    ]
    for name, value, ok, allowed in checks:
        if not ok or isinstance(value, bool):
            raise ValueError(f"{name}={value!r} is not allowed: it must be {allowed}")


def _corner_bits(d: int, device: torch.device) -> Tensor:
    corner = torch.arange(2**d, device=device)
    return (corner[:, None] >> torch.arange(d, device=device)[None]) & 1


def _corner_index(corners: Tensor, resolution: int, size: int, dense: bool) -> Tensor:
    """Table row (within the level) of integer corners ``[..., D]`` (int64): dense stride index or uint32 hash."""
    d = corners.shape[-1]
    if dense:
        strides = torch.tensor([resolution**i for i in range(d)], device=corners.device)
        return (corners * strides).sum(-1) % size
    h = torch.zeros_like(corners[..., 0])
    for dim in range(d):
        h = h ^ ((corners[..., dim] * HASH_PRIMES[dim]) & 0xFFFFFFFF)  # uint32 product, kept exact in int64
    return h % size


def _triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:  # a broken install counts as absent: "auto" falls back to torch
        return False
    return True
