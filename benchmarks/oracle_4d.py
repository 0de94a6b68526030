"""End-to-end oracle run: the real a124-system recovers a known 4D scene from score distillation alone.

``configs/animate124-oracle.yaml`` runs the real ``a124-system`` through threestudio (``load_config`` + a Lightning
Trainer, as ``launch.py``; the extension loaded by launch.py's own custom-module loader via
``animate124.tools.host``, on the CPU when there is no GPU) static -> dynamic from a freshly initialised field, with the oracle guidances of
``animate124/testing/oracle_guidance.py`` in place of SD / Zero123 / the video model. They render the procedural
target (``animate124.testing.synthetic_scene``) from the batch's cameras and frame times with an independent renderer
and return SDS with the exact denoiser. Reference-view losses are weighted 0.

Scored against the target with the learned field rendered by our renderer:

* ``psnr_t0_after_static``: unseen views at t = 0, right after the static stage;
* ``psnr_unseen``: unseen views x unseen times (off the training frame-time lattice) after the dynamic stage;
* the same run with ``convention_flip`` (default ``azimuth_sign``) in the oracles only must score clearly worse.

Writes ``oracle_4d.json``, ``compare_strip.png`` (rows: target | ours at unseen views and times) and
``compare_orbit.mp4`` (or .gif; orbit while animating, target | ours) under ``--out``.

GPU (goal: psnr_unseen >= 25 dB, control >= 8 dB lower), from the repo root with a threestudio checkout at $TS:

    THREESTUDIO_ROOT=$TS python benchmarks/oracle_4d.py --out $OUT

A small CPU version runs in tests/integration/test_oracle_4d.py through :func:`run_oracle_4d`.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "animate124-oracle.yaml"


def run_oracle_4d(
    out_dir: str | Path,
    *,
    convention_flip: str = "none",
    static_steps: Optional[int] = None,
    dynamic_steps: Optional[int] = None,
    overrides: Sequence[str] = (),
    lr_scale: float = 1.0,
    n_eval_views: int = 8,
    n_eval_times: int = 5,
    eval_elevations: Sequence[float] = (10.0, 30.0),
    eval_samples: int = 512,
    validate: bool = True,
    write_media: bool = True,
) -> dict:
    """Train with the oracle config, score it, write media; threestudio must be loaded with the extension
    (:func:`load_host`, or the integration tier's ``threestudio`` fixture). ``overrides``: dotted ``key=value`` config overrides
    (as launch.py's command line); ``static_steps`` / ``dynamic_steps`` set the stage lengths and max_steps;
    ``lr_scale`` multiplies every stage learning rate (short runs)."""
    import pytorch_lightning as pl
    import threestudio
    from threestudio.utils.config import load_config

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    run_name = f"oracle-{convention_flip}"
    # 1. config: the oracle recipe; the target's reference view as the (unweighted) reference image
    base = load_config(str(CONFIG), cli_args=[f"data.image_path={out_dir / 'unused'}", *overrides])
    static_steps = static_steps if static_steps is not None else base.system.stages.static.steps
    dynamic_steps = dynamic_steps if dynamic_steps is not None else base.system.stages.dynamic.steps
    ref_path = out_dir / "target_ref_rgba.png"
    cli = [
        f"data.image_path={ref_path}", f"exp_root_dir={out_dir / 'runs'}", f"name={run_name}", "tag=run",
        "use_timestamp=false", f"system.guidances.image.guidance.convention_flip={convention_flip}",
        f"system.stages.static.steps={static_steps}", f"system.stages.dynamic.steps={dynamic_steps}", *overrides,
    ]
    cfg = load_config(str(CONFIG), cli_args=cli)  # trainer.max_steps (and so val_check_interval): the stages' sum
    for stage in cfg.system.stages.values():
        for group in stage.learning_rates:
            stage.learning_rates[group] = float(stage.learning_rates[group]) * lr_scale
    # 2. the host's objects, as launch.py builds them
    pl.seed_everything(cfg.seed)
    from animate124.components.data import filled_data_config

    data_cfg = filled_data_config(cfg.data)
    _write_reference_view(ref_path, data_cfg)  # before the data module, which checks the image exists
    dm = threestudio.find(cfg.data_type)(cfg.data)
    system = threestudio.find(cfg.system_type)(cfg.system)
    system.set_save_dir(os.path.join(cfg.trial_dir, "save"))
    views = _eval_views(n_eval_views, eval_elevations)
    times = _unseen_times(n_eval_times, data_cfg.video.precision)
    evaluator = _StaticStageEval(static_steps, views, data_cfg, eval_samples)
    trainer = pl.Trainer(
        accelerator="gpu" if torch.cuda.is_available() else "cpu", devices=1, logger=False,
        enable_checkpointing=False, callbacks=[evaluator.callback()], inference_mode=False,
        **{**cfg.trainer, **({} if validate else {"limit_val_batches": 0})},
    )
    t0 = time.perf_counter()
    trainer.fit(system, datamodule=dm)
    train_s = time.perf_counter() - t0
    # 3. score unseen views x unseen times
    grid = [(el, az, t) for (el, az) in views for t in times]
    ours, target = _render_pairs(system, grid, data_cfg, eval_samples)
    result = {
        "convention_flip": convention_flip,
        "psnr_unseen": _psnr(ours, target),
        "psnr_t0_after_static": evaluator.psnr,
        "psnr_white_baseline": _psnr(torch.ones_like(target), target),
        "eval_views": views,
        "eval_times": times,
        "stages": [r for cb in trainer.callbacks if hasattr(cb, "records") for r in cb.records],
        "steps": {"static": static_steps, "dynamic": dynamic_steps},
        "train_wall_s": round(train_s, 1),
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "resolution": [data_cfg.height, data_cfg.width],
        "video_frames": data_cfg.video.num_frames,
        "trial_dir": cfg.trial_dir,
    }
    if write_media:
        result["media"] = _write_media(out_dir, run_name, system, data_cfg, ours, target, views, times, eval_samples)
    return result


# ----------------------------------------------------------------------------------------------------------------------
# evaluation


def _eval_views(n: int, elevations: Sequence[float]) -> list[tuple[float, float]]:
    """Azimuths off any round grid (training draws azimuths continuously; these are still never the same camera)."""
    return [(float(elevations[i % len(elevations)]), round(-180.0 + 360.0 * (i + 0.5) / n + 7.0, 3)) for i in range(n)]


def _unseen_times(n: int, precision: int) -> list[float]:
    """Times half-way between training frame-time lattice points (k / precision), spread over [0, 1]."""
    return [(round(precision * (i + 0.5) / n) + 0.5) / precision for i in range(n)]


def _camera_batch(elevation: float, azimuth: float, t: float, data_cfg, device) -> tuple[dict, dict]:
    """One eval camera through the same core camera code as the data module."""
    from animate124.core.render import cameras as cams

    one = lambda v: torch.tensor([float(v)], device=device)  # noqa: E731
    traj = cams.make_trajectory(one(elevation), one(azimuth), one(data_cfg.eval_camera_distance), one(t),
                                data_cfg.eval_fovy_deg)
    rays_o, rays_d = cams.get_rays(traj.c2w, traj.fovy, data_cfg.eval_height, data_cfg.eval_width)
    batch = {"rays_o": rays_o, "rays_d": rays_d, "light_positions": traj.camera_positions * 1.5,
             "frame_times": traj.times}
    angles = {"elevation": traj.elevation_deg, "azimuth": traj.azimuth_deg, "distance": traj.distance,
              "fovy": traj.fovy, "times": traj.times}
    return batch, angles


@torch.no_grad()
def _render_pairs(system, grid, data_cfg, eval_samples: int):
    """Ours (our renderer, learned field) and the target (reference renderer) at (elevation, azimuth, time) triples:
    two [N, H, W, 3] tensors on the CPU."""
    from animate124.testing.oracle import render_target

    renderer, device = system.renderer, system.device
    was_training = renderer.training
    renderer.eval()
    ours, target = [], []
    try:
        for el, az, t in grid:
            batch, a = _camera_batch(el, az, t, data_cfg, device)
            ours.append(renderer(**batch, return_normal=False)["comp_rgb"].clamp(0, 1).float().cpu())
            target.append(render_target(a["elevation"], a["azimuth"], a["distance"], a["fovy"], a["times"],
                                        data_cfg.eval_height, data_cfg.eval_width, n_samples=eval_samples).cpu())
    finally:
        renderer.train(was_training)
    return torch.cat(ours), torch.cat(target)


class _StaticStageEval:
    """Scores unseen views at t = 0 once the static stage has run its last step."""

    def __init__(self, static_steps: int, views, data_cfg, eval_samples: int):
        self.static_steps, self.views, self.data_cfg, self.eval_samples = static_steps, views, data_cfg, eval_samples
        self.psnr: Optional[float] = None

    def callback(self):
        import pytorch_lightning as pl

        outer = self

        class _Callback(pl.Callback):
            def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
                if trainer.global_step == outer.static_steps and outer.psnr is None:
                    grid = [(el, az, 0.0) for el, az in outer.views]
                    ours, target = _render_pairs(pl_module, grid, outer.data_cfg, outer.eval_samples)
                    outer.psnr = _psnr(ours, target)

        return _Callback()


def _psnr(x: torch.Tensor, y: torch.Tensor) -> float:
    return -10.0 * math.log10(max(torch.mean((x - y) ** 2).item(), 1e-12))


# ----------------------------------------------------------------------------------------------------------------------
# media


def _write_reference_view(path: Path, data_cfg) -> None:
    """The target at t = 0 from the data module's reference camera, as RGBA (alpha = opacity)."""
    from PIL import Image

    from animate124.testing.synthetic_scene import orbit_camera_rays, reference_render

    one = lambda v: torch.tensor([float(v)])  # noqa: E731
    h, w = data_cfg.height, data_cfg.width
    o, d = orbit_camera_rays(one(data_cfg.default_elevation_deg), one(data_cfg.default_azimuth_deg),
                             one(data_cfg.default_camera_distance), torch.deg2rad(one(data_cfg.default_fovy_deg)), h, w)
    rgb, opacity = reference_render(o.reshape(-1, 3), d.reshape(-1, 3), torch.zeros(h * w))
    fg = (rgb - (1 - opacity[:, None])) / opacity[:, None].clamp_min(1e-4)  # un-composite from white
    rgba = torch.cat([fg.clamp(0, 1), opacity[:, None]], -1).view(h, w, 4)
    Image.fromarray((rgba.numpy() * 255).round().astype(np.uint8), "RGBA").save(path)


def _write_media(out_dir: Path, run_name: str, system, data_cfg, ours, target, views, times, eval_samples) -> dict:
    """compare_strip.png: one row per eval view (every other), columns = unseen times, target | ours per cell;
    compare_orbit: the camera orbits while the scene animates, target | ours."""
    import imageio

    to8 = lambda x: (x.clamp(0, 1).numpy() * 255).round().astype(np.uint8)  # noqa: E731
    n_t = len(times)
    rows = []
    for v in range(0, len(views), 2):
        cells = [torch.cat([target[v * n_t + i], ours[v * n_t + i]], 1) for i in range(n_t)]
        rows.append(torch.cat([torch.cat([c, torch.ones(c.shape[0], 2, 3)], 1) for c in cells], 1))
    strip_path = out_dir / f"{run_name}_compare_strip.png"
    imageio.imwrite(strip_path, to8(torch.cat(rows, 0)))
    n_frames = 48
    grid = [(20.0, -180.0 + 360.0 * i / n_frames, i / (n_frames - 1)) for i in range(n_frames)]
    o, t = _render_pairs(system, grid, data_cfg, eval_samples)
    frames = [to8(torch.cat([t[i], o[i]], 1)) for i in range(n_frames)]
    try:
        video_path = out_dir / f"{run_name}_compare_orbit.mp4"
        imageio.mimsave(video_path, frames, fps=12)
    except Exception:  # no ffmpeg writer: a gif is always possible (the failed writer may leave an empty file)
        video_path.unlink(missing_ok=True)
        video_path = out_dir / f"{run_name}_compare_orbit.gif"
        imageio.mimsave(video_path, frames, duration=1 / 12)
    return {"strip": str(strip_path), "video": str(video_path)}


def load_host(root: Optional[str]) -> None:
    """threestudio from ``root`` (or $THREESTUDIO_ROOT) with this extension, as launch.py loads it."""
    root = root or os.environ.get("THREESTUDIO_ROOT")
    if not root or not (Path(root) / "launch.py").is_file():
        raise SystemExit(f"oracle_4d: no threestudio checkout at {root!r}: pass --threestudio-root DIR or set "
                         "THREESTUDIO_ROOT to a folder holding launch.py")
    sys.path.insert(0, str(REPO))
    from animate124.tools.host import load_extension, use_cpu

    load_extension(Path(root))
    use_cpu()


def main(argv: Optional[list[str]] = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--threestudio-root", default=None, help="threestudio checkout (default $THREESTUDIO_ROOT)")
    p.add_argument("--out", default=os.environ.get("OUT", "oracle_4d_out"), help="results folder (default $OUT)")
    p.add_argument("--static-steps", type=int, default=None, help="default: the config's")
    p.add_argument("--dynamic-steps", type=int, default=None, help="default: the config's")
    p.add_argument("--control-flip", default="azimuth_sign",
                   help="convention flip of the control run: azimuth_sign | frame_order | time_reversed | none (skip)")
    p.add_argument("--runs", default="oracle,control",
                   help="which runs: oracle, control or both; a run missing here is taken from --out's "
                        "oracle_4d.json when an earlier call left it there (runs can be split over calls)")
    p.add_argument("--lr-scale", type=float, default=1.0, help="multiplies every stage learning rate")
    p.add_argument("--set", nargs="*", default=[], help="extra config overrides, key=value")
    a = p.parse_args(argv)
    load_host(a.threestudio_root)
    common = dict(static_steps=a.static_steps, dynamic_steps=a.dynamic_steps, overrides=a.set, lr_scale=a.lr_scale)
    out = Path(a.out) / "oracle_4d.json"
    wanted = {name.strip() for name in a.runs.split(",") if name.strip()}
    if not wanted or not wanted <= {"oracle", "control"}:
        raise SystemExit(f"oracle_4d: --runs {a.runs!r}: give oracle, control or oracle,control")
    runs: dict = {}
    if out.is_file():  # runs of an earlier call with the same --out
        earlier = json.loads(out.read_text())
        runs = {name: earlier[name] for name in ("oracle", "control") if name in earlier and name not in wanted}
    plan = [("oracle", "none")] + ([("control", a.control_flip)] if a.control_flip != "none" else [])
    plan = [(name, flip) for name, flip in plan if name in wanted]
    result = dict(runs)
    for name, flip in plan:  # each run is reported and saved as soon as it ends
        r = runs[name] = run_oracle_4d(a.out, **({"convention_flip": flip} if flip != "none" else {}), **common)
        print(f"{name:8s} flip={r['convention_flip']:13s} PSNR unseen views x times {r['psnr_unseen']:.2f} dB, "
              f"t=0 after static {r['psnr_t0_after_static']:.2f} dB (white {r['psnr_white_baseline']:.2f}), "
              f"train {r['train_wall_s']} s on {r['device']}", flush=True)
        result = dict(runs)
        if "oracle" in runs and "control" in runs:
            result["control_gap_db"] = runs["oracle"]["psnr_unseen"] - runs["control"]["psnr_unseen"]
        out.write_text(json.dumps(result, indent=2))
    if "oracle" not in runs:
        print(f"wrote {out} (no oracle run yet: --runs oracle)")
        return result
    goal = runs["oracle"]["psnr_unseen"] >= 25.0 and result.get("control_gap_db", 0.0) >= 8.0
    print(f"wrote {out}")
    print(f"GOAL (>= 25 dB unseen views x times, control >= 8 dB lower): {'MET' if goal else 'NOT MET'}")
    return result


if __name__ == "__main__":
    main()
