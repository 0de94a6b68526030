"""animate124.core.render.cameras against threestudio's own helpers and data modules (same numbers, same conventions)."""

import math

import pytest
import torch

from animate124.core.render.cameras import get_rays, make_trajectory, turntable


@pytest.fixture(scope="module")
def host():
    from threestudio_env import load_threestudio

    return load_threestudio()


def test_rays_match_host_ops(host):
    from threestudio.utils.ops import get_ray_directions
    from threestudio.utils.ops import get_rays as host_get_rays

    traj = turntable(5, elevation_deg=20.0, distance=2.0, fovy_deg=50.0)
    H, W = 6, 10
    focal = 0.5 * H / torch.tan(0.5 * traj.fovy)
    directions = get_ray_directions(H=H, W=W, focal=1.0)[None].repeat(5, 1, 1, 1)
    directions[..., :2] = directions[..., :2] / focal[:, None, None, None]
    host_o, host_d = host_get_rays(directions, traj.c2w, keepdim=True, normalize=True)
    ours_o, ours_d = get_rays(traj.c2w, traj.fovy, H, W)
    torch.testing.assert_close(ours_o, host_o, rtol=0, atol=0)
    torch.testing.assert_close(ours_d, host_d, rtol=0, atol=1e-7)
    # the host's noise: one 3-vector for all origins, one for all directions, added before normalising
    noisy_o, noisy_d = get_rays(traj.c2w, traj.fovy, H, W, noise_scale=0.1, generator=torch.Generator().manual_seed(0))
    offsets = torch.randn(2, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64).float() * 0.1
    host_o, host_d = host_get_rays(directions, traj.c2w, keepdim=True, normalize=False)
    torch.testing.assert_close(noisy_o, host_o + offsets[0], rtol=0, atol=1e-6)
    torch.testing.assert_close(noisy_d, torch.nn.functional.normalize(host_d + offsets[1], dim=-1), rtol=0, atol=1e-6)


def test_cameras_match_host_random_camera_datamodule(host):
    from threestudio.data.uncond import RandomCameraDataModuleConfig, RandomCameraDataset, RandomCameraIterableDataset
    from threestudio.utils.config import parse_structured

    cfg = parse_structured(
        RandomCameraDataModuleConfig,
        dict(
            height=8,
            width=8,
            batch_size=4,
            n_val_views=4,
            eval_height=8,
            eval_width=8,
            eval_elevation_deg=0.0,
            eval_camera_distance=2.5,
            eval_fovy_deg=40.0,
            camera_perturb=0.0,
            center_perturb=0.0,
            up_perturb=0.0,
            elevation_range=(-45, 45),
            camera_distance_range=(2.5, 2.5),
            fovy_range=(40, 40),
        ),
    )
    # validation orbit: azimuth 0, 90, 180, 270 at elevation 0
    val = RandomCameraDataset(cfg, "val")
    ours = turntable(4, elevation_deg=0.0, distance=2.5, fovy_deg=40.0)
    torch.testing.assert_close(ours.c2w, val.c2w, atol=1e-6, rtol=0)
    torch.testing.assert_close(get_rays(ours.c2w, ours.fovy, 8, 8)[1], val.rays_d, atol=1e-6, rtol=0)
    # training batch: rebuild the host's cameras from the angles it reports
    batch = RandomCameraIterableDataset(cfg).collate(None)
    traj = make_trajectory(
        batch["elevation"], batch["azimuth"], batch["camera_distances"], torch.zeros(4), torch.rad2deg(batch["fovy"])
    )
    torch.testing.assert_close(traj.c2w, batch["c2w"], atol=1e-5, rtol=0)
    torch.testing.assert_close(get_rays(traj.c2w, traj.fovy, 8, 8)[1], batch["rays_d"], atol=1e-5, rtol=0)
    assert math.isclose(float(batch["fovy"][0]), math.radians(40.0), rel_tol=1e-6)
