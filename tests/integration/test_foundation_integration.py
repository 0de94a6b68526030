"""Foundation components through the real threestudio: launch.py's loader, YAML config parsing, host cameras."""
from __future__ import annotations

import sys

import pytest
import torch

YAML = """
name: a124-foundation-test
tag: t
exp_root_dir: {root}
data_type: random-camera-datamodule
data:
  batch_size: 2
  width: 16
  height: 16
  camera_distance_range: [2.0, 2.2]
  elevation_range: [-10, 30]
  fovy_range: [40, 40]
system_type: a124-system
system:
  geometry_type: a124-4d-volume
  geometry:
    radius: 1.0
    pos_encoding_config:
      n_levels: 4
      log2_hashmap_size: 12
      base_resolution: 8
      per_level_scale: 1.5
      implementation: torch
  renderer_type: a124-time-volume-renderer
  renderer:
    num_samples_per_ray: 32
    occ_n_time_slices: 4
    occ_grid_res: 16
    implementation: torch
"""


def test_extension_loads_through_launch_py(threestudio):
    from animate124.components import REGISTERED_NAMES

    assert "threestudio-animate124" in sys.modules, "launch.py's loader did not import the extension"
    for name in REGISTERED_NAMES:
        assert name in threestudio.__modules__, name


def _build_from_yaml(threestudio, tmp_path):
    from threestudio.utils.config import load_config

    cfg = load_config(YAML.format(root=tmp_path), from_string=True)
    geometry = threestudio.find(cfg.system.geometry_type)(cfg.system.geometry)
    material = threestudio.find("no-material")({"n_output_dims": 3, "color_activation": "sigmoid"})
    background = threestudio.find("solid-color-background")({"color": [1.0, 1.0, 1.0]})
    renderer = threestudio.find(cfg.system.renderer_type)(
        cfg.system.renderer, geometry=geometry, material=material, background=background
    )
    datamodule = threestudio.find(cfg.data_type)(cfg.data)
    datamodule.setup("fit")
    return cfg, geometry, renderer, datamodule


def test_yaml_built_renderer_renders_host_cameras_at_several_times(threestudio, tmp_path):
    torch.manual_seed(0)
    cfg, geometry, renderer, dm = _build_from_yaml(threestudio, tmp_path)
    batch = next(iter(dm.train_dataloader()))
    renderer.train()
    outs = {}
    for t in (0.0, 0.5, 1.0):
        out = renderer(**batch, frame_times=torch.full((2,), t))
        for key in ("comp_rgb", "comp_rgb_fg", "opacity", "depth", "z_variance"):
            assert out[key].shape[:3] == (2, 16, 16), key
            assert torch.isfinite(out[key]).all(), key
        outs[t] = out
    # the blob bias makes a visible object; white background where it is empty
    assert outs[0.0]["opacity"].max() > 0.5
    torch.testing.assert_close(
        outs[0.0]["comp_rgb"], outs[0.0]["comp_rgb_fg"] + (1 - outs[0.0]["opacity"]), rtol=1e-5, atol=1e-5
    )
    # at init the 4-D grid is ~0: all times render (nearly) the same
    assert (outs[0.0]["opacity"] - outs[1.0]["opacity"]).abs().max() < 1e-2
    # gradients reach both grids when the 4-D part is trainable
    loss = outs[1.0]["comp_rgb"].mean()
    loss.backward()
    assert geometry.encoding.embeddings.grad.abs().sum() > 0
    assert geometry.encoding_time.embeddings.grad.abs().sum() > 0


def test_one_call_renders_mixed_frame_times_like_separate_calls(threestudio, tmp_path):
    cfg, geometry, renderer, dm = _build_from_yaml(threestudio, tmp_path)
    with torch.no_grad():
        geometry.encoding_time.embeddings.normal_(0, 0.5)  # make time matter
    renderer.eval()
    batch = next(iter(dm.train_dataloader()))
    with torch.no_grad():
        both = renderer(**batch, frame_times=torch.tensor([0.2, 0.9]))
        first = renderer(**{k: (v[:1] if torch.is_tensor(v) and v.ndim > 0 else v) for k, v in batch.items()},
                         frame_times=torch.tensor([0.2]))
    torch.testing.assert_close(both["comp_rgb"][:1], first["comp_rgb"], rtol=1e-4, atol=1e-4)
    assert "comp_normal" in both and both["comp_normal"].shape == (2, 16, 16, 3)


def test_create_from_itself_and_time_for_host_export(threestudio, tmp_path):
    cfg, geometry, renderer, dm = _build_from_yaml(threestudio, tmp_path)
    with torch.no_grad():
        geometry.encoding_time.embeddings.normal_(0, 0.5)
    cls = threestudio.find("a124-4d-volume")
    copy = cls.create_from(geometry, cfg.system.geometry)
    pts = torch.rand(64, 3) * 2 - 1
    torch.testing.assert_close(copy.forward_density(pts, times=0.7), geometry.forward_density(pts, times=0.7))
    # time-unaware host code sees export_time
    at0 = geometry.forward_field(pts)[0]
    torch.testing.assert_close(at0, geometry.forward_density(pts, times=0.0))
    assert not torch.allclose(geometry.forward_density(pts, times=1.0), at0)
    with pytest.raises(TypeError, match="cannot be created from"):
        cls.create_from(object(), cfg.system.geometry)


def test_coarse_to_fine_levels_follow_the_step(threestudio, tmp_path):
    cfg, geometry, renderer, dm = _build_from_yaml(threestudio, tmp_path)
    cls = threestudio.find("a124-4d-volume")
    c2f = cls({**cfg.system.geometry, "coarse_to_fine": [2, 100]})
    pts = torch.rand(32, 3) * 2 - 1
    c2f.do_update_step(0, 99)
    assert c2f.field.n_active_levels == 2
    h = c2f.field.encode(pts, torch.zeros(32))
    assert h[:, 2 * 2:].abs().max() == 0 and h[:, :4].abs().max() > 0  # levels 2..3 (2 features each) are off
    c2f.do_update_step(0, 100)
    assert c2f.field.n_active_levels == 4


def test_normal_frames_and_weight_floor_from_the_yaml(threestudio, tmp_path):
    """renderer.normal_frames: normals on that many random images of a training batch, flagged in
    normal_frame_mask, the normal smoothness taken on those only; normal_weight_min: light samples get none."""
    from animate124.core.training.losses import LOSSES, LossInputs, normal_smoothness_2d

    torch.manual_seed(0)
    cfg, geometry, renderer, dm = _build_from_yaml(threestudio, tmp_path)
    batch = next(iter(dm.train_dataloader()))
    renderer.train()
    renderer.randomized = False  # same samples in every render below
    times = torch.tensor([0.1, 0.8])
    full = renderer(**batch, frame_times=times, return_normal=True)
    assert "normal_frame_mask" not in full and "normal_skipped_weight" not in full  # every sample got its normal
    renderer.cfg.normal_frames = 1
    picked = set()
    for seed in range(8):
        some = renderer(**batch, frame_times=times, return_normal=True,
                        generator=torch.Generator().manual_seed(seed))
        mask = some["normal_frame_mask"]
        assert mask.shape == (2,) and int(mask.sum()) == 1
        picked.add(int(mask.nonzero()))
        torch.testing.assert_close(some["comp_normal"][mask], full["comp_normal"][mask], atol=1e-6, rtol=0)
        term = LOSSES["normal_smoothness_2d"].compute(LossInputs(out=some))
        assert term == normal_smoothness_2d(full["comp_normal"][mask])
    assert picked == {0, 1}  # a fresh draw per render
    renderer.cfg.normal_frames, renderer.cfg.normal_weight_min = 0, 1e-2
    light = renderer(**batch, frame_times=times, return_normal=True)
    assert float(light["normal_skipped_weight"].max()) > 0 and "normal_frame_mask" not in light
    torch.testing.assert_close(light["comp_rgb"], full["comp_rgb"])
    renderer.eval()  # evaluation renders: every image gets normals; the weight floor still applies
    with torch.no_grad():
        out = renderer(**batch, frame_times=times)
    assert "normal_frame_mask" not in out and out["comp_normal"].shape == (2, 16, 16, 3)
    assert "normal_skipped_weight" in out  # the floor applies to evaluation renders too
    with pytest.raises(ValueError, match="normal_frames must be >= 0"):
        type(renderer).Config(normal_frames=-1)
