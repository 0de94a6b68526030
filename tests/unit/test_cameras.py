"""Cameras in threestudio's conventions (z up, azimuth from +x towards +y, OpenGL camera looking along -z).

Targets are hand-computed or come from the formulas in the module docstring; the random cameras are checked exactly
on scripted draws (the ends of every range and seeded interior values) against those formulas. No threestudio here
(the comparison with the host's own helpers is tests/integration/test_cameras_host.py)."""

import math

import pytest
import torch

from animate124.core.render import cameras as cam
from animate124.core.render.cameras import (
    camera_positions_from_angles,
    fixed_view,
    get_rays,
    look_at,
    make_trajectory,
    orbit_while_animating,
    sample_clip_trajectory,
    sample_elevation_deg,
    sample_random_cameras,
    turntable,
)


def _t(*values, dtype=torch.float32):
    return torch.tensor(values, dtype=dtype)


def _angles_of(traj):
    """(elevation, azimuth) in degrees measured from the actual camera positions."""
    p = traj.camera_positions.double()
    return torch.rad2deg(torch.asin(p[:, 2] / p.norm(dim=-1))), torch.rad2deg(torch.atan2(p[:, 1], p[:, 0]))


def _wrap(deg):
    return (deg + 180.0) % 360.0 - 180.0


def test_camera_positions_hand_values():
    pos = camera_positions_from_angles(_t(0.0, 0.0, 30.0, 90.0), _t(0.0, 90.0, 0.0, 0.0), _t(2.0, 2.0, 1.0, 1.0))
    expected = _t(2.0, 0.0, 0.0, 0.0, 2.0, 0.0, math.sqrt(3) / 2, 0.0, 0.5, 0.0, 0.0, 1.0).view(4, 3)
    torch.testing.assert_close(pos, expected, atol=1e-6, rtol=0)


def test_look_at_front_camera_hand_matrix():
    # camera at (2, 0, 0): lookat = -x, right = lookat x z = +y, up = right x lookat = +z, back (-lookat) = +x
    c2w = look_at(_t(2.0, 0.0, 0.0).view(1, 3))[0]
    expected = _t(0, 0, 1, 2, 1, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 1).view(4, 4)
    torch.testing.assert_close(c2w, expected, atol=1e-7, rtol=0)


def test_look_at_is_a_rotation_looking_at_origin():
    g = torch.Generator().manual_seed(0)
    traj = sample_random_cameras(64, elevation_range=(-80, 80), distance_range=(1.0, 3.0), generator=g)
    rot = traj.c2w[:, :3, :3]
    torch.testing.assert_close(rot.transpose(1, 2) @ rot, torch.eye(3).expand(64, 3, 3), atol=1e-5, rtol=0)
    torch.testing.assert_close(torch.linalg.det(rot), torch.ones(64), atol=1e-5, rtol=0)
    # the camera's -z axis points from the camera to the origin; its up axis has a positive world-z component
    forward = -rot[:, :, 2]
    torch.testing.assert_close(forward, -traj.camera_positions / traj.distance[:, None], atol=1e-5, rtol=0)
    assert (rot[:, 2, 1] > 0).all()
    torch.testing.assert_close(traj.c2w[:, 3], _t(0, 0, 0, 1).expand(64, 4))


def test_rays_hand_values_corner_pixel():
    # fovy 90 deg, H = W = 2 -> f = 0.5 * 2 / tan(45 deg) = 1; pixel (0, 0) centre (0.5, 0.5):
    # camera dir ((0.5 - 1) / 1, -(0.5 - 1) / 1, -1) = (-0.5, 0.5, -1); camera at (2, 0, 0) maps
    # camera (x, y, z) to world (z, x, y) (hand matrix above) -> world (-1, -0.5, 0.5), normalised
    c2w = look_at(_t(2.0, 0.0, 0.0).view(1, 3))
    rays_o, rays_d = get_rays(c2w, _t(math.pi / 2), 2, 2)
    assert rays_o.shape == rays_d.shape == (1, 2, 2, 3)
    torch.testing.assert_close(rays_d[0, 0, 0], _t(-1.0, -0.5, 0.5) / math.sqrt(1.5), atol=1e-6, rtol=0)
    torch.testing.assert_close(rays_o[0, 1, 1], _t(2.0, 0.0, 0.0))
    unnorm = get_rays(c2w, _t(math.pi / 2), 2, 2, normalize=False)[1]
    torch.testing.assert_close(unnorm[0, 0, 0], _t(-1.0, -0.5, 0.5), atol=1e-6, rtol=0)


def test_rays_project_back_to_their_pixel_centres():
    # a point along the ray of pixel (i, j), taken into camera space by the rigid inverse of c2w, projects through the
    # pinhole f = 0.5 H / tan(fovy / 2) to (W/2 + f x / -z, H/2 - f y / -z) = the pixel centre (i + .5, j + .5);
    # a non-square image checks the aspect handling
    traj = sample_random_cameras(3, fovy_range=(30, 70), generator=torch.Generator().manual_seed(3))
    H, W = 6, 10
    rays_o, rays_d = get_rays(traj.c2w, traj.fovy, H, W)
    rot, pos = traj.c2w[:, :3, :3], traj.c2w[:, :3, 3]
    cam_pts = torch.einsum("bji,bhwj->bhwi", rot, rays_o + 1.7 * rays_d - pos[:, None, None])
    f = (0.5 * H / torch.tan(0.5 * traj.fovy))[:, None, None]
    depth = -cam_pts[..., 2]
    assert (depth > 0).all()  # in front of the camera
    u, v = W / 2 + f * cam_pts[..., 0] / depth, H / 2 - f * cam_pts[..., 1] / depth
    jj, ii = torch.meshgrid(torch.arange(H) + 0.5, torch.arange(W) + 0.5, indexing="ij")
    torch.testing.assert_close(torch.stack([u, v], -1), torch.stack([ii, jj], -1).expand(3, H, W, 2), atol=1e-4, rtol=0)


def test_ray_noise_is_seeded():
    c2w = turntable(2).c2w
    a = get_rays(c2w, _t(0.7, 0.7), 4, 4, noise_scale=0.1, generator=torch.Generator().manual_seed(5))
    b = get_rays(c2w, _t(0.7, 0.7), 4, 4, noise_scale=0.1, generator=torch.Generator().manual_seed(5))
    clean = get_rays(c2w, _t(0.7, 0.7), 4, 4)
    torch.testing.assert_close(a[0], b[0], rtol=0, atol=0)
    # one shared 3-vector offset for every origin
    offset = a[0] - clean[0]
    torch.testing.assert_close(offset, offset[0, 0, 0].expand_as(offset))
    assert 0 < offset[0, 0, 0].norm() < 1.0


@pytest.mark.parametrize("n_frames", [16, 5])
def test_clip_trajectory_moves_by_its_per_frame_deltas(n_frames):
    times = torch.linspace(0, 1, n_frames)
    traj = sample_clip_trajectory(
        times,
        elevation_range=(10, 10),
        azimuth_range=(170, 170),
        elevation_delta_range=(0.5, 0.5),
        azimuth_delta_range=(5.0, 5.0),
        generator=torch.Generator().manual_seed(0),
    )
    # returned angles move by (F - 1) * delta (unwrapped: 170 + 75 = 245 deg for 16 frames)
    assert traj.azimuth_deg[-1].item() - traj.azimuth_deg[0].item() == pytest.approx(5.0 * (n_frames - 1), abs=1e-4)
    assert traj.elevation_deg[-1].item() - traj.elevation_deg[0].item() == pytest.approx(0.5 * (n_frames - 1), abs=1e-4)
    # and the cameras really sit at those angles (upstream's bug moved the camera by the elevation delta instead)
    elevation, azimuth = _angles_of(traj)
    torch.testing.assert_close(elevation, traj.elevation_deg.double(), atol=1e-3, rtol=0)
    torch.testing.assert_close(
        _wrap(azimuth - traj.azimuth_deg.double()), torch.zeros(n_frames, dtype=torch.float64), atol=1e-3, rtol=0
    )
    torch.testing.assert_close(traj.times, times)


def test_clip_trajectory_total_mode_and_distance_drift():
    traj = sample_clip_trajectory(
        torch.linspace(0, 1, 16),
        azimuth_delta_range=(-60.0, -60.0),
        elevation_delta_range=(20.0, 20.0),
        elevation_range=(-10, -10),
        distance_range=(2.0, 2.0),
        distance_delta_range=(0.5, 0.5),
        delta_mode="total",
    )
    assert traj.azimuth_deg[-1] - traj.azimuth_deg[0] == pytest.approx(-60.0, abs=1e-4)
    assert traj.elevation_deg[-1].item() == pytest.approx(10.0, abs=1e-4)
    torch.testing.assert_close(traj.camera_positions.norm(dim=-1), torch.linspace(2.0, 2.5, 16))
    _, azimuth = _angles_of(traj)
    sweep = torch.rad2deg(torch.atan2(*_sin_cos_of_difference(azimuth[-1], azimuth[0])))
    assert sweep.item() == pytest.approx(-60.0, abs=1e-3)


def _sin_cos_of_difference(a_deg, b_deg):
    d = torch.deg2rad(a_deg - b_deg)
    return torch.sin(d), torch.cos(d)


def test_clip_trajectory_default_drift_exceeds_the_buggy_bound_and_fixed_camera_rate():
    # default per-frame azimuth delta U(+-5.625 deg): sweeps over 15 frames reach +-84 deg; upstream's bug capped the
    # real sweep at +-10.5 deg. With fixed_camera_prob 0.25 a quarter of the clips do not move.
    g = torch.Generator().manual_seed(1)
    sweeps, fixed = [], 0
    for _ in range(1000):
        traj = sample_clip_trajectory(torch.zeros(16), fixed_camera_prob=0.25, generator=g)
        _, azimuth = _angles_of(traj)
        sweep = _wrap(azimuth[-1] - azimuth[0]).item()
        assert sweep == pytest.approx(traj.azimuth_deg[-1].item() - traj.azimuth_deg[0].item(), abs=1e-3)
        sweeps.append(abs(sweep))
        fixed += bool(torch.equal(traj.c2w[0], traj.c2w[-1]))
    assert abs(fixed / 1000 - 0.25) < 4 * math.sqrt(0.25 * 0.75 / 1000)
    assert max(sweeps) <= 84.375 + 1e-3 and max(sweeps) > 75.0
    assert sum(s > 10.5 for s in sweeps) / 1000 > 0.61  # E = 0.75 * (1 - 10.5 / 84.375) = 0.657


def test_random_elevation_sampling_modes():
    g = torch.Generator().manual_seed(2)
    n = 20_000
    degrees = sample_elevation_deg(n, (-45, 45), uniform_sphere_prob=0.0, generator=g)
    sphere = sample_elevation_deg(n, (-45, 45), uniform_sphere_prob=1.0, generator=g)
    for e in (degrees, sphere):
        assert e.min() >= -45 and e.max() <= 45
    # P(|e| < 22.5): uniform in degrees 0.5; uniform on the sphere's area sin(22.5) / sin(45) = 0.5412
    tol = 4 * math.sqrt(0.25 / n)
    assert abs((degrees.abs() < 22.5).float().mean().item() - 0.5) < tol
    assert (
        abs((sphere.abs() < 22.5).float().mean().item() - math.sin(math.radians(22.5)) / math.sin(math.radians(45)))
        < tol
    )


def test_random_cameras_ranges_strata_and_time():
    traj = sample_random_cameras(
        8, time=0.0, distance_range=(2.0, 3.0), fovy_range=(30, 50), generator=torch.Generator().manual_seed(4)
    )
    assert len(traj) == 8 and torch.equal(traj.times, torch.zeros(8))
    strata = torch.floor((traj.azimuth_deg + 180.0) / 45.0)
    assert strata.tolist() == list(range(8))  # batch-uniform azimuth: one camera per 1/8 of the circle
    assert traj.distance.min() >= 2.0 and traj.distance.max() <= 3.0
    assert traj.fovy_deg.min() >= 30.0 and traj.fovy_deg.max() <= 50.0
    torch.testing.assert_close(traj.camera_positions.norm(dim=-1), traj.distance)


@pytest.mark.parametrize("endpoint, n", [(False, 8), (True, 9)])
def test_turntable_covers_360_degrees(endpoint, n):
    traj = turntable(n, time=0.5, elevation_deg=15.0, distance=2.0, endpoint=endpoint)
    _, azimuth = _angles_of(traj)
    steps = _wrap(azimuth.diff())
    torch.testing.assert_close(steps, torch.full((n - 1,), 45.0, dtype=torch.float64), atol=1e-3, rtol=0)
    covered = steps.sum().item() + (0.0 if endpoint else 45.0)
    assert covered == pytest.approx(360.0, abs=1e-3)
    assert torch.equal(traj.times, torch.full((n,), 0.5))
    torch.testing.assert_close(_angles_of(traj)[0], torch.full((n,), 15.0, dtype=torch.float64), atol=1e-4, rtol=0)


def test_fixed_view_and_orbit_while_animating():
    fixed = fixed_view(5, azimuth_deg=30.0, t_start=0.0, t_end=1.0)
    assert torch.equal(fixed.c2w, fixed.c2w[:1].expand(5, 4, 4))
    torch.testing.assert_close(fixed.times, _t(0.0, 0.25, 0.5, 0.75, 1.0))
    orbit = orbit_while_animating(5, sweep_deg=360.0, start_azimuth_deg=-90.0)
    torch.testing.assert_close(orbit.azimuth_deg, _t(-90.0, 0.0, 90.0, 180.0, 270.0))
    torch.testing.assert_close(orbit.times, _t(0.0, 0.25, 0.5, 0.75, 1.0))
    _, azimuth = _angles_of(orbit)
    torch.testing.assert_close(
        _wrap(azimuth - orbit.azimuth_deg.double()), torch.zeros(5, dtype=torch.float64), atol=1e-4, rtol=0
    )


def test_dtype_and_device_follow_inputs():
    traj = make_trajectory(
        _t(10.0, dtype=torch.float64),
        _t(20.0, dtype=torch.float64),
        _t(2.0, dtype=torch.float64),
        _t(0.3, dtype=torch.float64),
    )
    assert traj.c2w.dtype == torch.float64 and traj.fovy_deg.tolist() == [40.0]
    rays_o, rays_d = get_rays(traj.c2w, traj.fovy, 3, 3)
    assert rays_d.dtype == torch.float64
    clip = sample_clip_trajectory(torch.zeros(4, dtype=torch.float64))
    assert clip.c2w.dtype == torch.float64


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: turntable(0), "n=0"),
        (lambda: turntable(4, elevation_deg=90.0), "elevation_deg=90.0"),
        (lambda: fixed_view(3, t_end=1.5), r"frame times must lie in \[0, 1\]"),
        # a Literal argument: our ValueError, or a runtime type checker's TypeError naming the value first
        (lambda: sample_clip_trajectory(torch.zeros(3), delta_mode="sum"), "'sum'"),
        (lambda: sample_clip_trajectory(torch.zeros(3), azimuth_range=(10, -10)), "azimuth_range"),
        (lambda: sample_clip_trajectory(torch.zeros(3), fixed_camera_prob=2.0), "fixed_camera_prob=2.0"),
        (lambda: sample_random_cameras(2, elevation_range=(-100, 10)), "elevation_range"),
        (lambda: sample_clip_trajectory(torch.zeros(16), distance_delta_range=(-1, -1)), "distance_delta_range"),
        (lambda: sample_random_cameras(2, distance_range=(-1, 1)), "distance_range"),
    ],
)
def test_bad_arguments_raise(call, match):
    error = (ValueError, TypeError) if match == "'sum'" else ValueError
    with pytest.raises(error, match=match):
        call()


# ---- the random cameras on scripted draws: every range exactly ------------------------------------------------------

HIGH = 1.0 - 2.0**-53  # the largest U below 1


class _Script:
    """Stands in for ``cameras._rand``: hands out scripted U values in order and records how many each draw took."""

    def __init__(self, values):
        self.values, self.sizes = [float(v) for v in values], []

    def __call__(self, n, generator):
        self.sizes.append(n)
        out, self.values = self.values[:n], self.values[n:]
        assert len(out) == n, "the sampler drew more than the script holds"
        return torch.tensor(out, dtype=torch.float64)


def _elevation(coin, u, lo, hi, sphere_prob):
    """Degrees: uniform in degrees when coin >= sphere_prob, else uniform in sin(elevation) (the sphere's area)."""
    if coin >= sphere_prob:
        return lo + u * (hi - lo)
    s_lo, s_hi = math.sin(math.radians(lo)), math.sin(math.radians(hi))
    return math.degrees(math.asin(s_lo + u * (s_hi - s_lo)))


def _scripts(n_values, seed=0, n_random=20):
    """Every draw at 0, every draw at its top, then seeded interior values."""
    g = torch.Generator().manual_seed(seed)
    return [[0.0] * n_values, [HIGH] * n_values] + [torch.rand(n_values, generator=g, dtype=torch.float64).tolist()
                                                     for _ in range(n_random)]


RANGES = dict(elevation_range=(-30.0, 60.0), azimuth_range=(-100.0, 140.0), distance_range=(1.5, 3.5),
              fovy_range=(30.0, 55.0))


@pytest.mark.parametrize("stratified", [True, False], ids=["batch-uniform-azimuth", "plain-azimuth"])
@pytest.mark.parametrize("sphere", [True, False], ids=["area-uniform", "degree-uniform"])
def test_random_cameras_map_each_draw_onto_its_range_exactly(monkeypatch, sphere, stratified):
    """Catches a range shortened, shifted or swapped at either end (elevation, azimuth, distance, fovy), the azimuth
    strata off by one (camera i covers [i, i + 1) / n of the range), the elevation coin's boundary moved (U >=
    uniform_sphere_prob is uniform in degrees), or the draws taken in another order."""
    n, p = 3, 0.5
    coin = p - 1e-12 if sphere else p  # the coin at the boundary, on either side
    for script in _scripts(4 * n):
        u_e, u_a, u_d, u_f = (script[i * n:(i + 1) * n] for i in range(4))
        draws = _Script([coin, *script])
        monkeypatch.setattr(cam, "_rand", draws)
        traj = sample_random_cameras(n, time=0.25, uniform_sphere_prob=p, batch_uniform_azimuth=stratified,
                                     dtype=torch.float64, **RANGES)
        assert draws.sizes == [1, n, n, n, n] and draws.values == []
        lo, hi = RANGES["elevation_range"]
        expected = {
            "elevation_deg": [_elevation(coin, u, lo, hi, p) for u in u_e],
            "azimuth_deg": [-100.0 + ((u + i) / n if stratified else u) * 240.0 for i, u in enumerate(u_a)],
            "distance": [1.5 + u * 2.0 for u in u_d],
            "fovy_deg": [30.0 + u * 25.0 for u in u_f],
            "times": [0.25] * n,
        }
        for name, values in expected.items():
            tol = 1e-5 if name == "elevation_deg" else 1e-12  # elevations are drawn in float32
            torch.testing.assert_close(getattr(traj, name), torch.tensor(values, dtype=torch.float64), rtol=0,
                                       atol=tol, msg=name)
    # the bottom of every range, said plainly
    draws = _Script([coin] + [0.0] * 4 * n)
    monkeypatch.setattr(cam, "_rand", draws)
    traj = sample_random_cameras(n, uniform_sphere_prob=p, batch_uniform_azimuth=stratified, dtype=torch.float64,
                                 **RANGES)
    assert traj.elevation_deg.tolist() == [-30.0] * n and traj.distance.tolist() == [1.5] * n
    assert traj.azimuth_deg.tolist() == ([-100.0, -20.0, 60.0] if stratified else [-100.0] * n)


@pytest.mark.parametrize("delta_mode", ["per_frame", "total"])
@pytest.mark.parametrize("fixed", [True, False], ids=["fixed-camera", "moving-camera"])
def test_clip_cameras_map_each_draw_onto_its_range_exactly(monkeypatch, delta_mode, fixed):
    """Catches a start-camera or drift range shortened, shifted or swapped, the azimuth moved by another drift
    (upstream's bug used the elevation's), the per-frame / total scaling of the drift mixed up, the elevation clamp
    lost, or the fixed-camera coin's boundary moved (U < fixed_camera_prob keeps the camera still)."""
    n_frames, p_fixed = 5, 0.25
    ranges = dict(elevation_range=(-20.0, 70.0), azimuth_range=(-150.0, 90.0), distance_range=(2.0, 3.0),
                  elevation_delta_range=(-2.0, 6.0), azimuth_delta_range=(-8.0, 4.0), distance_delta_range=(-0.1, 0.3))
    coin = p_fixed - 1e-12 if fixed else p_fixed
    times = torch.linspace(0.0, 0.5, n_frames, dtype=torch.float64)
    for script in _scripts(6, seed=1):
        u_e, u_a, u_d, u_de, u_da, u_dd = script
        draws = _Script([0.9, u_e, u_a, u_d, u_de, u_da, u_dd, coin])  # elevation coin 0.9: uniform in degrees
        monkeypatch.setattr(cam, "_rand", draws)
        traj = sample_clip_trajectory(times, delta_mode=delta_mode, fixed_camera_prob=p_fixed,
                                      uniform_sphere_prob=0.5, elevation_limit_deg=80.0, **ranges)
        assert draws.sizes == [1, 1, 1, 1, 1, 1, 1, 1] and draws.values == []
        e0, a0, d0 = -20.0 + u_e * 90.0, -150.0 + u_a * 240.0, 2.0 + u_d * 1.0
        de, da, dd = (0.0, 0.0, 0.0) if fixed else (-2.0 + u_de * 8.0, -8.0 + u_da * 12.0, -0.1 + u_dd * 0.4)
        s = [f / (n_frames - 1) if delta_mode == "total" else float(f) for f in range(n_frames)]
        expected = {"elevation_deg": [min(max(e0 + k * de, -80.0), 80.0) for k in s],
                    "azimuth_deg": [a0 + k * da for k in s], "distance": [d0 + k * dd for k in s]}
        for name, values in expected.items():
            tol = 1e-5 if name == "elevation_deg" else 1e-12  # elevations are drawn in float32
            torch.testing.assert_close(getattr(traj, name), torch.tensor(values, dtype=torch.float64), rtol=0,
                                       atol=tol, msg=name)
        torch.testing.assert_close(traj.times, times, rtol=0, atol=0)
    # the top of the elevation range with the top drift: clamped at the limit, not beyond
    monkeypatch.setattr(cam, "_rand", _Script([0.9, HIGH, 0.0, 0.0, HIGH, 0.0, 0.0, 1.0]))
    traj = sample_clip_trajectory(times, delta_mode="per_frame", uniform_sphere_prob=0.5, elevation_limit_deg=80.0,
                                  **ranges)
    assert traj.elevation_deg.tolist() == pytest.approx([70.0, 76.0, 80.0, 80.0, 80.0])
