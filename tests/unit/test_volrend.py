"""render_rays against closed forms: hand-computed quadrature, an analytic moving sphere at several times."""

import math

import pytest
import torch
from checks import bad_input

from animate124.core.render.volrend import RenderOutput, ray_aabb_intersect, render_rays, stratified_samples

AABB = (-1.0, -1.0, -1.0, 1.0, 1.0, 1.0)
SIGMA, RADIUS = 3.0, 0.3  # density inside the sphere, sphere radius (world units)
COLOUR = torch.tensor([0.2, 0.5, 0.9])


def centre(t: torch.Tensor) -> torch.Tensor:
    """Sphere centre at time t: moves along x from -0.4 (t=0) to +0.4 (t=1)."""
    return torch.stack([-0.4 + 0.8 * t, torch.zeros_like(t), torch.zeros_like(t)], dim=-1)


def moving_sphere(points, times, output_normal=False):
    d = points - centre(times)
    inside = d.norm(dim=-1, keepdim=True) < RADIUS
    out = {"density": SIGMA * inside.to(points), "rgb": COLOUR.to(points).expand(points.shape[0], 3)}
    if output_normal:
        out["normal"] = torch.nn.functional.normalize(d, dim=-1)  # outward
    return out


def closed_form(offset: float, start: float):
    """Opacity and (un-normalised) depth of a ray at distance ``offset`` from the centre, starting ``start`` before
    the centre's plane: chord L = 2 sqrt(r^2 - b^2), entry a = start - L/2,
    opacity = 1 - exp(-sigma L), depth = int_a^{a+L} s sigma exp(-sigma (s - a)) ds
          = (1 - e^{-sigma L}) (a + 1/sigma) - L e^{-sigma L}."""
    chord = 2.0 * math.sqrt(max(RADIUS**2 - offset**2, 0.0))
    a = start - chord / 2
    e = math.exp(-SIGMA * chord)
    return 1.0 - e, (1.0 - e) * (a + 1.0 / SIGMA) - chord * e


def rays_at(times, offsets):
    """Rays along +z starting at z = -3, shifted by ``offset`` in y from the sphere's centre at that time."""
    t = torch.tensor(times)
    o = centre(t) + torch.stack([torch.zeros_like(t), torch.tensor(offsets), torch.full_like(t, -3.0)], dim=-1)
    d = torch.tensor([0.0, 0.0, 1.0]).expand(len(times), 3).contiguous()
    return o, d, t


def test_two_sample_quadrature_by_hand():
    # One ray, near 0, far 2, S = 2: samples at z = 0.5, 1.5 with intervals [0,1], [1,2]; sigma = 0.4 then 0.8.
    # w0 = 1 - e^-0.4 = 0.329680; w1 = e^-0.4 (1 - e^-0.8) = 0.369106; opacity = 0.698786;
    # depth = 0.5 w0 + 1.5 w1 = 0.718499; rgb = w0 * red + w1 * green.
    def field(points, times, output_normal=False):
        z = points[:, 2]
        density = torch.where(z < 1.0, 0.4, 0.8)[:, None]
        rgb = torch.where(z[:, None] < 1.0, torch.tensor([1.0, 0, 0]), torch.tensor([0, 1.0, 0]))
        return {"density": density, "rgb": rgb}

    out = render_rays(field, torch.zeros(1, 3), torch.tensor([[0.0, 0, 1]]), torch.zeros(1), num_samples=2,
                      near=0.0, far=2.0, bg_color=torch.tensor([0.0, 0.0, 1.0]))
    w0, w1 = 1 - math.exp(-0.4), math.exp(-0.4) * (1 - math.exp(-0.8))
    torch.testing.assert_close(out.weights[:, 0], torch.tensor([w0, w1]))
    torch.testing.assert_close(out.opacity, torch.tensor([[w0 + w1]]))
    torch.testing.assert_close(out.depth, torch.tensor([[0.5 * w0 + 1.5 * w1]]))
    torch.testing.assert_close(out.comp_rgb_fg, torch.tensor([[w0, w1, 0.0]]))
    torch.testing.assert_close(out.comp_rgb, torch.tensor([[w0, w1, 1.0 - w0 - w1]]))  # fg + bg (1 - opacity)
    # z_variance (HiFA): normalised weights, opacity 0.70 > 0.5 so not masked
    wn = torch.tensor([w0, w1]) / (w0 + w1)
    zm = (wn * torch.tensor([0.5, 1.5])).sum()
    torch.testing.assert_close(out.z_variance, (wn * (torch.tensor([0.5, 1.5]) - zm) ** 2).sum().reshape(1, 1))


@pytest.mark.parametrize("randomized,atol", [(False, 4e-3), (True, 1e-2)])
def test_moving_sphere_closed_form_at_several_times(randomized, atol):
    times = [0.0, 0.0, 0.3, 0.3, 0.7, 0.7, 1.0, 1.0, 0.5]
    offsets = [0.0, 0.2, 0.0, 0.1, 0.0, 0.25, 0.0, 0.15, 0.05]
    o, d, t = rays_at(times, offsets)
    g = torch.Generator().manual_seed(0)
    out = render_rays(moving_sphere, o, d, t, num_samples=2048, aabb=AABB, randomized=randomized, generator=g)
    expected = torch.tensor([closed_form(b, 3.0) for b in offsets])
    torch.testing.assert_close(out.opacity[:, 0], expected[:, 0], atol=atol, rtol=0)
    torch.testing.assert_close(out.depth[:, 0], expected[:, 1], atol=atol, rtol=0)
    torch.testing.assert_close(out.comp_rgb_fg, expected[:, :1] * COLOUR, atol=atol, rtol=0)


def test_each_ray_uses_its_own_time():
    # The same ray (through the t=0 centre) at t=0 hits the sphere and at t=1 misses it (centre moved by 0.8 > 2r).
    o, d, _ = rays_at([0.0, 0.0], [0.0, 0.0])
    out = render_rays(moving_sphere, o, d, torch.tensor([0.0, 1.0]), num_samples=1024, aabb=AABB)
    assert abs(out.opacity[0, 0].item() - closed_form(0.0, 3.0)[0]) < 4e-3
    assert out.opacity[1, 0].item() == 0.0


def test_comp_normal_convention_and_outputs():
    o, d, t = rays_at([0.2], [0.0])
    out = render_rays(moving_sphere, o, d, t, num_samples=1024, aabb=AABB, return_normal=True)
    # Front of the sphere faces -z: comp_normal = ((normalize(sum w n) + 1) / 2) * opacity ~ (0.5, 0.5, 0) * opacity
    n = torch.nn.functional.normalize((out.weights * out.normal).sum(0), dim=-1)
    assert n[2].item() < -0.99
    torch.testing.assert_close(out.comp_normal[0], (n + 1) / 2 * out.opacity[0])
    keys = set(out.to_dict())
    assert {"comp_rgb", "comp_rgb_fg", "opacity", "depth", "z_variance", "comp_normal", "weights"} <= keys
    assert isinstance(out, RenderOutput)


def test_gradients_flow_to_the_field():
    w = torch.tensor(2.0, requires_grad=True)

    def field(points, times, output_normal=False):
        inside = (points.norm(dim=-1, keepdim=True) < 0.5).float()
        return {"density": w * inside, "rgb": torch.ones(points.shape[0], 3, device=points.device)}

    o = torch.tensor([[0.0, 0.0, -3.0]])
    out = render_rays(field, o, torch.tensor([[0.0, 0, 1]]), torch.zeros(1), num_samples=1000, aabb=AABB)
    out.opacity.sum().backward()
    # d/dw (1 - exp(-w L)) = L exp(-w L), L = 1
    assert abs(w.grad.item() - math.exp(-2.0)) < 5e-3


def test_alpha_threshold_skips_empty_and_occluded_samples_with_the_same_image():
    # An opaque sphere (sigma 60): behind its front ~0.15 units the transmittance is below 1e-4, so with alpha_thre
    # the gradient pass evaluates only the samples in front of that (nerfacc / upstream threestudio's pruning).
    def opaque(points, times, output_normal=False):
        out = moving_sphere(points, times, output_normal)
        return {**out, "density": out["density"] * 20.0}

    queried = []

    def density_fn(points, times):
        queried.append(points.shape[0])
        return opaque(points, times)["density"]

    o, d, t = rays_at([0.0, 0.3, 0.7, 1.0], [0.0, 0.1, 0.25, 0.5])  # the last ray misses
    full = render_rays(opaque, o, d, t, num_samples=1024, aabb=AABB)
    pruned = render_rays(opaque, o, d, t, num_samples=1024, aabb=AABB, alpha_thre=0.01, density_fn=density_fn)
    assert queried == [4 * 1024]  # one query per sample, without gradient
    assert full.weights.shape[0] == 4 * 1024
    # ray 0: chord 0.6 (~307 samples inside), kept only until T < 1e-4, i.e. ~9.2 / 60 = 0.15 units (~79 samples)
    kept = torch.bincount(pruned.ray_indices, minlength=4)
    assert 60 <= kept[0] <= 100 and kept[3] == 0, kept
    # what is dropped carries at most the 1e-4 of transmittance left: 1e-4 of opacity, 1e-4 x (depth ~3) of depth
    for key, atol in (("opacity", 1.5e-4), ("comp_rgb", 1.5e-4), ("depth", 4e-4)):
        torch.testing.assert_close(getattr(pruned, key), getattr(full, key), atol=atol, rtol=0)
    # the default density query is the field's own
    again = render_rays(opaque, o, d, t, num_samples=1024, aabb=AABB, alpha_thre=0.01)
    assert torch.equal(again.opacity, pruned.opacity)


def test_ray_aabb_intersect_and_misses():
    o = torch.tensor([[0.0, 0.0, -3.0], [0.0, 5.0, -3.0], [0.0, 0.0, 0.0]])
    d = torch.tensor([[0.0, 0.0, 1.0], [0.0, 0.0, 1.0], [1.0, 0.0, 0.0]])
    t0, t1, hit = ray_aabb_intersect(o, d, torch.tensor(AABB))
    torch.testing.assert_close(t0[[0, 2]], torch.tensor([2.0, -1.0]))
    torch.testing.assert_close(t1[[0, 2]], torch.tensor([4.0, 1.0]))
    assert hit.tolist() == [True, False, True]
    out = render_rays(moving_sphere, o, d, torch.zeros(3), num_samples=8, aabb=AABB)
    assert out.opacity[1, 0].item() == 0.0 and (out.ray_indices != 1).all()


def test_stratified_samples_tile_the_segment():
    g = torch.Generator().manual_seed(1)
    z, s, e = stratified_samples(torch.tensor([1.0, 0.0]), torch.tensor([3.0, 1.0]), 5, True, g)
    torch.testing.assert_close((e - s).sum(-1), torch.tensor([2.0, 1.0]))
    assert ((s <= z) & (z <= e)).all()
    z0, s0, e0 = stratified_samples(torch.tensor([0.0]), torch.tensor([1.0]), 4, False)
    torch.testing.assert_close(z0, torch.tensor([[0.125, 0.375, 0.625, 0.875]]))
    torch.testing.assert_close(s0, torch.tensor([[0.0, 0.25, 0.5, 0.75]]))


def test_bad_inputs_raise_with_the_fix():
    with bad_input("times must be"):
        render_rays(moving_sphere, torch.zeros(4, 3), torch.ones(4, 3), torch.zeros(3), num_samples=4, aabb=AABB)
    with bad_input("rays_o and rays_d"):
        render_rays(moving_sphere, torch.zeros(2, 4, 3), torch.ones(2, 4, 3), torch.zeros(2), num_samples=4)
    with bad_input("aabb"):
        render_rays(moving_sphere, torch.zeros(4, 3), torch.ones(4, 3), torch.zeros(4), num_samples=4)


def test_all_rays_empty_still_backpropagates_to_the_field():
    w = torch.tensor(1.0, requires_grad=True)

    def field(points, times, output_normal=False):
        return {"density": w * torch.ones(points.shape[0], 1), "rgb": torch.ones(points.shape[0], 3, device=points.device)}

    o = torch.tensor([[0.0, 5.0, -3.0]])  # misses the box: no samples
    out = render_rays(field, o, torch.tensor([[0.0, 0, 1]]), torch.zeros(1), num_samples=8, aabb=AABB,
                      bg_color=torch.tensor([0.0, 1.0, 0.0]))
    torch.testing.assert_close(out.comp_rgb, torch.tensor([[0.0, 1.0, 0.0]]))
    assert out.opacity.item() == 0.0
    out.comp_rgb.sum().backward()
    assert w.grad is not None and w.grad.item() == 0.0


def _normal_setup():
    """A small DynamicField (torch grid; blob density so rays are partly opaque) and 48 rays at mixed times."""
    from animate124.core.field.dynamic_field import DynamicField

    field = DynamicField(n_levels=4, log2_hashmap_size=10, density_bias="blob_magic3d",
                         generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(1)
    o = torch.nn.functional.normalize(torch.randn(48, 3, generator=g), dim=-1) * 2.5
    d = torch.nn.functional.normalize(-o + 0.2 * torch.randn(48, 3, generator=g), dim=-1)
    return field, o, d, torch.rand(48, generator=g)


def _normal_grads(field, out, rays=slice(None)):
    field.zero_grad()
    out.comp_normal[rays].square().sum().backward()
    return [p.grad.clone() for p in (field.encoding.embeddings, field.encoding_time.embeddings)]


@pytest.mark.parametrize("difference", ["central", "forward"])
def test_normals_on_every_ray_by_the_subset_path_equal_the_full_path(difference):
    """normal_rays all true and no weight floor: the subset path (normal_fn on the kept samples) gives the same
    comp_normal and the same gradients as normals computed with the field's forward."""
    field, o, d, t = _normal_setup()
    field.normal_difference = difference
    full = render_rays(field, o, d, t, num_samples=64, aabb=AABB, return_normal=True)
    grads_full = _normal_grads(field, full)
    calls = []

    def normal_fn(points, times, density):
        calls.append(points.shape[0])
        return field.normal(points, times, density)

    some = render_rays(field, o, d, t, num_samples=64, aabb=AABB, return_normal=True,
                       normal_rays=torch.ones(48, dtype=torch.bool), normal_fn=normal_fn)
    torch.testing.assert_close(some.comp_normal, full.comp_normal, atol=1e-6, rtol=0)
    torch.testing.assert_close(some.normal, full.normal, atol=1e-6, rtol=0)
    assert calls == [full.weights.shape[0]] and float(some.normal_skipped_weight.abs().max()) == 0.0
    for a, b in zip(_normal_grads(field, some), grads_full):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    # without a normal_fn the field is asked again (its forward with output_normal): same result
    again = render_rays(field, o, d, t, num_samples=64, aabb=AABB, return_normal=True,
                        normal_rays=torch.ones(48, dtype=torch.bool))
    torch.testing.assert_close(again.comp_normal, full.comp_normal, atol=1e-6, rtol=0)


def test_normal_weight_min_skips_light_samples_within_the_reported_bound():
    """Samples lighter than the floor get no normal: far fewer normal queries, and sum w n moves by at most the
    skipped weight of each ray (unit normals), which the render reports."""
    field, o, d, t = _normal_setup()
    full = render_rays(field, o, d, t, num_samples=64, aabb=AABB, return_normal=True)
    raw_full = (full.weights * full.normal).new_zeros(48, 3).index_add(0, full.ray_indices, full.weights * full.normal)
    calls = []

    def normal_fn(points, times, density):
        calls.append(points.shape[0])
        return field.normal(points, times, density)

    some = render_rays(field, o, d, t, num_samples=64, aabb=AABB, return_normal=True, normal_weight_min=1e-3,
                       normal_fn=normal_fn)
    kept = int((full.weights >= 1e-3).sum())
    assert calls == [kept] and kept < 0.7 * full.weights.shape[0], (kept, full.weights.shape[0])
    raw_some = some.normal.new_zeros(48, 3).index_add(0, some.ray_indices, some.weights * some.normal)
    skipped = some.normal_skipped_weight[:, 0]
    light = torch.where(full.weights[:, 0] < 1e-3, full.weights[:, 0], torch.zeros(()))
    torch.testing.assert_close(skipped, torch.zeros(48).index_add(0, full.ray_indices, light))
    assert float(skipped.max()) > 0  # some ray lost something ...
    assert bool(((raw_some - raw_full).norm(dim=-1) <= skipped + 1e-6).all())  # ... within the bound
    torch.testing.assert_close(some.opacity, full.opacity)  # the rest of the render is untouched
    torch.testing.assert_close(some.comp_rgb, full.comp_rgb)


def test_normal_rays_give_normals_on_those_rays_only():
    field, o, d, t = _normal_setup()
    full = render_rays(field, o, d, t, num_samples=64, aabb=AABB, return_normal=True)
    rays = torch.arange(48) % 3 == 0
    some = render_rays(field, o, d, t, num_samples=64, aabb=AABB, return_normal=True, normal_rays=rays,
                       normal_fn=lambda p, tt, dens: field.normal(p, tt, dens))
    torch.testing.assert_close(some.comp_normal[rays], full.comp_normal[rays], atol=1e-6, rtol=0)
    torch.testing.assert_close(some.comp_normal[~rays], 0.5 * some.opacity[~rays].expand(-1, 3))  # no normal there
    assert bool((some.normal[~rays[some.ray_indices]] == 0).all())
    for a, b in zip(_normal_grads(field, some, rays), _normal_grads(field, full, rays)):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("with_normal_fn", [True, False])
def test_no_sample_selected_for_normals_renders_without_a_field_call(with_normal_fn):
    """normal_rays all false, or a floor no sample reaches: comp_normal is 0.5 * opacity and the field is not asked
    for normals of 0 points (the hash grid cannot take them)."""
    field, o, d, t = _normal_setup()
    calls = []

    def field_fn(points, times, output_normal=False):
        calls.append((points.shape[0], output_normal))
        return field(points, times, output_normal)

    kw = dict(num_samples=64, aabb=AABB, return_normal=True,
              normal_fn=(lambda p, tt, dens: field.normal(p, tt, dens)) if with_normal_fn else None)
    for some in (render_rays(field_fn, o, d, t, normal_rays=torch.zeros(48, dtype=torch.bool), **kw),
                 render_rays(field_fn, o, d, t, normal_weight_min=0.999, **kw)):
        torch.testing.assert_close(some.comp_normal, 0.5 * some.opacity.expand(-1, 3))
        assert bool((some.normal == 0).all())
    assert all(not output_normal for _, output_normal in calls)
    # the floor's skipped weight is then the whole opacity of each ray
    torch.testing.assert_close(some.normal_skipped_weight, some.opacity)


@pytest.mark.gpu
def test_dynamic_field_on_cuda_packed_matches_its_torch_twin_and_trains():
    """nerfacc's packed marching against the torch path (dense samples masked by the same grid), then the dense render.

    Why not packed vs dense with the default grid: ``occ_thre = 0.01`` prunes every cell whose sampled occupancy
    (density x step) is below 0.01, i.e. density < 1.5 at this step size. A random field is diffuse, so on the torch
    path (CPU, same setup, 1024 rays) only 10% of cells stay occupied and opacity drops by up to 0.09 on 21% of rays:
    the grid's threshold, on either path, not the CUDA marcher (the GPU run showed 0.107 on 22% of 4096 rays).
    With ``occ_thre = 0`` nothing a softplus density touches is pruned, and packed must match dense.
    """
    if not torch.cuda.is_available():
        pytest.skip("torch.cuda.is_available() is False: the packed nerfacc path and Triton grids need CUDA")
    from animate124.core.field.dynamic_field import DynamicField
    from animate124.core.field.occupancy import TimeOccupancyGrid

    field = DynamicField(n_levels=8, log2_hashmap_size=16, generator=torch.Generator().manual_seed(0)).cuda()
    g = torch.Generator(device="cuda").manual_seed(0)
    step = 2 * math.sqrt(3) / 512
    n = 4096
    o = torch.nn.functional.normalize(torch.randn(n, 3, device="cuda", generator=g), dim=-1) * 2.5
    d = torch.nn.functional.normalize(-o + 0.3 * torch.randn(n, 3, device="cuda", generator=g), dim=-1)
    t = torch.rand(n, device="cuda", generator=g)

    def grid_with(occ_thre: float, implementation: str) -> TimeOccupancyGrid:
        grid = TimeOccupancyGrid(AABB, resolution=32, n_time_slices=4, implementation=implementation).cuda()
        grid.update(0, field.forward_density, step_size=step, n=1, occ_thre=occ_thre,
                    generator=torch.Generator(device="cuda").manual_seed(1))
        return grid

    with torch.no_grad():
        dense = render_rays(field, o, d, t, num_samples=512, aabb=AABB)
        for occ_thre in (0.01, 0.0):
            packed = render_rays(field, o, d, t, num_samples=512, estimator=grid_with(occ_thre, "nerfacc"))
            twin = render_rays(field, o, d, t, num_samples=512, estimator=grid_with(occ_thre, "torch"))
            print(f"occ_thre={occ_thre}: max |packed - torch twin| {(packed.opacity - twin.opacity).abs().max():.4f}, "
                  f"max |packed - dense| {(packed.opacity - dense.opacity).abs().max():.4f}")
            torch.testing.assert_close(packed.opacity, twin.opacity, atol=2e-2, rtol=0)
        torch.testing.assert_close(packed.opacity, dense.opacity, atol=2e-2, rtol=0)  # occ_thre = 0: nothing pruned
    packed = render_rays(field, o, d, t, num_samples=512, estimator=grid_with(0.01, "nerfacc"), return_normal=True)
    (packed.comp_rgb.mean() + packed.comp_normal.mean()).backward()
    assert field.encoding.embeddings.grad.abs().sum() > 0 and field.encoding_time.embeddings.grad.abs().sum() > 0


@pytest.mark.gpu
def test_normal_subset_on_cuda_packed_samples():
    """The packed (nerfacc) layout: normals by the subset path on every ray equal the full path, and the weight floor
    stays within its reported bound while querying fewer normals."""
    if not torch.cuda.is_available():
        pytest.skip("torch.cuda.is_available() is False: the packed nerfacc path and Triton grids need CUDA")
    from animate124.core.field.dynamic_field import DynamicField
    from animate124.core.field.occupancy import TimeOccupancyGrid

    field = DynamicField(n_levels=8, log2_hashmap_size=16, density_bias="blob_magic3d",
                         generator=torch.Generator().manual_seed(0)).cuda()
    g = torch.Generator(device="cuda").manual_seed(0)
    n, step = 4096, 2 * math.sqrt(3) / 256
    o = torch.nn.functional.normalize(torch.randn(n, 3, device="cuda", generator=g), dim=-1) * 2.5
    d = torch.nn.functional.normalize(-o + 0.3 * torch.randn(n, 3, device="cuda", generator=g), dim=-1)
    t = torch.rand(n, device="cuda", generator=g)
    grid = TimeOccupancyGrid(AABB, resolution=32, n_time_slices=4, implementation="nerfacc").cuda()
    grid.update(0, field.forward_density, step_size=step, n=1, occ_thre=0.01,
                generator=torch.Generator(device="cuda").manual_seed(1))
    kw = dict(num_samples=256, estimator=grid, return_normal=True)
    calls = []

    def normal_fn(points, times, density):
        calls.append(points.shape[0])
        return field.normal(points, times, density)

    full = render_rays(field, o, d, t, **kw)
    every = render_rays(field, o, d, t, normal_rays=torch.ones(n, dtype=torch.bool, device="cuda"),
                        normal_fn=normal_fn, **kw)
    torch.testing.assert_close(every.comp_normal, full.comp_normal, atol=1e-5, rtol=0)
    light = render_rays(field, o, d, t, normal_weight_min=1e-3, normal_fn=normal_fn, **kw)
    raw = lambda out: torch.zeros(n, 3, device="cuda").index_add(0, out.ray_indices, out.weights * out.normal)  # noqa: E731
    assert bool(((raw(light) - raw(full)).norm(dim=-1) <= light.normal_skipped_weight[:, 0] + 1e-5).all())
    print(f"normals on {calls[1]} of {calls[0]} samples; skipped weight per ray max "
          f"{float(light.normal_skipped_weight.max()):.4f}")
    assert calls[1] < calls[0]
    light.normal.sum().backward()  # the normals themselves carry gradient to the grids (not only via the opacity)
    assert field.encoding.embeddings.grad.abs().sum() > 0 and field.encoding_time.embeddings.grad.abs().sum() > 0
