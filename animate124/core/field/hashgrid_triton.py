"""Triton kernels for the hash-grid encoding, D = 1 to 4: forward, and backward into the embeddings and the points.

Same semantics as ``hashgrid.hash_grid_encode_torch`` (tiny-cuda-nn ``HashGrid``, see ``hashgrid``'s docstring).
Launch grid ``(cdiv(N, BLOCK), n_active_levels)``: one program encodes BLOCK points at one level, so the programs
of one level run together and that level's table stays in L2 (tiny-cuda-nn's scheme). Each program computes the
cell and fractions of its points, then for each of the ``2**D`` corners the table row (dense stride index or uint32
spatial hash), gathers the F features of the row as one vector and accumulates ``weight * value``; the result goes
straight into the ``[N, L * F]`` output. The backward pass recomputes rows and weights and scatters
``weight * dL/dout`` into an fp32 gradient table with relaxed atomic adds. On the coarse levels
(``KernelConfig.merge_runs_max_res``) it first sums each run of consecutive points with the same row (a segmented
scan over the block) and adds the run with one atomic: samples of a ray follow each other in memory and share the
coarse cells, and their atomic adds on one address queue. On an H200, 3.2 M ray-marched 4-D samples: backward 12.5
to 7.8 ms; on the same samples shuffled or on uniform points, unchanged (``benchmarks/hashgrid_backward.py``).

When the points require a gradient, the same backward kernel also gathers the corner values and adds
``dL/dx_d = scale * sum_corners (dL/dout . value) * dweight/dpos_d`` over the levels (analytic normals); it costs
one more gather per corner, so it runs only when asked. Runs on CPU tensors under ``TRITON_INTERPRET=1`` (tests).

Importing this module imports triton; ``hashgrid`` imports it only when the Triton backend is used.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl
from jaxtyping import Float
from torch import Tensor

from animate124.core.field.grid_levels import MERGE_RUNS_MAX_RES, HashGridLevels, level_table
from animate124.core.field.work_counters import count

__all__ = ["hash_grid_encode_triton", "embedding_grad_triton", "KernelConfig", "DEFAULT_CONFIG", "MAX_DIMS"]

MAX_DIMS = 4


class KernelConfig(NamedTuple):
    """Points per program and warps per program, for the forward and the backward kernel; and the levels whose
    embedding gradients are summed over runs of consecutive points before the atomic add."""

    block_fwd: int = 256
    warps_fwd: int = 4
    block_bwd: int = 256
    warps_bwd: int = 4
    merge_runs_max_res: int = MERGE_RUNS_MAX_RES
    """Levels of resolution <= this sum each run of consecutive points with the same table row in registers and
    add it with one atomic (0: off). Samples along a ray share the cells of coarse levels, so their atomic adds
    otherwise queue on the same addresses."""


DEFAULT_CONFIG = KernelConfig()  # `python benchmarks/hashgrid_speed.py --sweep` times the alternatives


def hash_grid_encode_triton(
    x: Float[Tensor, "N D"],
    embeddings: Float[Tensor, "E F"],
    levels: HashGridLevels,
    n_active_levels: int,
    table: Tensor | None = None,
    config: KernelConfig = DEFAULT_CONFIG,
) -> Float[Tensor, "N LF"]:
    """Hash-grid encoding with the Triton kernels; differentiable in ``embeddings`` and in ``x``.

    Args:
        x: points in ``[0, 1]^D``, float32 (clamp beforehand), D in 1..4.
        embeddings: stacked per-level tables, float32 ``[E, F]``, F in (1, 2, 4, 8).
        levels: layout from ``hashgrid.hash_grid_levels``.
        n_active_levels: levels at or above it output zeros and get no gradient.
        table: ``level_table(levels)`` on x's device (built here when None).
        config: block sizes and warps (``KernelConfig``).
    Returns:
        ``[N, L * F]`` float32.
    """
    _check_inputs(x, embeddings, levels)
    if table is None:
        table = level_table(levels, x.device)
    return _HashGridFunction.apply(x.contiguous(), embeddings, table, len(levels.resolutions), n_active_levels,
                                   tuple(config))


def embedding_grad_triton(
    x: Float[Tensor, "N D"],
    grad_out: Float[Tensor, "N LF"],
    embeddings: Float[Tensor, "E F"],
    levels: HashGridLevels,
    n_active_levels: int,
    table: Tensor | None = None,
    config: KernelConfig = DEFAULT_CONFIG,
    out: Tensor | None = None,
) -> Float[Tensor, "E F"]:
    """The embeddings' gradient of ``sum(grad_out * encode(x))``: the backward kernel alone (the forward is not run).
    Arguments as :func:`hash_grid_encode_triton`; ``out``: a contiguous float32 table like ``embeddings`` that the
    kernel adds the gradient to (returned), instead of a new one."""
    _check_inputs(x, embeddings, levels)
    if table is None:
        table = level_table(levels, x.device)
    if out is not None and (out.shape != embeddings.shape or out.dtype != torch.float32 or not out.is_contiguous()):
        raise ValueError(f"out must be a contiguous float32 table of shape {tuple(embeddings.shape)}")
    return _backward(x.contiguous(), grad_out, embeddings.contiguous(), table, n_active_levels, tuple(config),
                     need_dx=False, need_demb=True, grad_emb=out)[1]


class _HashGridFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, embeddings, table, n_levels, n_active, config):
        n, d = x.shape
        f = embeddings.shape[1]
        embeddings = embeddings.contiguous()
        alloc = torch.empty if n_active == n_levels else torch.zeros
        out = alloc(n, n_levels * f, device=x.device, dtype=torch.float32)
        if n > 0 and n_active > 0:
            block, warps = config[0], config[1]
            count("triton_launches")
            _hashgrid_fwd_kernel[(triton.cdiv(n, block), n_active)](
                x, embeddings, out, table, n, D=d, F=f, LF=n_levels * f, BLOCK=block, num_warps=warps)
        ctx.save_for_backward(x, embeddings, table)
        ctx.meta = (n_active, config)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, embeddings, table = ctx.saved_tensors
        n_active, config = ctx.meta
        grad_x, grad_emb = _backward(x, grad_out, embeddings, table, n_active, config,
                                     need_dx=ctx.needs_input_grad[0], need_demb=ctx.needs_input_grad[1])
        return grad_x, grad_emb, None, None, None, None


def _backward(x, grad_out, embeddings, table, n_active, config, *, need_dx, need_demb, grad_emb=None):
    """(dL/dx or None, dL/dembeddings or None) from the backward kernel, levels below ``n_active`` only; the
    embeddings' gradient is added to ``grad_emb`` when given."""
    grad_x = torch.zeros_like(x) if need_dx else None
    if need_demb and grad_emb is None:
        grad_emb = torch.zeros_like(embeddings)
    n, d = x.shape
    if n > 0 and n_active > 0 and (need_dx or need_demb):
        block, warps, merge_max_res = config[2], config[3], config[4]
        dummy = x.new_empty(1)
        count("triton_launches")
        _hashgrid_bwd_kernel[(triton.cdiv(n, block), n_active)](
            x, grad_out.contiguous().float(), embeddings, grad_emb if need_demb else dummy,
            grad_x if need_dx else dummy, table, n, merge_max_res, D=d, F=embeddings.shape[1],
            LF=grad_out.shape[1], NEED_DEMB=need_demb, NEED_DX=need_dx, MERGE=merge_max_res > 0 and need_demb,
            BLOCK=block, num_warps=warps)
    return grad_x, grad_emb


def _check_inputs(x: Tensor, embeddings: Tensor, levels: HashGridLevels) -> None:
    if x.ndim != 2 or not 1 <= x.shape[1] <= MAX_DIMS:
        raise ValueError(f"x has shape {tuple(x.shape)}; the Triton hash grid takes [N, D] with D in 1..{MAX_DIMS}: "
                         "use implementation='torch' for more dimensions")
    if x.dtype != torch.float32 or embeddings.dtype != torch.float32:
        raise ValueError(f"x ({x.dtype}) and embeddings ({embeddings.dtype}) must be float32 for the Triton hash grid;"
                         " keep the encoding in float32 (do not call .half() on it)")
    if levels.offsets[-1] * embeddings.shape[1] >= 2**31 or x.numel() >= 2**31:
        raise ValueError(f"table of {levels.offsets[-1]} x {embeddings.shape[1]} entries or {x.shape[0]} points too "
                         "large for int32 indexing; lower log2_hashmap_size or split the points")
    if x.device != embeddings.device:
        raise ValueError(f"x is on {x.device} but embeddings on {embeddings.device}; move them to one device")


@triton.jit
def _load_level(table_ptr, level):
    row = table_ptr + level * 5
    scale = tl.load(row).to(tl.float32, bitcast=True)
    res = tl.load(row + 1).to(tl.uint32)
    size = tl.load(row + 2).to(tl.uint32)
    offset = tl.load(row + 3)
    dense = tl.load(row + 4) != 0
    return scale, res, size, offset, dense


@triton.jit
def _cell(x_ptr, rows, rmask, dim: tl.constexpr, D: tl.constexpr, scale):
    """Cell coordinate (uint32) and fraction of coordinate ``dim`` (zero for dims the input does not have)."""
    if dim < D:
        xv = tl.load(x_ptr + rows * D + dim, mask=rmask, other=0.0)
        pos = tl.fma(xv, scale, 0.5)
        floor = tl.floor(pos)
        return floor.to(tl.int32).to(tl.uint32), pos - floor
    else:
        zero = tl.zeros_like(rows)
        return zero.to(tl.uint32), zero.to(tl.float32)


@triton.jit
def _corner_row(i0, i1, i2, i3, f0, f1, f2, f3, corner: tl.constexpr, D: tl.constexpr, res, size, dense):
    """Table row within the level and interpolation weight of corner ``corner`` (bit d = upper side of dim d)."""
    # 1. Corner coordinates and the weight, multiplied in dimension order like tiny-cuda-nn.
    c0 = i0 + (corner & 1)
    c1 = i1 + ((corner >> 1) & 1)
    c2 = i2 + ((corner >> 2) & 1)
    c3 = i3 + ((corner >> 3) & 1)
    w0, w1, w2, w3 = _corner_factors(f0, f1, f2, f3, corner, D)
    w = w0 * w1 * w2 * w3  # factors of missing dimensions are 1 (folded away)
    # 2. Dense stride index (used when the level fits its table; it can exceed it by < size through the +0.5
    #    offset, so one conditional subtraction is the modulo) and the uint32 spatial hash (size is 2**k then).
    lin = c0
    hashed = c0
    if D > 1:
        lin = lin + c1 * res
        hashed = hashed ^ (c1 * 2654435761)
    if D > 2:
        lin = lin + c2 * (res * res)
        hashed = hashed ^ (c2 * 805459861)
    if D > 3:
        lin = lin + c3 * (res * res * res)
        hashed = hashed ^ (c3 * 3674653429)
    lin = tl.where(lin >= size, lin - size, lin)
    row = tl.where(dense, lin, hashed & (size - 1))
    return row.to(tl.int32), w


@triton.jit
def _hashgrid_fwd_kernel(x_ptr, emb_ptr, out_ptr, table_ptr, N,
                         D: tl.constexpr, F: tl.constexpr, LF: tl.constexpr, BLOCK: tl.constexpr):
    level = tl.program_id(1)
    rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    rmask = rows < N
    feats = tl.arange(0, F)
    scale, res, size, offset, dense = _load_level(table_ptr, level)
    i0, f0 = _cell(x_ptr, rows, rmask, 0, D, scale)
    i1, f1 = _cell(x_ptr, rows, rmask, 1, D, scale)
    i2, f2 = _cell(x_ptr, rows, rmask, 2, D, scale)
    i3, f3 = _cell(x_ptr, rows, rmask, 3, D, scale)
    acc = tl.zeros((BLOCK, F), dtype=tl.float32)
    for corner in tl.static_range(2**D):
        row, w = _corner_row(i0, i1, i2, i3, f0, f1, f2, f3, corner, D, res, size, dense)
        # Masked-out points were loaded as x = 0, so their rows are valid: the gather needs no mask.
        vals = tl.load(emb_ptr + ((offset + row) * F)[:, None] + feats[None, :])
        acc += w[:, None] * vals
    out_ptrs = out_ptr + (rows.to(tl.int64) * LF + level * F)[:, None] + feats[None, :]
    tl.store(out_ptrs, acc, mask=rmask[:, None])


@triton.jit
def _hashgrid_bwd_kernel(x_ptr, gout_ptr, emb_ptr, gemb_ptr, gx_ptr, table_ptr, N, merge_max_res,
                         D: tl.constexpr, F: tl.constexpr, LF: tl.constexpr, NEED_DEMB: tl.constexpr,
                         NEED_DX: tl.constexpr, MERGE: tl.constexpr, BLOCK: tl.constexpr):
    level = tl.program_id(1)
    rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    rmask = rows < N
    feats = tl.arange(0, F)
    scale, res, size, offset, dense = _load_level(table_ptr, level)
    i0, f0 = _cell(x_ptr, rows, rmask, 0, D, scale)
    i1, f1 = _cell(x_ptr, rows, rmask, 1, D, scale)
    i2, f2 = _cell(x_ptr, rows, rmask, 2, D, scale)
    i3, f3 = _cell(x_ptr, rows, rmask, 3, D, scale)
    gout_ptrs = gout_ptr + (rows.to(tl.int64) * LF + level * F)[:, None] + feats[None, :]
    g = tl.load(gout_ptrs, mask=rmask[:, None], other=0.0)
    merge = res.to(tl.int32) <= merge_max_res  # only read when MERGE
    lane = tl.arange(0, BLOCK)
    lane_next = tl.minimum(lane + 1, BLOCK - 1)
    lane_prev = tl.maximum(lane - 1, 0)
    dx0 = tl.zeros_like(f0)
    dx1 = tl.zeros_like(f0)
    dx2 = tl.zeros_like(f0)
    dx3 = tl.zeros_like(f0)
    for corner in tl.static_range(2**D):
        row, w = _corner_row(i0, i1, i2, i3, f0, f1, f2, f3, corner, D, res, size, dense)
        ptrs = ((offset + row) * F)[:, None] + feats[None, :]
        if NEED_DEMB:
            # No mask: masked-out points have valid rows (x = 0) and g = 0, and a mask would branch around every add.
            if MERGE:
                if merge:
                    # One atomic per run of equal rows: a segmented sum over the block, added at each run's last point.
                    starts = (row != tl.gather(row, lane_prev, 0)) | (lane == 0)
                    ends = (row != tl.gather(row, lane_next, 0)) | (lane == BLOCK - 1)
                    flags = (starts[:, None] & (feats[None, :] >= 0)).to(tl.int32)
                    _, run_sums = tl.associative_scan((flags, w[:, None] * g), 0, _segmented_add)
                    tl.atomic_add(gemb_ptr + ptrs, run_sums, mask=ends[:, None], sem="relaxed")
                else:
                    tl.atomic_add(gemb_ptr + ptrs, w[:, None] * g, sem="relaxed")
            else:
                tl.atomic_add(gemb_ptr + ptrs, w[:, None] * g, sem="relaxed")
        if NEED_DX:
            # d out / d pos_d = (+1 upper side, -1 lower side of dim d) * product of the other dims' weights.
            gv = tl.sum(tl.load(emb_ptr + ptrs) * g, axis=1)
            w0, w1, w2, w3 = _corner_factors(f0, f1, f2, f3, corner, D)
            s0 = 1.0 if (corner & 1) else -1.0
            s1 = 1.0 if ((corner >> 1) & 1) else -1.0
            s2 = 1.0 if ((corner >> 2) & 1) else -1.0
            s3 = 1.0 if ((corner >> 3) & 1) else -1.0
            dx0 += gv * (s0 * w1 * w2 * w3)
            dx1 += gv * (s1 * w0 * w2 * w3)
            dx2 += gv * (s2 * w0 * w1 * w3)
            dx3 += gv * (s3 * w0 * w1 * w2)
    if NEED_DX:  # d pos / d x = scale; the levels add up through atomics
        _add_dx(gx_ptr, rows, rmask, 0, D, dx0 * scale)
        _add_dx(gx_ptr, rows, rmask, 1, D, dx1 * scale)
        _add_dx(gx_ptr, rows, rmask, 2, D, dx2 * scale)
        _add_dx(gx_ptr, rows, rmask, 3, D, dx3 * scale)


@triton.jit
def _segmented_add(flag_a, value_a, flag_b, value_b):
    """Combine of a segmented inclusive sum: a flag marks the first element of a segment."""
    return flag_a | flag_b, tl.where(flag_b != 0, value_b, value_a + value_b)


@triton.jit
def _corner_factors(f0, f1, f2, f3, corner: tl.constexpr, D: tl.constexpr):
    """Per-dimension weight factors of a corner; dimensions the input lacks give 1."""
    w0 = f0 if (corner & 1) else 1.0 - f0
    w1 = tl.full(f0.shape, 1.0, tl.float32)
    w2 = tl.full(f0.shape, 1.0, tl.float32)
    w3 = tl.full(f0.shape, 1.0, tl.float32)
    if D > 1:
        w1 = f1 if ((corner >> 1) & 1) else 1.0 - f1
    if D > 2:
        w2 = f2 if ((corner >> 2) & 1) else 1.0 - f2
    if D > 3:
        w3 = f3 if ((corner >> 3) & 1) else 1.0 - f3
    return w0, w1, w2, w3


@triton.jit
def _add_dx(gx_ptr, rows, rmask, dim: tl.constexpr, D: tl.constexpr, value):
    if dim < D:
        tl.atomic_add(gx_ptr + rows * D + dim, value, mask=rmask, sem="relaxed")
