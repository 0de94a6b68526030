"""Hash-grid backward on the points a training step really sends: ray-marched samples, ray after ray.

The dynamic stage's profile (``benchmark --profile``) spent more GPU time in the Triton hash-grid backward than
in everything else: five times its forward. Random points in [0, 1]^D (``hashgrid_speed.py``) do not show why: the
samples of one ray follow each other in memory and share the cells of the coarse levels, so their atomic adds
queue on the same addresses. This script times the backward on such samples (rays of a 128^2 camera through a
ball, F frames at their own times for D = 4), on the same samples shuffled, and on uniform points, for the plain
kernel and with ``KernelConfig.merge_runs_max_res`` (runs of equal rows summed before one atomic add) at several
thresholds; and per level (cumulative ``n_active`` levels). Medians of CUDA-event times; JSON out. Only the ratios
within one run mean something across machines.

    python benchmarks/hashgrid_backward.py --out hashgrid_backward.json      # on a GPU
    TRITON_INTERPRET=1 python benchmarks/hashgrid_backward.py --smoke        # CPU: tiny, checks the gradients agree
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from animate124.core.field import hashgrid_triton as ht  # noqa: E402
from animate124.core.field.grid_levels import level_table  # noqa: E402
from animate124.core.field.hashgrid import HashGridEncoding  # noqa: E402

CONFIG = dict(n_levels=16, n_features_per_level=2, log2_hashmap_size=19, base_resolution=16,
              per_level_scale=1.447269237440378)


def ray_samples(dims: int, frames: int, pixels: int, radius: float = 0.5, step: float = 0.01353,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """Samples inside a ball of ``radius`` (world units, bbox [-1, 1]^3) along the rays of a ``pixels``^2 camera at
    distance 2.5, fov 40 degrees, one random view per frame; ray after ray, as the marcher packs them. Returns
    [N, dims] in [0, 1] (x mapped from the bbox; the 4th coordinate the frame's time)."""
    out = []
    for f in range(frames):
        theta, phi = torch.rand(2, generator=generator) * torch.tensor([math.pi / 2, 2 * math.pi]) - torch.tensor(
            [math.pi / 4, 0.0])
        eye = 2.5 * torch.stack([theta.cos() * phi.cos(), theta.cos() * phi.sin(), theta.sin()])
        forward = -eye / eye.norm()
        right = torch.nn.functional.normalize(torch.linalg.cross(forward, torch.tensor([0.0, 0.0, 1.0])), dim=0)
        up = torch.linalg.cross(right, forward)
        half = math.tan(math.radians(20))
        u = (torch.arange(pixels) + 0.5) / pixels * 2 - 1
        dirs = forward + half * (u.view(1, -1, 1) * right + -u.view(-1, 1, 1) * up)
        dirs = torch.nn.functional.normalize(dirs.reshape(-1, 3), dim=-1)
        # distances along each ray where it is inside the ball, stepped from the first sample in
        b = (eye * dirs).sum(-1)
        disc = b * b - (eye * eye).sum() + radius * radius
        hit = disc > 0
        near = (-b - disc.clamp(min=0).sqrt())[hit]
        far = (-b + disc.clamp(min=0).sqrt())[hit]
        k = torch.arange(int(2 * radius / step) + 1)
        ts = near[:, None] + step * k[None, :]
        keep = ts < far[:, None]
        pts = eye + dirs[hit][:, None, :] * ts[..., None]
        pts = pts[keep]
        if dims == 4:
            pts = torch.cat([pts, torch.full((pts.shape[0], 1), f / max(frames - 1, 1))], -1)
        out.append(pts)
    pts = torch.cat(out)
    pts[:, :3] = (pts[:, :3] + 1) / 2
    return pts[:, :dims].clamp(0, 1).contiguous()


def main() -> None:
    args = _parse()
    cuda = torch.cuda.is_available() and not args.smoke
    device = torch.device("cuda" if cuda else "cpu")
    config = CONFIG if cuda else dict(CONFIG, n_levels=6, log2_hashmap_size=12)
    frames, pixels = (16, 128) if cuda else (2, 12)
    gen = torch.Generator().manual_seed(0)
    results = {"device": torch.cuda.get_device_name() if cuda else "cpu", "torch": torch.__version__,
               "triton": __import__("triton").__version__, "config": config, "rows": [], "levels": []}
    for d in args.dims:
        enc = HashGridEncoding(d, **config, implementation="torch", generator=gen).to(device)
        table = level_table(enc.levels, device)
        rays = ray_samples(d, frames, pixels, generator=gen).to(device)
        n = rays.shape[0]
        orders = {"rays": rays, "shuffled": rays[torch.randperm(n, generator=gen).to(device)],
                  "uniform": torch.rand(n, d, generator=gen).to(device)}
        grad_out = torch.randn(n, enc.n_output_dims, generator=gen).to(device)
        print(f"D={d}: {n} samples ({frames} frames of {pixels}^2 rays through a ball)")
        _, reference = _time_backward(rays, enc, table, grad_out, ht.KernelConfig(merge_runs_max_res=0),
                                      enc.n_levels, argparse.Namespace(warmup=0, repeats=1))
        for order, x in orders.items():
            for merge in args.merge:
                cfg = ht.KernelConfig(merge_runs_max_res=merge)
                ms, grad = _time_backward(x, enc, table, grad_out, cfg, enc.n_levels, args)
                rel = ((grad - reference).abs().max() / reference.abs().max()).item() if order == "rays" else None
                row = {"dims": d, "order": order, "merge_runs_max_res": merge, "points": n, "backward_ms": ms,
                       "max_rel_diff_vs_plain": rel}
                results["rows"].append(row)
                print(f"  {order:9s} merge<= {merge:7d}: backward {ms:8.3f} ms"
                      + (f"  (rel diff {rel:.1e})" if rel is not None else ""))
        for merge in (0, args.merge[-1]):  # cumulative over the active levels: noisy per level, read the trend
            cfg = ht.KernelConfig(merge_runs_max_res=merge)
            for active in range(1, enc.n_levels + 1):
                ms, _ = _time_backward(rays, enc, table, grad_out, cfg, active, args)
                results["levels"].append({"dims": d, "merge_runs_max_res": merge, "n_active": active,
                                          "resolution": int(enc.levels.resolutions[active - 1]), "backward_ms": ms})
            cum = [r["backward_ms"] for r in results["levels"] if r["dims"] == d and r["merge_runs_max_res"] == merge]
            print(f"  per level (merge<= {merge}), ms:", " ".join(f"{b - a:.2f}" for a, b in zip([0.0] + cum, cum)))
        del enc, orders, grad_out
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1))


def _time_backward(x, enc, table, grad_out, cfg, n_active, args):
    """Median ms of the backward alone (forward outside the timed window); and the embeddings' gradient."""
    emb = enc.embeddings.detach().requires_grad_(True)
    times = []
    for i in range(args.warmup + args.repeats):
        out = ht.hash_grid_encode_triton(x, emb, enc.levels, n_active, table, cfg)
        emb.grad = None
        if x.is_cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            out.backward(grad_out)
            end.record()
            torch.cuda.synchronize()
            if i >= args.warmup:
                times.append(start.elapsed_time(end))
        else:
            out.backward(grad_out)
            times.append(0.0)
    return round(statistics.median(times), 3), emb.grad


def _parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dims", type=int, nargs="+", default=[3, 4])
    parser.add_argument("--merge", type=int, nargs="+", default=[0, 64, 160, 1 << 20],
                        help="merge_runs_max_res values (0 = plain atomics)")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--smoke", action="store_true", help="tiny CPU run (set TRITON_INTERPRET=1)")
    parser.add_argument("--out", default="")
    args = parser.parse_args()
    if args.smoke:
        args.repeats, args.warmup = 1, 0
    return args


if __name__ == "__main__":
    main()
