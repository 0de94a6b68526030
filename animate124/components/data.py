"""``a124-image-video-datamodule``: the reference view, random t = 0 cameras and moving-camera video clips.

Every training batch holds three parts, so one data module serves every stage (the system picks what it renders):

* ``ref``: the reference view at t = 0 with its RGB (composited on white), mask and optional depth;
* ``random``: random cameras at t = 0 for the image / 3-D priors (SD, Zero123);
* ``video``: one clip of F frames, each with its own camera and frame time (upstream frame-time sampler; moving
  camera whose azimuth really moves by the azimuth delta, fixing upstream's elevation-delta bug).

Validation renders an orbit while animating (64 frames by default); test renders turntables at fixed times, the
front view over time and the orbit while animating. Cameras and rays come from the core (``core/render/cameras.py``,
tested against the host's helpers); projection / mvp matrices from the host.

Training rays are made on the training device: the loader's batches carry ``rays_pending`` instead of
``rays_o`` / ``rays_d``, and the data module's ``on_after_batch_transfer`` (which Lightning calls after moving the
batch) makes them. Iterating ``train_dataloader()`` outside Lightning, call :func:`complete_rays` on each batch.
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass, field
from typing import List, Optional, Tuple

import numpy as np
import pytorch_lightning as pl
import threestudio
import torch
from omegaconf import OmegaConf
from PIL import Image
from threestudio.utils.base import Updateable
from threestudio.utils.ops import get_mvp_matrix, get_projection_matrix
from torch.utils.data import DataLoader, Dataset, IterableDataset

from animate124.components import preflight
from animate124.components.choices import check_choice
from animate124.core.io.images import normalise_mode
from animate124.core.render import cameras as cams
from animate124.core.render.frame_times import sample_frame_times


@dataclass
class RandomCameraConfig:
    batch_size: int = 1
    height: int = 128
    width: int = 128
    elevation_range: Tuple[float, float] = (-45.0, 45.0)
    azimuth_range: Tuple[float, float] = (-180.0, 180.0)
    distance_range: Tuple[float, float] = (2.5, 2.5)
    fovy_range: Tuple[float, float] = (40.0, 40.0)
    uniform_sphere_prob: float = 0.5


@dataclass
class VideoClipConfig:
    num_frames: int = 16
    height: int = 128
    width: int = 128
    precision: int = 256
    """Frame times lie on a lattice of 1/precision (upstream 256)."""
    zero_rate: float = 0.2
    """Probability that a clip starts at t = 0 (halved by the mirror: P(flagged start at 0) = 0.1)."""
    mirror_prob: float = 0.5
    elevation_range: Tuple[float, float] = (-45.0, 45.0)
    azimuth_range: Tuple[float, float] = (-180.0, 180.0)
    distance_range: Tuple[float, float] = (2.5, 2.5)
    fovy: float = 40.0
    elevation_delta_range: Tuple[float, float] = (-0.703125, 0.703125)
    """Per-frame (or total, see delta_mode) elevation change in degrees (upstream threestudio: +-180/256 per frame)."""
    azimuth_delta_range: Tuple[float, float] = (-5.625, 5.625)
    """Per-frame (or total) azimuth change in degrees (upstream threestudio: +-180/32 per frame)."""
    distance_delta_range: Tuple[float, float] = (0.0, 0.0)
    delta_mode: str = "per_frame"
    """per_frame | total: whether the delta ranges are per frame or for the whole clip."""
    fixed_camera_prob: float = 0.0
    """Probability of a still camera for the whole clip (upstream main: 0.1)."""

    def __post_init__(self) -> None:
        check_choice("a124-image-video-datamodule", "video.delta_mode", self.delta_mode, ("per_frame", "total"))


@dataclass
class ImageVideoDataModuleConfig:
    image_path: str = ""
    """The preprocessed RGBA image (``animate124 preprocess`` writes rgba.png)."""
    depth_path: Optional[str] = None
    """Optional relative depth (8-bit, larger = nearer, as ``animate124 preprocess`` writes); enables the depth loss."""
    height: int = 128
    width: int = 128
    default_elevation_deg: float = 0.0
    default_azimuth_deg: float = 0.0
    default_camera_distance: float = 2.5
    default_fovy_deg: float = 40.0
    rays_noise_scale: float = 2e-3
    random_camera: RandomCameraConfig = field(default_factory=RandomCameraConfig)
    video: VideoClipConfig = field(default_factory=VideoClipConfig)
    eval_height: int = 256
    eval_width: int = 256
    eval_elevation_deg: float = 0.0
    eval_camera_distance: float = 2.5
    eval_fovy_deg: float = 40.0
    n_val_frames: int = 64
    """Validation renders an orbit while animating with this many frames (saved as a video)."""
    n_test_views: int = 120
    """Views of each test turntable."""
    test_turntable_times: List[float] = field(default_factory=lambda: [0.0, 0.5, 1.0])
    n_test_frames: int = 64
    """Frames of the fixed front view over time and of the orbit while animating."""
    seed: int = 0


RAYS_PENDING = "rays_pending"
"""Key of a camera batch whose rays are still to be made: its value holds the ray offsets ([2, 3], zeros without ray
noise), drawn when the batch was collated so the seeded draws stay in order."""


def _camera_batch(traj: cams.CameraTrajectory, height: int, width: int, noise: float = 0.0, generator=None,
                  defer_rays: bool = False) -> dict:
    """Host-style camera batch (rays, mvp, angles, lights) for a trajectory: rays from the core (seeded ray noise),
    projection / mvp matrices from the host's helpers. ``defer_rays``: leave the rays to :func:`complete_rays`."""
    fovy, c2w = traj.fovy, traj.c2w
    offsets = cams.ray_offsets(noise, generator) if noise > 0 else torch.zeros(2, 3)  # adding zeros changes nothing
    rays = {RAYS_PENDING: offsets} if defer_rays else dict(zip(("rays_o", "rays_d"), cams.get_rays(
        c2w, fovy, height, width, offsets=offsets)))
    proj = get_projection_matrix(fovy, width / height, 0.01, 100.0)
    positions = traj.camera_positions
    return {
        **rays,
        "mvp_mtx": get_mvp_matrix(c2w, proj),
        "proj_mtx": proj,
        "c2w": c2w,
        "camera_positions": positions,
        "light_positions": positions * 1.5,
        "elevation": traj.elevation_deg,
        "azimuth": traj.azimuth_deg,
        "camera_distances": traj.distance,
        "fovy": fovy,
        "frame_times": traj.times,
        "height": height,
        "width": width,
    }


def load_reference(cfg: ImageVideoDataModuleConfig) -> dict:
    """RGB on white [1,H,W,3], mask [1,H,W,1] (alpha > 0.5) and optional depth [1,H,W,1] in [0, 1]."""
    if not cfg.image_path or not os.path.isfile(cfg.image_path):
        raise ValueError(
            f"data.image_path={cfg.image_path!r} is not a file: point it at an rgba.png "
            "(make one with `animate124 preprocess IMAGE --out DIR`)"
        )
    image = Image.open(cfg.image_path)
    rgba = normalise_mode(image)  # gray + alpha, palette transparency, 16 bits: 8-bit RGBA
    if rgba.mode != "RGBA":
        raise ValueError(
            f"data.image_path={cfg.image_path!r} has no alpha channel (mode {image.mode}): run "
            "`animate124 preprocess` to remove the background"
        )
    rgba = np.asarray(rgba.resize((cfg.width, cfg.height), Image.BILINEAR), dtype=np.float32) / 255.0
    rgba = torch.from_numpy(rgba)[None]
    alpha = rgba[..., 3:]
    out = {"rgb": rgba[..., :3] * alpha + (1 - alpha), "mask": alpha > 0.5}
    if cfg.depth_path:
        if not os.path.isfile(cfg.depth_path):
            raise ValueError(f"data.depth_path={cfg.depth_path!r} is not a file: fix the path or set it to null")
        # a 16-bit depth map is scaled from its bit depth (convert("L") alone clips it at 255)
        depth = normalise_mode(Image.open(cfg.depth_path)).convert("L").resize((cfg.width, cfg.height), Image.BILINEAR)
        out["ref_depth"] = torch.from_numpy(np.asarray(depth, dtype=np.float32) / 255.0)[None, ..., None]
    return out


def complete_rays(batch: dict) -> dict:
    """Make the rays of every camera batch (nested dicts too) that :func:`_camera_batch` deferred, on the device of
    its ``c2w``; in place, and returns ``batch``. Batches with rays are left as they are."""
    for value in batch.values():
        if isinstance(value, dict):
            complete_rays(value)
    offsets = batch.pop(RAYS_PENDING, None)
    if offsets is not None:
        batch["rays_o"], batch["rays_d"] = cams.get_rays(
            batch["c2w"], batch["fovy"], int(batch["height"]), int(batch["width"]), offsets=offsets)
    return batch


class ClipIterableDataset(IterableDataset, Updateable):
    """Endless training batches: ``{"ref": ..., "random": ..., "video": ...}`` (see the module docstring)."""

    def __init__(self, cfg: ImageVideoDataModuleConfig, reference: dict, rank: int = 0) -> None:
        super().__init__()
        self.cfg = cfg
        self.reference = reference
        self.generator = torch.Generator().manual_seed(cfg.seed + rank)  # each process of a run draws its own clips
        ref_traj = cams.make_trajectory(
            torch.tensor([cfg.default_elevation_deg]),
            torch.tensor([cfg.default_azimuth_deg]),
            torch.tensor([cfg.default_camera_distance]),
            torch.zeros(1),
            cfg.default_fovy_deg,
        )
        self.ref_traj = ref_traj

    def __iter__(self):
        while True:
            yield {}

    def collate(self, _batch, defer_rays: bool = False) -> dict:
        """One training batch. ``defer_rays``: leave the rays to :func:`complete_rays` (the data module's
        ``on_after_batch_transfer`` makes them on the training device: 16 x 128 x 128 rays cost about 65 ms per
        camera batch on a GPU machine's CPU, three per step, while the GPU waited)."""
        cfg, g = self.cfg, self.generator
        ref = _camera_batch(self.ref_traj, cfg.height, cfg.width, cfg.rays_noise_scale, g, defer_rays)
        ref.update(self.reference)
        rc = cfg.random_camera
        random = cams.sample_random_cameras(
            rc.batch_size, 0.0, rc.elevation_range, rc.azimuth_range, rc.distance_range, rc.fovy_range,
            rc.uniform_sphere_prob, generator=g,
        )
        vc = cfg.video
        clip = sample_frame_times(vc.num_frames, vc.precision, vc.zero_rate, vc.mirror_prob, generator=g)
        traj = cams.sample_clip_trajectory(
            clip.times, vc.elevation_range, vc.azimuth_range, vc.distance_range, vc.fovy, vc.elevation_delta_range,
            vc.azimuth_delta_range, vc.distance_delta_range, vc.delta_mode, vc.fixed_camera_prob, generator=g,
        )
        video = _camera_batch(traj, vc.height, vc.width, defer_rays=defer_rays)
        video["start_from_zero"] = clip.start_from_zero
        return {"ref": ref, "random": _camera_batch(random, rc.height, rc.width, defer_rays=defer_rays), "video": video}


class TrajectoryDataset(Dataset):
    """Evaluation views: one item per (trajectory, index), host-style keys plus ``trajectory`` and ``index``."""

    def __init__(self, cfg: ImageVideoDataModuleConfig, split: str) -> None:
        super().__init__()
        self.cfg = cfg
        common = dict(elevation_deg=cfg.eval_elevation_deg, distance=cfg.eval_camera_distance, fovy_deg=cfg.eval_fovy_deg)
        if split == "val":
            self.trajectories = {"orbit": cams.orbit_while_animating(cfg.n_val_frames, **common)}
        else:
            self.trajectories = {
                f"turntable-t{t:g}": cams.turntable(cfg.n_test_views, time=float(t), **common)
                for t in cfg.test_turntable_times
            }
            self.trajectories["front-over-time"] = cams.fixed_view(
                cfg.n_test_frames, azimuth_deg=cfg.default_azimuth_deg, **common
            )
            self.trajectories["orbit"] = cams.orbit_while_animating(cfg.n_test_frames, **common)
        self.items = [(name, i) for name, traj in self.trajectories.items() for i in range(len(traj))]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, idx: int) -> dict:
        name, i = self.items[idx]
        traj = self.trajectories[name]
        one = cams.CameraTrajectory(*(getattr(traj, f)[i : i + 1] for f in (
            "elevation_deg", "azimuth_deg", "distance", "fovy_deg", "c2w", "times")))
        batch = _camera_batch(one, self.cfg.eval_height, self.cfg.eval_width)
        batch = {k: (v[0] if torch.is_tensor(v) else v) for k, v in batch.items()}
        batch.update({"index": i, "trajectory": name, "n_views": len(traj)})
        return batch


def _global_rank(trainer) -> int:
    """This process's rank among all processes of the run (all machines): the trainer's when it is attached, else the
    launcher's variables (a local rank alone would repeat the clips of another machine's process)."""
    if trainer is not None:
        return int(trainer.global_rank)
    for name in ("RANK", "SLURM_PROCID", "LOCAL_RANK"):
        if os.environ.get(name, "").isdigit():
            return int(os.environ[name])
    return 0


def filled_data_config(cfg=None) -> ImageVideoDataModuleConfig:
    """``cfg`` merged onto the structured defaults (nested sections keep theirs; unknown keys raise), unchecked."""
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(ImageVideoDataModuleConfig), cfg or {}))


@threestudio.register("a124-image-video-datamodule")
class ImageVideoDataModule(pl.LightningDataModule):
    cfg: ImageVideoDataModuleConfig

    def __init__(self, cfg=None) -> None:
        super().__init__()
        self.cfg = filled_data_config(cfg)
        preflight.check_data(self.cfg)  # built before the system: its problems before any model loads

    def setup(self, stage: Optional[str] = None) -> None:
        if stage in (None, "fit"):
            preflight.check_data(self.cfg)  # again before step 0 (files written or removed since)
            self.train_dataset = ClipIterableDataset(self.cfg, load_reference(self.cfg),
                                                     rank=_global_rank(getattr(self, "trainer", None)))
        if stage in (None, "fit", "validate"):
            self.val_dataset = TrajectoryDataset(self.cfg, "val")
        if stage in (None, "test", "predict"):
            self.test_dataset = TrajectoryDataset(self.cfg, "test")

    def train_dataloader(self) -> DataLoader:
        # num_workers 0: the host updates datasets in place between steps
        return DataLoader(self.train_dataset, batch_size=None, num_workers=0,
                          collate_fn=functools.partial(self.train_dataset.collate, defer_rays=True))

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        # the training batches' rays, made on the device the batch was moved to
        return complete_rays(batch) if isinstance(batch, dict) else batch

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_dataset, batch_size=1, num_workers=0)

    def test_dataloader(self) -> DataLoader:
        return DataLoader(self.test_dataset, batch_size=1, num_workers=0)

    def predict_dataloader(self) -> DataLoader:
        return DataLoader(self.test_dataset, batch_size=1, num_workers=0)
