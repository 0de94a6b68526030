"""Work counters (samples, grid queries, normal queries) counted where the field's work is launched, with the numbers
derived by hand; the fused normal queries give the plain evaluation's normals and gradients."""

import math

import pytest
import torch

from animate124.core.field.dynamic_field import DynamicField
from animate124.core.field.hashgrid import HashGridEncoding
from animate124.core.field.work_counters import WorkCounts, count, counting
from animate124.core.render.volrend import render_rays

SMALL = dict(n_levels=4, log2_hashmap_size=10, base_resolution=4, per_level_scale=2.0, implementation="torch")
MODES = {  # geometry knobs of each way to evaluate the normals' density queries
    "plain": dict(normal_checkpoint=False),
    "checkpoint": dict(normal_checkpoint=True, normal_fused=False),
    "fused": dict(normal_checkpoint=True, normal_fused=True),
    "fused-keep": dict(normal_checkpoint=True, normal_fused=True, normal_keep_features_gb=1.0),
}


def make_field(difference="central", **kw):
    return DynamicField(**SMALL, normal_difference=difference, time_init_scale=0.1,
                        generator=torch.Generator().manual_seed(0), **kw)


def points_times(n, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, generator=g) * 1.6 - 0.8, torch.rand(n, generator=g)


def test_counts_only_inside_a_context_and_nested_contexts_collect_apart():
    count("rays", 5)  # no context: nothing kept anywhere
    assert not counting()
    with WorkCounts() as outer:
        count("rays", 2)
        with WorkCounts() as inner:
            assert counting()
            count("rays", 3)
        count("samples", 4)
    assert dict(outer.counts) == {"rays": 2, "samples": 4} and dict(inner.counts) == {"rays": 3}
    assert not counting()


def test_grid_counts_forward_points_and_backward_only_when_a_gradient_arrives():
    enc = HashGridEncoding(4, **SMALL, generator=torch.Generator().manual_seed(0))
    x = torch.rand(10, 3, 4)
    with WorkCounts() as wc:
        with torch.no_grad():
            enc(x)  # 30 points, no graph
        out = enc(x[0])  # 3 points, graph
        enc(x[1]).sum().backward()  # 3 points forward and backward
    assert dict(wc.counts) == {"grid4d_fwd": 36, "grid4d_bwd": 3}
    del out


@pytest.mark.parametrize("difference, k", [("central", 6), ("forward", 3)])
def test_field_counts_per_normal_mode(difference, k):
    """N samples with normals, one backward: the sample's own query (3-D and 4-D grid) plus k offset queries; a
    checkpointed or fused evaluation runs the offsets' grids again in the backward (the torch backend: also when
    their features are kept, since only the Triton kernels run a grid's backward alone)."""
    n = 37
    expected_fwd = {"plain": n + k * n, "checkpoint": n + 2 * k * n, "fused": n + 2 * k * n,
                    "fused-keep": n + 2 * k * n}
    for mode, knobs in MODES.items():
        field = make_field(difference, **knobs)
        p, t = points_times(n)
        with WorkCounts() as wc:
            out = field(p, t, output_normal=True)
            (out["normal"].sum() + out["density"].sum() + out["features"].sum()).backward()
        assert dict(wc.counts) == {"normal_samples": n, "normal_queries": k * n, "grid3d_fwd": expected_fwd[mode],
                                   "grid4d_fwd": expected_fwd[mode], "grid3d_bwd": n + k * n,
                                   "grid4d_bwd": n + k * n}, mode


@pytest.mark.parametrize("difference", ["central", "forward"])
def test_fused_normal_queries_give_the_plain_normals_and_gradients(difference):
    """Same values; same gradients up to float summation order, in every parameter (both grids, both MLPs); the
    points' k queries are evaluated in pieces of about N queries (k pieces here)."""
    n = 301
    results = {}
    for mode, knobs in MODES.items():
        field = make_field(difference, **knobs)
        with torch.no_grad():  # a field that varies in space and time, beyond the blob
            field.encoding.embeddings.normal_(0, 0.3, generator=torch.Generator().manual_seed(3))
            field.encoding_time.embeddings.normal_(0, 0.3, generator=torch.Generator().manual_seed(4))
        p, t = points_times(n)
        out = field(p, t, output_normal=True)
        weights = torch.linspace(-1, 1, 3 * n).view(n, 3)
        ((out["normal"] * weights).sum() + 0.1 * out["density"].sum() + out["features"].square().sum()).backward()
        results[mode] = (out["normal"].detach(), [q.grad.clone() for q in field.parameters()])
    ref_normal, ref_grads = results["plain"]
    assert all(g.abs().max() > 0 for g in ref_grads)
    for mode, (normal, grads) in results.items():
        torch.testing.assert_close(normal, ref_normal, rtol=0, atol=1e-6)
        for a, b in zip(grads, ref_grads):
            # forward differences divide a difference of nearby densities by eps: float32 rounding, amplified
            torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4 * float(b.abs().max()), msg=mode)


def test_fused_normal_queries_keep_no_activations_and_skip_frozen_grids():
    n = 500
    field = make_field(**MODES["fused"])
    field.encoding_time.embeddings.requires_grad_(False)  # a stage that freezes the 4-D grid
    p, t = points_times(n)
    saved = [0]

    def pack(x):
        saved[0] += x.numel() * x.element_size()
        return x

    with WorkCounts() as wc:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
            normal = field.normal(p, t)
        normal.sum().backward()
    # the queries' inputs (points, times, offsets) and the normalisation of the differences: less than one query's
    # grid features (128 bytes) per sample, where keeping the 6 queries' activations takes over 6 x 384 bytes
    assert 16 * n < saved[0] < 128 * n, saved[0] / n
    assert field.encoding_time.embeddings.grad is None and field.encoding.embeddings.grad.abs().max() > 0
    assert wc.counts["grid3d_bwd"] == 6 * n and wc.counts["grid4d_bwd"] == 0
    with pytest.raises(ValueError, match="normal_keep_features_gb must be >= 0"):
        make_field(normal_keep_features_gb=-1.0)


def test_render_counts_rays_marched_and_kept_samples():
    """Dense layout, a constant density sigma: every sample of a ray through the box is marched; the alpha threshold
    keeps those whose transmittance before them is >= 1e-4, i.e. sample i with exp(-sigma * delta * i) >= 1e-4:
    floor(ln(1e4) / (sigma delta)) + 1 of them."""
    sigma, n_samples = 30.0, 64
    rays_o = torch.tensor([[0.0, 0.0, -3.0], [0.3, -0.2, -3.0], [5.0, 5.0, -3.0]])  # the last one misses the box
    rays_d = torch.tensor([[0.0, 0.0, 1.0]] * 3)

    def field_fn(points, times, output_normal):
        return {"density": torch.full((points.shape[0], 1), sigma), "features": torch.zeros(points.shape[0], 3)}

    for alpha_thre in (0.0, 0.01):
        with WorkCounts() as wc:
            render_rays(field_fn, rays_o, rays_d, torch.zeros(3), num_samples=n_samples, aabb=(-1, -1, -1, 1, 1, 1),
                        alpha_thre=alpha_thre)
        delta = 2.0 / n_samples
        kept = 2 * (math.floor(math.log(1e4) / (sigma * delta)) + 1) if alpha_thre else 2 * n_samples
        assert kept == (2 * 10 if alpha_thre else 128)
        assert dict(wc.counts) == {"rays": 3, "samples_marched": 2 * n_samples, "samples": kept}, alpha_thre
