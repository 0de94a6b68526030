"""A trial folder in threestudio's layout whose contents are known: the synthetic 4D scene's renders and export.

For the results page's tests and its documentation screenshots: ``configs/parsed.yaml`` (prompts, the input image),
``stages.json`` (three stages with fixed numbers, test and export passes), ``csv_logs/version_0/metrics.csv`` (loss
curves of known shape), ``save/it{STEP}-val.mp4`` and ``save/it{STEP}-test-front-over-time.mp4`` (the scene rendered
by ``synthetic_scene.reference_render``) and ``save/it{STEP}-export/`` (the scene's analytic density exported as the
exporter does: ``mesh.glb`` and ``mesh/*.obj``).
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import torch

from animate124.core.export.mesh_export import build_mesh_animation
from animate124.core.export.writers import write_mesh_sequence, write_morph_glb
from animate124.testing.synthetic_scene import SURFACE_DENSITY, blobs_scene, orbit_camera_rays, reference_render

__all__ = ["STEP", "STAGES", "write_synthetic_trial", "loss_value"]

STEP = 120
STAGES = [  # (name, steps, wall_time_s, median_step_s, peak_vram_gb)
    ("static", 40, 95.5, 0.512, 7.25),
    ("dynamic", 50, 2400.0, 1.25, 18.5),
    ("refine", 30, 4000.0, 2.5, 20.25),
]
TERMS = ("loss", "loss_rgb", "loss_video:loss_sds")


def loss_value(term: str, step: int) -> float:
    """The logged value of ``train/{term}`` at ``step`` (decaying curves that jump at each stage start)."""
    index = TERMS.index(term)
    return (1.0 + index) * math.exp(-step / 60.0) + 0.1 * (step >= 40) + 0.2 * (step >= 90) + 0.01 * (step % 7)


def write_synthetic_trial(trial: str | Path, frames: int = 16, video_size: int = 64, resolution: int = 40,
                          n_times: int = 6) -> Path:
    """Write the trial folder (module docstring) and return its path."""
    import imageio

    trial = Path(trial)
    save = trial / "save"
    (trial / "configs").mkdir(parents=True, exist_ok=True)
    (trial / "input").mkdir(exist_ok=True)
    save.mkdir(exist_ok=True)
    # 1. the input image: the reference view (azimuth 0) at t = 0
    image = _render([0.0], [0.0], video_size)[0]
    imageio.imwrite(trial / "input" / "rgba.png", image)
    (trial / "configs" / "parsed.yaml").write_text(
        "name: synthetic\n"
        "data:\n"
        f"  image_path: {trial / 'input' / 'rgba.png'}\n"
        "system:\n"
        "  prompt: two blobs\n"
        "  motion_prompt: a sphere flies over a breathing ellipsoid\n"
    )
    # 2. stage records and the logged losses
    starts = np.cumsum([0] + [s[1] for s in STAGES[:-1]]).tolist()
    records = [{"stage": n, "start_step": a, "end_step": a + s, "steps": s, "wall_time_s": w, "median_step_s": m,
                "peak_vram_gb": v} for (n, s, w, m, v), a in zip(STAGES, starts)]
    (trial / "stages.json").write_text(json.dumps({
        "stages": records, "total_steps": STEP, "stage_starts": starts,
        "test": {"wall_time_s": 61.0, "batches": 3 * frames, "peak_vram_gb": 3.5, "step": STEP},
        "export": {"wall_time_s": 12.5, "batches": 1, "peak_vram_gb": 2.0, "step": STEP},
    }, indent=2))
    logs = trial / "csv_logs" / "version_0"
    logs.mkdir(parents=True, exist_ok=True)
    with open(logs / "metrics.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["epoch", "step", "lr-Adam", *(f"train/{t}" for t in TERMS), "train/stage"])
        for step in range(STEP):
            stage = sum(step >= a for a in starts) - 1
            writer.writerow([0, step, 0.01, *(f"{loss_value(t, step):.6g}" for t in TERMS), stage])
    # 3. videos: an orbit while animating (validation) and the fixed front view over time (test)
    times = [k / (frames - 1) for k in range(frames)]
    orbit = _render([360.0 * k / frames for k in range(frames)], times, video_size)
    front = _render([0.0] * frames, times, video_size)
    imageio.mimsave(save / f"it{STEP}-val.mp4", list(orbit), fps=16)
    imageio.mimsave(save / f"it{STEP}-test-front-over-time.mp4", list(front), fps=16)
    # 4. the export
    export = save / f"it{STEP}-export"
    key_times = [k / (n_times - 1) for k in range(n_times)]
    animation = build_mesh_animation(lambda p, t: blobs_scene(p, t)[0], torch.tensor([[-1.0] * 3, [1.0] * 3]),
                                     key_times, resolution=resolution, threshold=SURFACE_DENSITY,
                                     color_fn=lambda p, t: blobs_scene(p, t)[1])
    if not animation.morph_ok:
        raise RuntimeError(f"the synthetic scene's export did not track: {animation.reason}")
    base = animation.meshes[0]
    write_morph_glb(export / "mesh.glb", base.vertices, base.faces, animation.tracked.frame_vertices,
                    base.vertex_colors, [t * 63 / 16 for t in key_times],
                    extras={"fps": 16.0, "clip_frames": 64, "frame_times": key_times})
    write_mesh_sequence(export / "mesh", animation.meshes)
    return trial


def _render(azimuths: list[float], times: list[float], size: int) -> np.ndarray:
    """uint8 [B, size, size, 3] renders on white at elevation 15 degrees, distance 2.6, 40 degrees field of view."""
    n = len(azimuths)
    o, d = orbit_camera_rays(torch.full((n,), 15.0), torch.tensor(azimuths, dtype=torch.float32),
                             torch.full((n,), 2.6), torch.full((n,), math.radians(40.0)), size, size)
    t = torch.tensor(times, dtype=torch.float32)[:, None, None].expand(n, size, size)
    rgb, _ = reference_render(o.reshape(-1, 3), d.reshape(-1, 3), t.reshape(-1), n_samples=96)
    return (rgb.reshape(n, size, size, 3).clamp(0, 1).numpy() * 255).round().astype(np.uint8)
