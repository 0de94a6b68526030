"""The field's own work in one training step, alone: render forward + backward of a stage's batch through the default
grids, occupancy grid and renderer (no diffusion model), for several normal-query variants in ONE process, steps
interleaved variant by variant, on the initial blob and on a fitted surface; JSON out.

    python benchmarks/field_step.py --out field_step.json [--reps 8] [--shapes blob blobs] [--stages dynamic static]

Per stage, shape and variant: median forward / backward / total ms (CUDA events), peak memory above the resident
state, the work counters (samples per ray, grid queries, normal queries, Triton launches), CUDA kernels of one step
(torch.profiler) and the largest relative difference of every parameter gradient from the first variant's on the same
samples (float summation order only, for exact changes). Variants (geometry keys):

- ``checkpoint``: one ``torch.utils.checkpoint`` per normal offset (``normal_fused=false``), the earlier default;
- ``fused``: the offsets as one point-major query with its own backward (``normal_fused=true``), grids recomputed;
- ``fused-keep``: the same keeping the offsets' grid features (``normal_keep_features_gb``, ``--keep-gb``);
- ``plain``: no checkpointing (``normal_checkpoint=false``: every activation kept; the most memory);
- ``fused-keep-wmin``: ``fused-keep`` with normals only on samples of weight >= 1e-3 (the renderer's
  ``normal_weight_min``; not exact: ``sum w n`` misses at most the skipped weight).

Stages: ``dynamic`` = 16 frames at 16 times, 128 x 128 (the default's video batch); ``static`` = one 128 x 128 view at
t = 0. Shapes: ``blob`` = the initial density (softplus blob, random grids); ``blobs`` = the field fitted to the
synthetic 4-D scene (``step_benchmark.start_shape``). Random weights: honest for time and memory, never for quality.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from animate124.core.field.dynamic_field import DynamicField  # noqa: E402
from animate124.core.field.occupancy import TimeOccupancyGrid  # noqa: E402
from animate124.core.field.work_counters import WorkCounts  # noqa: E402
from animate124.core.render.volrend import render_rays  # noqa: E402
from animate124.testing.synthetic_scene import orbit_camera_rays  # noqa: E402
from step_benchmark import NOTE  # noqa: E402
from step_benchmark.start_shape import fit_field_to_blobs  # noqa: E402
from step_benchmark.work import LaunchCount, stage_work  # noqa: E402

VARIANTS = {
    "checkpoint": dict(normal_checkpoint=True, normal_fused=False, normal_keep_features_gb=0.0),
    "fused": dict(normal_checkpoint=True, normal_fused=True, normal_keep_features_gb=0.0),
    "fused-keep": dict(normal_checkpoint=True, normal_fused=True),  # keep GiB from --keep-gb
    "plain": dict(normal_checkpoint=False, normal_fused=False, normal_keep_features_gb=0.0),
    "fused-keep-wmin": dict(normal_checkpoint=True, normal_fused=True, normal_weight_min=1e-3),
}
RENDER_KNOBS = ("normal_weight_min",)  # render_rays arguments; the others are the field's attributes
STAGES = {"dynamic": (16, 128), "static": (1, 128)}


class Scene:
    """The field, occupancy grid and renderer settings of the default config, on one device."""

    def __init__(self, device, shape: str, seed: int = 0, fit_steps: int = 400, samples: int = 256, levels: int = 16):
        gen = torch.Generator().manual_seed(seed)
        self.field = DynamicField(radius=1.0, normal_checkpoint=True, n_levels=levels, generator=gen).to(device)
        self.grid = TimeOccupancyGrid([-1, -1, -1, 1, 1, 1], resolution=32, n_time_slices=16).to(device)
        self.samples = samples
        self.step = 2 * math.sqrt(3) / samples  # |bbox diagonal| / num_samples_per_ray
        self.fit = fit_field_to_blobs(self.field, steps=fit_steps) if shape == "blobs" else None
        g = torch.Generator(device=device).manual_seed(seed)
        for _ in range(4):  # the occupancy grid as after a run's warm-up updates
            self.grid.update(0, self.field.forward_density, step_size=self.step, warmup_steps=1, n=1, generator=g)
        self.occupied = float(self.grid.binaries.float().mean())

    def rays(self, frames: int, size: int, seed: int):
        g = torch.Generator().manual_seed(seed)
        device = self.field.encoding.embeddings.device
        elev = torch.empty(frames).uniform_(-45, 45, generator=g) if frames > 1 else torch.zeros(1)
        azim = torch.empty(1).uniform_(-180, 180, generator=g) + torch.arange(frames) * 5.625
        o, d = orbit_camera_rays(elev, azim, torch.full((frames,), 2.5), torch.full((frames,), math.radians(40.0)),
                                 size, size)
        times = (torch.arange(frames, dtype=torch.float32) / max(frames - 1, 1)).repeat_interleave(size * size)
        return o.reshape(-1, 3).to(device), d.reshape(-1, 3).to(device), times.to(device)

    def set(self, knobs: dict) -> dict:
        """Set the variant's field attributes; returns its render_rays arguments."""
        for key, value in knobs.items():
            if key not in RENDER_KNOBS:
                setattr(self.field, key, value)
        return {key: knobs[key] for key in RENDER_KNOBS if key in knobs}

    def step_once(self, rays, seed: int, **render):
        """Render with normals, a loss on colour, opacity and normals, backward; returns (forward ms, backward ms)."""
        o, d, t = rays
        gen = torch.Generator(device=o.device).manual_seed(seed)
        events = [torch.cuda.Event(enable_timing=True) for _ in range(3)] if o.is_cuda else None
        if events:
            events[0].record()
        out = render_rays(lambda p, tt, normal: self.field(p, tt, output_normal=normal), o, d, t,
                          num_samples=self.samples,
                          estimator=self.grid, randomized=True, generator=gen, return_normal=True, alpha_thre=0.01,
                          bg_color=torch.ones(3, device=o.device),
                          normal_fn=lambda p, tt, density: self.field.normal(p, tt, density), **render)
        loss = (out.comp_rgb.square().mean() + out.opacity.mean() + out.comp_normal.square().mean()
                + out.density.mean() * 1e-3)
        if events:
            events[1].record()
        loss.backward()
        if events:
            events[2].record()
            torch.cuda.synchronize()
            return events[0].elapsed_time(events[1]), events[1].elapsed_time(events[2])
        return 0.0, 0.0


def run(args) -> dict:
    device = torch.device(args.device)
    result = {"note": NOTE, "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "torch": torch.__version__, "reps": args.reps, "keep_gb": args.keep_gb, "cases": []}
    variants = {name: dict(VARIANTS[name]) for name in args.variants}
    for name in ("fused-keep", "fused-keep-wmin"):
        if name in variants:
            variants[name]["normal_keep_features_gb"] = args.keep_gb
    for shape in args.shapes:
        scene = Scene(device, shape, fit_steps=args.fit_steps, samples=args.samples, levels=args.levels)
        params = list(scene.field.parameters())
        for stage in args.stages:
            frames, size = STAGES[stage]
            size = args.size or size
            rays = scene.rays(frames, size, seed=1)
            rows = {name: {"fwd": [], "bwd": [], "peak_gb": 0.0} for name in variants}
            grads, work, launches = {}, {}, {}
            for name, knobs in variants.items():  # warm-up (Triton compilation), the gradients, counters, kernels
                render = scene.set(knobs)
                for p in params:
                    p.grad = None
                with WorkCounts() as counts:
                    scene.step_once(rays, seed=0, **render)
                grads[name] = [p.grad.detach().clone() for p in params]
                work[name] = stage_work([dict(counts.counts)])
                count = LaunchCount(device)
                count.start()
                scene.step_once(rays, seed=0, **render)
                launches[name] = count.stop()
            for rep in range(args.reps):  # timed, interleaved
                for name, knobs in variants.items():
                    render = scene.set(knobs)
                    for p in params:
                        p.grad = None
                    if device.type == "cuda":
                        torch.cuda.synchronize()
                        resident = torch.cuda.memory_allocated()
                        torch.cuda.reset_peak_memory_stats()
                    f, b = scene.step_once(rays, seed=100 + rep, **render)
                    rows[name]["fwd"].append(f)
                    rows[name]["bwd"].append(b)
                    if device.type == "cuda":
                        peak = (torch.cuda.max_memory_allocated() - resident) / 2**30
                        rows[name]["peak_gb"] = round(max(rows[name]["peak_gb"], peak), 3)
            base = next(iter(variants))
            for name in variants:
                diff = max(float((a - b).abs().max() / b.abs().max().clamp(min=1e-30))
                           for a, b in zip(grads[name], grads[base]))
                fwd, bwd = rows[name]["fwd"], rows[name]["bwd"]
                total = [x + y for x, y in zip(fwd, bwd)]
                case = {"shape": shape, "stage": stage, "variant": name, "knobs": variants[name],
                        "forward_ms": round(statistics.median(fwd), 3) if fwd else None,
                        "backward_ms": round(statistics.median(bwd), 3) if bwd else None,
                        "total_ms": round(statistics.median(total), 3) if total else None,
                        "total_ms_all": [round(x, 3) for x in total], "peak_above_resident_gb": rows[name]["peak_gb"],
                        "grad_max_rel_diff_vs_" + base: diff, "work": work[name], "launches": launches[name],
                        "occupied_fraction": round(scene.occupied, 4), "fit": scene.fit}
                result["cases"].append(case)
                print(f"{shape:6s} {stage:8s} {name:11s} fwd {case['forward_ms']} bwd {case['backward_ms']} total "
                      f"{case['total_ms']} ms, peak +{case['peak_above_resident_gb']} GiB, "
                      f"{work[name].get('samples_per_ray')} smp/ray, {work[name].get('samples', 0) / 1e6:.2f} M smp, "
                      f"kernels {launches[name]}, grad diff {diff:.2e}", flush=True)
            if args.out:
                args.out.write_text(json.dumps(result, indent=2))
        del scene
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--reps", type=int, default=8)
    parser.add_argument("--shapes", nargs="+", default=["blob", "blobs"], choices=("blob", "blobs"))
    parser.add_argument("--stages", nargs="+", default=["dynamic", "static"], choices=tuple(STAGES))
    parser.add_argument("--variants", nargs="+", default=["checkpoint", "fused", "fused-keep", "fused-keep-wmin"],
                        choices=tuple(VARIANTS))
    parser.add_argument("--keep-gb", type=float, default=2.0)
    parser.add_argument("--size", type=int, default=0, help="image size instead of the stage's (CPU tests)")
    parser.add_argument("--samples", type=int, default=256, help="num_samples_per_ray (CPU tests: fewer)")
    parser.add_argument("--levels", type=int, default=16, help="hash-grid levels (CPU tests: fewer)")
    parser.add_argument("--fit-steps", type=int, default=400, help="regression steps of the blobs shape")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.out is not None and args.out.exists():
        parser.error(f"{args.out} exists: choose another --out")
    run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
