"""Export fidelity against a known answer: fit a DynamicField to the synthetic 4D scene, export it, compare each
exported time's mesh with the scene's analytic surface.

1. Fit. A ``DynamicField`` regresses the analytic density and colour of
   ``animate124.testing.synthetic_scene.blobs_scene`` (a sphere moving along an arc, a breathing ellipsoid) at random
   points of [-0.8, 0.8]^3 and random times in [0, 1] (loss: MSE of density / 20, plus the colour MSE weighted by
   the true density / 20).
2. Export, as the ``a124-mesh-sequence-exporter`` does: marching cubes at each time over the bbox [-1, 1]^3 at the
   scene's surface density 10, the t = 0 mesh tracked through them, written as the animated ``.glb`` and the OBJ
   sequence (y up).
3. Read the files back (the ``.glb``'s keyframe meshes = base + one-hot morph targets; the OBJs with trimesh), map
   them back to the training frame and score every time t_k against the analytic surface at t_k:
   * the symmetric Chamfer distance (mean of the two one-sided mean nearest-neighbour distances between area-uniform
     samples of the mesh and of the analytic surface), in voxels of the export grid;
   * the moving sphere's motion: the displacement of its component's area-weighted centroid between consecutive
     times minus the analytic displacement, in voxels.
   The control reverses the order of the exported frames (frame k scored against t_{N-1-k}): it must score clearly
   worse. Tolerances (``TOLERANCES``): Chamfer <= 0.5 voxel at every time, displacement error <= 0.5 voxel, the
   reversed control's mean Chamfer >= 4 x the export's and >= 2 voxels.

CPU version (tests/unit/test_export_fidelity.py): ``run_fidelity(**CPU_CONFIG)``. Full size on a GPU:

    python benchmarks/export_fidelity.py --device cuda --out /tmp/fidelity
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from typing import Optional

import numpy as np
import torch

from animate124.core.export.fidelity import chamfer, sample_mesh_surface
from animate124.core.export.mesh_export import build_mesh_animation, component_centroids
from animate124.core.export.writers import from_y_up, read_morph_glb, write_mesh_sequence, write_morph_glb
from animate124.core.field.dynamic_field import DynamicField, features_to_rgb
from animate124.testing.synthetic_scene import SURFACE_DENSITY, blobs_scene, blobs_surface_points, sphere_center

TOLERANCES = {"chamfer_voxels": 0.5, "displacement_voxels": 0.5, "reversed_ratio": 4.0, "reversed_min_voxels": 2.0}
CPU_CONFIG = dict(device="cpu", steps=400, batch=4096, n_levels=8, log2_hashmap_size=16, base_resolution=8,
                  per_level_scale=1.5, mlp_hidden=32, implementation="torch", resolution=48, n_times=4,
                  samples=20000)
FULL_CONFIG = dict(steps=3000, batch=2**16, n_levels=16, log2_hashmap_size=19, base_resolution=16,
                   per_level_scale=1.447269237440378, mlp_hidden=64, implementation="auto", resolution=256,
                   n_times=16, samples=200000)
BBOX = ((-1.0, -1.0, -1.0), (1.0, 1.0, 1.0))


def fit_field(*, device: str, steps: int, batch: int, seed: int = 0, lr: float = 1e-2, **field_kwargs) -> DynamicField:
    """A DynamicField regressed onto the synthetic scene's density and colour (module docstring, step 1)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    field = DynamicField(density_bias="none", generator=torch.Generator().manual_seed(seed), **field_kwargs).to(device)
    grids = [field.encoding.embeddings, field.encoding_time.embeddings]
    mlps = list(field.density_network.parameters()) + list(field.feature_network.parameters())
    optim = torch.optim.Adam([{"params": grids, "lr": lr}, {"params": mlps, "lr": lr / 10}], betas=(0.9, 0.99),
                             eps=1e-15)
    for _ in range(steps):
        points = torch.rand(batch, 3, generator=gen, device=device) * 1.6 - 0.8
        times = torch.rand(batch, generator=gen, device=device)
        sigma, rgb = blobs_scene(points, times)
        out = field(points, times)
        inside = sigma / 20.0
        loss = ((out["density"][:, 0] - sigma) / 20.0).square().mean()
        loss = loss + (inside[:, None] * (features_to_rgb(out["features"]) - rgb).square()).mean()
        optim.zero_grad(set_to_none=True)
        loss.backward()
        optim.step()
    return field.eval()


def export_field(field: DynamicField, times: list[float], resolution: int, out_dir: str, device: str) -> dict:
    """The exporter's steps on ``field`` (module docstring, step 2). Returns the paths and the voxel size."""
    bbox = torch.tensor(BBOX, device=device)

    def density(points, t):
        return field.forward_density(points, t)

    def color(points, t):
        return features_to_rgb(field(points, t)["features"])

    animation = build_mesh_animation(density, bbox, times, resolution=resolution, threshold=SURFACE_DENSITY,
                                     color_fn=color, chunk_size=2**16)
    if not animation.morph_ok:
        raise RuntimeError(f"tracking failed, no .glb: {animation.reason}")
    base = animation.meshes[0]
    glb = os.path.join(out_dir, "mesh.glb")
    write_morph_glb(glb, base.vertices, base.faces, animation.tracked.frame_vertices, base.vertex_colors,
                    [t * 63 / 16 for t in times], extras={"fps": 16.0, "clip_frames": 64, "frame_times": times})
    objs = write_mesh_sequence(os.path.join(out_dir, "mesh"), animation.meshes, "obj", "mesh", "y_up")
    return {"glb": glb, "objs": objs, "voxel": base.voxel_size,
            "tracking_error_voxels": animation.tracked.surface_error.tolist()}


def score(files: dict, times: list[float], samples: int, seed: int = 0) -> dict:
    """Chamfer per time, the sphere's displacement errors and the reversed control (module docstring, step 3)."""
    import trimesh

    gen = torch.Generator().manual_seed(seed)
    voxel = files["voxel"]
    glb = read_morph_glb(files["glb"])
    faces = torch.from_numpy(glb.faces)
    glb_frames = [torch.from_numpy(from_y_up(f)) for f in glb.frames]
    obj_meshes = [trimesh.load(p, process=False) for p in files["objs"]]
    obj_frames = [(torch.from_numpy(from_y_up(np.asarray(m.vertices))), torch.from_numpy(np.asarray(m.faces)))
                  for m in obj_meshes]
    truth = [blobs_surface_points(t, samples // 2, gen) for t in times]

    def chamfer_voxels(vertices, tri, reference) -> float:
        return chamfer(sample_mesh_surface(vertices, tri, samples, gen), reference)[2] / voxel

    n = len(times)
    rows = []
    for k, t in enumerate(times):
        rows.append({
            "t": t,
            "seconds": float(glb.keys[k]),
            "chamfer_glb_voxels": chamfer_voxels(glb_frames[k], faces, truth[k]),
            "chamfer_obj_voxels": chamfer_voxels(*obj_frames[k], truth[k]),
            "chamfer_reversed_voxels": chamfer_voxels(glb_frames[n - 1 - k], faces, truth[k]),
        })
    # the sphere: the component whose centroid lies highest in y (the ellipsoid sits at y = -0.35, the sphere above 0)
    centres = [max(component_centroids(v, faces), key=lambda c: c[1]) for v in glb_frames]
    true_centres = sphere_center(torch.tensor(times, dtype=torch.float64)[:, None]).numpy()
    moves = np.diff(np.stack(centres), axis=0)
    true_moves = np.diff(true_centres, axis=0)
    reversed_moves = np.diff(np.stack(centres[::-1]), axis=0)
    for k in range(n - 1):
        rows[k + 1]["displacement_voxels"] = float(np.linalg.norm(true_moves[k]) / voxel)
        rows[k + 1]["displacement_error_voxels"] = float(np.linalg.norm(moves[k] - true_moves[k]) / voxel)
        rows[k + 1]["displacement_error_reversed_voxels"] = float(
            np.linalg.norm(reversed_moves[k] - true_moves[k]) / voxel)
    summary = {
        "max_chamfer_glb_voxels": max(r["chamfer_glb_voxels"] for r in rows),
        "max_chamfer_obj_voxels": max(r["chamfer_obj_voxels"] for r in rows),
        "mean_chamfer_glb_voxels": float(np.mean([r["chamfer_glb_voxels"] for r in rows])),
        "mean_chamfer_reversed_voxels": float(np.mean([r["chamfer_reversed_voxels"] for r in rows])),
        "max_displacement_error_voxels": max(r["displacement_error_voxels"] for r in rows[1:]),
        "min_displacement_error_reversed_voxels": min(r["displacement_error_reversed_voxels"] for r in rows[1:]),
    }
    tol = TOLERANCES
    summary["passed"] = bool(
        summary["max_chamfer_glb_voxels"] <= tol["chamfer_voxels"]
        and summary["max_chamfer_obj_voxels"] <= tol["chamfer_voxels"]
        and summary["max_displacement_error_voxels"] <= tol["displacement_voxels"]
        and summary["mean_chamfer_reversed_voxels"] >= tol["reversed_ratio"] * summary["mean_chamfer_glb_voxels"]
        and summary["mean_chamfer_reversed_voxels"] >= tol["reversed_min_voxels"]
    )
    return {"per_time": rows, "summary": summary, "tolerances": tol}


def run_fidelity(*, device: str = "cpu", resolution: int, n_times: int, samples: int, steps: int, batch: int,
                 out_dir: Optional[str] = None, seed: int = 0, **field_kwargs) -> dict:
    """Fit, export, score. Returns the per-time table, the summary, the timings and the file paths."""
    times = [k / (n_times - 1) for k in range(n_times)]
    t0 = time.perf_counter()
    field = fit_field(device=device, steps=steps, batch=batch, seed=seed, **field_kwargs)
    fit_s = time.perf_counter() - t0
    out_dir = out_dir or tempfile.mkdtemp(prefix="a124-fidelity-")
    os.makedirs(out_dir, exist_ok=True)
    t1 = time.perf_counter()
    with torch.no_grad():
        files = export_field(field, times, resolution, out_dir, device)
    export_s = time.perf_counter() - t1
    result = score(files, times, samples, seed)
    result.update(fit_s=fit_s, export_s=export_s, files=files, resolution=resolution, voxel=files["voxel"],
                  device=torch.cuda.get_device_name() if str(device).startswith("cuda") else "cpu", steps=steps)
    return result


def format_table(result: dict) -> str:
    """The per-time table as Markdown."""
    lines = ["| t | seconds | Chamfer .glb (vox) | Chamfer .obj (vox) | reversed (vox) | sphere moved (vox) | "
             "motion error (vox) | reversed motion error (vox) |", "|---|---|---|---|---|---|---|---|"]
    for r in result["per_time"]:
        moved = (f"{r['displacement_voxels']:.2f} | {r['displacement_error_voxels']:.3f} | "
                 f"{r['displacement_error_reversed_voxels']:.2f}" if "displacement_voxels" in r else "- | - | -")
        lines.append(f"| {r['t']:.3f} | {r['seconds']:.3f} | {r['chamfer_glb_voxels']:.3f} | "
                     f"{r['chamfer_obj_voxels']:.3f} | {r['chamfer_reversed_voxels']:.2f} | {moved} |")
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--size", choices=["full", "cpu"], default="full", help="full: FULL_CONFIG; cpu: the test's")
    p.add_argument("--out", default=None, help="folder for mesh.glb, mesh/*.obj and fidelity.json")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    config = dict(FULL_CONFIG if a.size == "full" else CPU_CONFIG, device=a.device)
    result = run_fidelity(**config, out_dir=a.out, seed=a.seed)
    print(format_table(result))
    print(json.dumps({k: result[k] for k in ("summary", "fit_s", "export_s", "device", "resolution", "voxel")},
                     indent=2))
    if a.out:
        with open(os.path.join(a.out, "fidelity.json"), "w") as f:
            json.dump(result, f, indent=2)
    print(f"PASSED: {result['summary']['passed']}")
    return result


if __name__ == "__main__":
    main()
