"""Fit DynamicField + render_rays to a procedural dynamic scene; report PSNR on unseen views and unseen times.

The scene is ``animate124.testing.synthetic_scene.blobs_scene`` (a moving sphere and a breathing ellipsoid). Ground truth
comes from the independent dense quadrature renderer there (camera-centred near/far, cumprod transmittance, no nerfacc,
no aabb clipping), on a white background. Training images: ``n_train_views`` cameras around
the scene x ``n_train_times`` times in [0, 1]. Evaluation: ``n_eval_views`` UNSEEN cameras (azimuths half-way
between training ones, another elevation) at the training times, and training cameras at UNSEEN times (midpoints
between training times). Photometric MSE, Adam (grid lr 1e-2, MLP lr 1e-3 by default).

GPU goal: >= 30 dB within 2000 steps:

    python benchmarks/fit_synthetic_4d.py --device cuda --steps 2000

A small CPU version runs in tests/unit/test_fit_synthetic.py through :func:`run_fit`.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from typing import Optional

import torch
import torch.nn.functional as F

from animate124.core.field.dynamic_field import DynamicField, features_to_rgb
from animate124.core.field.occupancy import TimeOccupancyGrid
from animate124.core.render.volrend import render_rays
from animate124.testing.synthetic_scene import orbit_camera_rays, reference_render

AABB = (-1.0, -1.0, -1.0, 1.0, 1.0, 1.0)
CAMERA_DISTANCE, FOV_DEG = 2.6, 40.0


# ----------------------------------------------------------------------------------------------------------------------
# the procedural scene (animate124.testing.synthetic_scene, shared with the oracle guidances)


def camera_rays(azimuth_deg: float, elevation_deg: float, resolution: int, device) -> tuple[torch.Tensor, ...]:
    """One square camera at CAMERA_DISTANCE looking at the origin. Rays ``[H*W, 3]``."""
    one = lambda v: torch.tensor([float(v)])  # noqa: E731
    o, d = orbit_camera_rays(one(elevation_deg), one(azimuth_deg), one(CAMERA_DISTANCE),
                             torch.deg2rad(one(FOV_DEG)), resolution, resolution)
    return o.reshape(-1, 3).to(device), d.reshape(-1, 3).to(device)


def make_set(views: list[tuple[float, float]], times: list[float], resolution: int, device, ref_samples: int):
    """All rays of views x times, with per-ray times and ground-truth colours. Returns dict of [V*T*H*W, .]."""
    rays_o, rays_d, ray_t = [], [], []
    for az, el in views:
        o, d = camera_rays(az, el, resolution, device)
        for t in times:
            rays_o.append(o)
            rays_d.append(d)
            ray_t.append(torch.full((o.shape[0],), float(t), device=device))
    data = {"rays_o": torch.cat(rays_o), "rays_d": torch.cat(rays_d), "times": torch.cat(ray_t)}
    data["rgb"] = reference_render(data["rays_o"], data["rays_d"], data["times"], n_samples=ref_samples)[0]
    return data


# ----------------------------------------------------------------------------------------------------------------------
# fitting


def run_fit(
    *,
    device: str = "cpu",
    steps: int = 2000,
    resolution: int = 64,
    n_train_views: int = 16,
    n_train_times: int = 16,
    n_eval_views: int = 4,
    rays_per_step: int = 4096,
    num_samples: int = 128,
    n_levels: int = 16,
    log2_hashmap_size: int = 19,
    base_resolution: int = 16,
    per_level_scale: float = 1.447269237440378,
    mlp_hidden: int = 64,
    density_activation: str = "softplus",
    density_bias: str | float = "blob_magic3d",
    lambda_time_smooth: float = 0.0,
    grid_lr: float = 1e-2,
    mlp_lr: float = 1e-3,
    estimator: str = "none",
    alpha_thre: float = 0.0,
    occ_resolution: int = 64,
    occ_time_slices: int = 16,
    implementation: str = "auto",
    ref_samples: int = 512,
    seed: int = 0,
    log_every: int = 0,
) -> dict:
    """Build the data, fit, evaluate. Returns PSNRs (dB), steps/s and sizes. Absolute times only mean something on
    the GPU; on CPU they depend on the machine's load."""
    torch.manual_seed(seed)
    gen = torch.Generator(device=device).manual_seed(seed)
    t_data = time.perf_counter()
    # 1. Data: training views x times; unseen views at training times; training views at unseen times.
    train_views = [(360.0 * i / n_train_views, 15.0 if i % 2 == 0 else 40.0) for i in range(n_train_views)]
    eval_views = [(360.0 * (i + 0.5) / n_eval_views + 360.0 / (2 * n_train_views), 28.0) for i in range(n_eval_views)]
    train_times = [i / (n_train_times - 1) for i in range(n_train_times)]
    unseen_times = [(a + b) / 2 for a, b in zip(train_times[:-1], train_times[1:])]
    pick = train_views[:: max(1, n_train_views // n_eval_views)][:n_eval_views]
    train = make_set(train_views, train_times, resolution, device, ref_samples)
    sets = {
        "unseen_views": make_set(eval_views, train_times, resolution, device, ref_samples),
        "unseen_times": make_set(pick, unseen_times, resolution, device, ref_samples),
    }
    data_s = time.perf_counter() - t_data
    # 2. Model and optimiser.
    field = DynamicField(
        n_levels=n_levels, log2_hashmap_size=log2_hashmap_size, base_resolution=base_resolution,
        per_level_scale=per_level_scale, mlp_hidden=mlp_hidden, implementation=implementation,
        density_activation=density_activation, density_bias=density_bias,
        generator=torch.Generator().manual_seed(seed),
    ).to(device)
    grids = [field.encoding.embeddings, field.encoding_time.embeddings]
    mlps = list(field.density_network.parameters()) + list(field.feature_network.parameters())
    optim = torch.optim.Adam([{"params": grids, "lr": grid_lr}, {"params": mlps, "lr": mlp_lr}], betas=(0.9, 0.99),
                             eps=1e-15)
    occ = None
    if estimator == "occ":
        occ = TimeOccupancyGrid(AABB, resolution=occ_resolution, n_time_slices=occ_time_slices).to(device)
    step_size = 2 * math.sqrt(3) / num_samples
    white = torch.ones(3, device=device)

    def field_fn(points, times, output_normal=False):
        out = field(points, times, output_normal)
        out["rgb"] = features_to_rgb(out["features"])
        return out

    # 3. Train on random rays of all training views and times.
    n_train = train["rgb"].shape[0]
    losses, n_samples = [], []
    warmup = min(10, steps // 10)  # Triton/nerfacc compile on the first calls: time only the steps after these
    t0 = time.perf_counter()
    for step in range(steps):
        if step == warmup:
            _sync(device)
            t0 = time.perf_counter()
        if occ is not None:
            occ.update(step, field.forward_density, step_size=step_size, generator=gen)
        idx = torch.randint(n_train, (rays_per_step,), generator=gen, device=device)
        out = render_rays(field_fn, train["rays_o"][idx], train["rays_d"][idx], train["times"][idx],
                          num_samples=num_samples, aabb=AABB, estimator=occ, bg_color=white, randomized=True,
                          generator=gen, alpha_thre=alpha_thre, density_fn=field.forward_density)
        n_samples.append(out.weights.shape[0])
        loss = F.mse_loss(out.comp_rgb, train["rgb"][idx])
        if lambda_time_smooth > 0:
            loss = loss + lambda_time_smooth * field.time_smoothness_loss(n_points=rays_per_step, generator=gen)
        optim.zero_grad(set_to_none=True)
        loss.backward()
        optim.step()
        if log_every and (step % log_every == 0 or step == steps - 1):
            print(f"step {step:5d}  loss {loss.item():.5f}  psnr(batch) {_psnr(loss.item()):.2f} dB", flush=True)
        losses.append(loss.detach())
    _sync(device)
    train_s = time.perf_counter() - t0
    # 4. Evaluate (deterministic samples).
    t_eval = time.perf_counter()
    result = {name: _evaluate(field_fn, data, num_samples, occ, white, alpha_thre) for name, data in sets.items()}
    eval_s = time.perf_counter() - t_eval
    return {
        "psnr_unseen_views": result["unseen_views"],
        "psnr_unseen_times": result["unseen_times"],
        "psnr_white_baseline_unseen_views": _psnr((1.0 - sets["unseen_views"]["rgb"]).square().mean().item()),
        "psnr_train_batch_last": _psnr(torch.stack(losses[-20:]).mean().item()) if losses else float("nan"),
        "steps_per_s": (steps - warmup) / train_s if train_s > 0 else float("nan"),
        "train_seconds": train_s,  # steps after the warm-up steps only
        "warmup_steps": warmup,
        "data_seconds": data_s,
        "eval_seconds": eval_s,
        "steps": steps,
        "device": torch.cuda.get_device_name() if str(device).startswith("cuda") else "cpu",
        "n_train_rays": n_train,
        "resolution": resolution,
        "rays_per_step": rays_per_step,
        "num_samples": num_samples,
        "estimator": estimator,
        "alpha_thre": alpha_thre,
        # samples evaluated with gradient per ray, over the last 20% of the steps (what the pruning saves)
        "samples_per_ray_last": _mean(n_samples[-max(1, steps // 5):]) / rays_per_step,
    }


@torch.no_grad()
def _evaluate(field_fn, data: dict, num_samples: int, occ: Optional[TimeOccupancyGrid], white,
              alpha_thre: float = 0.0) -> float:
    chunk, se = 16384, 0.0
    for i in range(0, data["rgb"].shape[0], chunk):
        out = render_rays(field_fn, data["rays_o"][i : i + chunk], data["rays_d"][i : i + chunk],
                          data["times"][i : i + chunk], num_samples=num_samples, aabb=AABB, estimator=occ,
                          bg_color=white, alpha_thre=alpha_thre)
        se += (out.comp_rgb.clamp(0, 1) - data["rgb"][i : i + chunk]).square().sum().item()
    return _psnr(se / data["rgb"].numel())


def _mean(values: list) -> float:
    return sum(values) / len(values) if values else float("nan")


def _psnr(mse: float) -> float:
    return -10.0 * math.log10(max(mse, 1e-12))


def _sync(device) -> None:
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def _float_or_name(value: str):
    try:
        return float(value)
    except ValueError:
        return value


def main(argv: Optional[list[str]] = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--resolution", type=int, default=64)
    p.add_argument("--n-train-views", type=int, default=16)
    p.add_argument("--n-train-times", type=int, default=16)
    p.add_argument("--n-eval-views", type=int, default=4)
    p.add_argument("--rays-per-step", type=int, default=4096)
    p.add_argument("--num-samples", type=int, default=128)
    p.add_argument("--n-levels", type=int, default=16)
    p.add_argument("--log2-hashmap-size", type=int, default=19)
    p.add_argument("--base-resolution", type=int, default=16)
    p.add_argument("--per-level-scale", type=float, default=1.447269237440378)
    p.add_argument("--density-activation", choices=["softplus", "exp", "trunc_exp"], default="softplus")
    p.add_argument("--density-bias", default="blob_magic3d", help="blob_magic3d | blob_dreamfusion | none | a float")
    p.add_argument("--lambda-time-smooth", type=float, default=0.0, help="weight of field.time_smoothness_loss")
    p.add_argument("--grid-lr", type=float, default=1e-2)
    p.add_argument("--mlp-lr", type=float, default=1e-3)
    p.add_argument("--estimator", choices=["none", "occ"], default="none",
                   help="occ: time-aware occupancy grid (nerfacc ray marching on CUDA)")
    p.add_argument("--alpha-thre", type=float, default=0.0,
                   help="drop samples with alpha below this or behind transmittance 1e-4 (renderer's alpha_thre)")
    p.add_argument("--occ-resolution", type=int, default=64)
    p.add_argument("--occ-time-slices", type=int, default=16)
    p.add_argument("--implementation", choices=["auto", "torch", "triton", "tcnn"], default="auto")
    p.add_argument("--ref-samples", type=int, default=512)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log-every", type=int, default=200)
    a = p.parse_args(argv)
    result = run_fit(
        device=a.device, steps=a.steps, resolution=a.resolution, n_train_views=a.n_train_views,
        n_train_times=a.n_train_times, n_eval_views=a.n_eval_views, rays_per_step=a.rays_per_step,
        num_samples=a.num_samples, density_activation=a.density_activation,
        density_bias=_float_or_name(a.density_bias), lambda_time_smooth=a.lambda_time_smooth, n_levels=a.n_levels,
        log2_hashmap_size=a.log2_hashmap_size,
        base_resolution=a.base_resolution, per_level_scale=a.per_level_scale, grid_lr=a.grid_lr, mlp_lr=a.mlp_lr,
        estimator=a.estimator, alpha_thre=a.alpha_thre, occ_resolution=a.occ_resolution, occ_time_slices=a.occ_time_slices,
        implementation=a.implementation, ref_samples=a.ref_samples, seed=a.seed,
        log_every=a.log_every,
    )
    print(json.dumps(result, indent=2))
    goal = result["psnr_unseen_views"] >= 30.0 and result["psnr_unseen_times"] >= 30.0
    print(f"GOAL (>= 30 dB on unseen views and unseen times): {'MET' if goal else 'NOT MET'}")
    return result


if __name__ == "__main__":
    main()
