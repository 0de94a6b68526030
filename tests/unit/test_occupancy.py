"""TimeOccupancyGrid (a Gaussian blob moving from A to B): space occupied at any time survives the updates; a
single-time grid would prune it."""

import math

import pytest
import torch
from checks import bad_input

from animate124.core.field.occupancy import TimeOccupancyGrid
from animate124.core.render.volrend import render_rays

AABB = (-1.0, -1.0, -1.0, 1.0, 1.0, 1.0)
SIGMA, STD = 10.0, 0.08  # Gaussian blob: sigma(x, t) = SIGMA exp(-|x - c(t)|^2 / (2 STD^2))
A, B = -0.5, 0.5  # sphere centre x at t = 0 (place A) and t = 1 (place B)
STEP = 2 * math.sqrt(3) / 256  # threestudio's render_step_size for 256 samples, radius 1


def centre_x(t):
    return A + (B - A) * t


def sphere_density(points, times):
    c = torch.stack([centre_x(times), torch.zeros_like(times), torch.zeros_like(times)], dim=-1)
    return SIGMA * torch.exp(-(points - c).square().sum(-1) / (2 * STD**2))


def field_fn(points, times, output_normal=False):
    return {"density": sphere_density(points, times)[:, None], "rgb": torch.ones(points.shape[0], 3, device=points.device)}


def closed_opacity(offset):
    """Line integral of the blob along a ray at distance b from its centre: SIGMA exp(-b^2 / (2 STD^2)) STD sqrt(2 pi)
    (the AABB cuts the Gaussian at > 30 STD, negligible)."""
    return 1.0 - math.exp(-SIGMA * math.exp(-(offset**2) / (2 * STD**2)) * STD * math.sqrt(2 * math.pi))


def rays(xs, offsets):
    o = torch.tensor([[x, b, -3.0] for x, b in zip(xs, offsets)])
    return o, torch.tensor([0.0, 0.0, 1.0]).expand(len(xs), 3).contiguous()


def updated_grid(density_fn, n_updates=8, seed=0, **kw):
    grid = TimeOccupancyGrid(AABB, resolution=16, implementation="torch", **kw)
    g = torch.Generator().manual_seed(seed)
    for step in range(n_updates):
        assert grid.update(step, density_fn, step_size=STEP, n=1, warmup_steps=4, generator=g)
    return grid


def test_object_at_a_then_b_renders_at_both_times_and_a_single_time_grid_prunes_b():
    # Rays through A at t = 0 and through B at t = 1 (centre and off-centre), plus the same places at the other time.
    o, d = rays([A, A, B, B, A, B], [0.0, 0.1, 0.0, 0.1, 0.0, 0.0])
    t = torch.tensor([0.0, 0.0, 1.0, 1.0, 1.0, 0.0])
    expected = torch.tensor([closed_opacity(0.0), closed_opacity(0.1)] * 2 + [0.0, 0.0])
    sliced = updated_grid(sphere_density, n_time_slices=8, n_times_per_update=2)
    maxed = updated_grid(sphere_density, n_time_slices=1, n_times_per_update=8)  # one grid, max over 8 times
    for grid in (sliced, maxed):
        out = render_rays(field_fn, o, d, t, num_samples=1024, estimator=grid)
        torch.testing.assert_close(out.opacity[:, 0], expected, atol=5e-3, rtol=0)
        full = render_rays(field_fn, o, d, t, num_samples=1024, aabb=AABB)
        assert out.points.shape[0] < 0.3 * full.points.shape[0]  # empty space really is skipped
    # per-slice grids hold only where the blob is during their interval; the single max grid holds the whole path
    assert sliced.binaries.float().mean() < 0.6 * maxed.binaries.float().mean()

    # Upstream behaviour: one grid refreshed at one time (here t = 0 every update) keeps A and prunes B.
    single = updated_grid(lambda p, _t: sphere_density(p, torch.zeros_like(_t)), n_time_slices=1,
                          n_times_per_update=1)
    out = render_rays(field_fn, o, d, t, num_samples=1024, estimator=single)
    assert abs(out.opacity[0, 0].item() - expected[0].item()) < 5e-3
    assert out.opacity[2, 0].item() < 1e-6 and out.opacity[3, 0].item() < 1e-6  # B at t = 1 lost


def test_each_slice_keeps_only_what_its_times_occupy():
    grid = updated_grid(sphere_density, n_time_slices=4, n_times_per_update=2)
    centre = torch.tensor([[A, 0.0, 0.0], [B, 0.0, 0.0]])
    occ = {k: grid.occupied(centre, torch.full((2,), (k + 0.5) / 4)).tolist() for k in range(4)}
    # slice 0 covers t in [0, 0.25): centre x in [-0.5, -0.25] -> A occupied, B not; slice 3 the reverse
    assert occ[0] == [True, False] and occ[3] == [False, True]
    assert grid.slice_index(torch.tensor([0.0, 0.2499, 0.25, 0.99, 1.0])).tolist() == [0, 0, 1, 3, 3]


def test_update_schedule_ema_and_threshold():
    grid = TimeOccupancyGrid(AABB, resolution=4, n_time_slices=1, n_times_per_update=1, implementation="torch")
    assert grid.binaries.all()  # starts all-occupied: nothing skipped before the first update
    const = lambda p, t: torch.full((p.shape[0],), 10.0)  # noqa: E731
    assert not grid.update(3, const, step_size=0.1, n=16)
    assert grid.update(16, const, step_size=0.1, n=16, warmup_steps=256)
    torch.testing.assert_close(grid.occs, torch.full((1, 64), 1.0))  # occ = density * step = 1
    zero = lambda p, t: torch.zeros(p.shape[0])  # noqa: E731
    grid.update(32, zero, step_size=0.1, n=16, ema_decay=0.5)
    torch.testing.assert_close(grid.occs, torch.full((1, 64), 0.5))  # max(0.5 * 1, 0)
    assert grid.binaries.all()  # 0.5 > min(mean 0.5, 0.01)


def test_state_dict_round_trip_and_validation():
    grid = updated_grid(sphere_density, n_updates=2, n_time_slices=2)
    state = grid.state_dict()
    assert sorted(state) == ["aabb", "binaries", "occs"]  # grid_coords is derived, not persistent
    fresh = TimeOccupancyGrid(AABB, resolution=16, n_time_slices=2, implementation="torch")
    fresh.load_state_dict(state)
    assert torch.equal(fresh.binaries, grid.binaries)
    with bad_input("implementation must be one of"):
        TimeOccupancyGrid(AABB, implementation="cuda")
    with bad_input("aabb"):
        TimeOccupancyGrid((1, 1, 1, 0, 0, 0))


@pytest.mark.gpu
def test_nerfacc_marching_matches_closed_form_on_cuda():
    if not torch.cuda.is_available():
        pytest.skip("torch.cuda.is_available() is False: nerfacc ray marching needs CUDA")
    o, d = rays([A, A, B, B, A, B], [0.0, 0.1, 0.0, 0.1, 0.0, 0.0])
    o, d = o.cuda(), d.cuda()
    t = torch.tensor([0.0, 0.0, 1.0, 1.0, 1.0, 0.0], device="cuda")
    expected = torch.tensor([closed_opacity(0.0), closed_opacity(0.1)] * 2 + [0.0, 0.0], device="cuda")
    grid = TimeOccupancyGrid(AABB, resolution=16, n_time_slices=8, implementation="nerfacc").cuda()
    g = torch.Generator(device="cuda").manual_seed(0)
    for step in range(8):
        grid.update(step, sphere_density, step_size=STEP, n=1, warmup_steps=4, generator=g)
    assert grid.uses_nerfacc(o.device)
    # step = diagonal / num_samples = 2 sqrt(3) / 4096 ~ 8.5e-4
    # alpha_thre drops the blob's far tails (alpha < min(thre, mean occs)), hence the looser tolerance
    outs = {}
    for alpha_thre, atol in ((0.0, 5e-3), (1e-4, 1e-2)):
        outs[alpha_thre] = out = render_rays(field_fn, o, d, t, num_samples=4096, estimator=grid,
                                             alpha_thre=alpha_thre, randomized=True, generator=g)
        torch.testing.assert_close(out.opacity[:, 0], expected, atol=atol, rtol=0)
        assert bool((out.ray_indices[1:] >= out.ray_indices[:-1]).all())  # packed layout sorted by ray
    dense = render_rays(field_fn, o, d, t, num_samples=1024, aabb=AABB)
    torch.testing.assert_close(outs[0.0].depth, dense.depth, atol=1e-2, rtol=0)
    with bad_input("implementation='torch'"):
        render_rays(field_fn, o.cpu(), d.cpu(), t.cpu(), num_samples=64,
                    estimator=TimeOccupancyGrid(AABB, implementation="nerfacc"))
