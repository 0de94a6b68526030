"""The benchmark's work summary, its launch count without CUDA, and the fitted start shape (no threestudio needed)."""
from __future__ import annotations

import pytest
import torch

from step_benchmark.work import LaunchCount, stage_work


def test_stage_work_means_each_counter_and_derives_the_per_ray_ratios():
    steps = [{"rays": 100, "samples_marched": 900, "samples": 400, "normal_queries": 2400, "grid4d_fwd": 3200},
             {"rays": 100, "samples_marched": 1100, "samples": 600, "normal_queries": 3600, "grid4d_fwd": 4800,
              "triton_launches": 4}]
    work = stage_work(steps)
    assert work == {"rays": 100, "samples_marched": 1000, "samples": 500, "normal_queries": 3000, "grid4d_fwd": 4000,
                    "triton_launches": 2, "marched_per_ray": 10.0, "samples_per_ray": 5.0,
                    "normal_queries_per_sample": 6.0, "grid_queries_per_sample": 8.0}
    assert stage_work([]) == {} and "samples_per_ray" not in stage_work([{"samples": 3}])


def test_launch_count_on_the_cpu_counts_dispatched_aten_operators():
    a, b = torch.rand(4, 4), torch.rand(4, 4)
    count = LaunchCount("cpu")
    count.start()
    c = a @ b  # aten.mm
    d = (c + a).relu()  # aten.add, aten.relu
    assert count.stop() == {"aten_ops": 3}
    torch.testing.assert_close(d, torch.relu(a @ b + a))
    count.start()
    count.stop()
    assert LaunchCount("cpu").stop() == {}  # never started: nothing counted, nothing to undo


def test_the_blobs_start_shape_is_a_surface_and_prunes_the_occupancy_grid():
    """A small field fitted to the synthetic scene's density: dense inside its blobs, near empty outside; the
    occupancy grid filled from it keeps a minority of the cells (the initial blob keeps them all)."""
    from types import SimpleNamespace

    from animate124.core.field.dynamic_field import DynamicField
    from animate124.core.field.occupancy import TimeOccupancyGrid
    from step_benchmark.start_shape import StartShape, fill_occupancy, fit_field_to_blobs

    field = DynamicField(n_levels=6, log2_hashmap_size=14, base_resolution=8, per_level_scale=1.6,
                         implementation="torch", generator=torch.Generator().manual_seed(0))
    field.encoding_time.embeddings.requires_grad_(False)
    fit = fit_field_to_blobs(field, steps=150, batch=4096)
    assert fit["density_inside"] > 8.0 and fit["density_outside"] < 0.5, fit
    assert not field.encoding_time.embeddings.requires_grad and field.encoding.embeddings.grad is None

    grid = TimeOccupancyGrid([-1, -1, -1, 1, 1, 1], resolution=8, n_time_slices=2)
    geometry = SimpleNamespace(forward_density=lambda points, times: field.forward_density(points, times))
    renderer = SimpleNamespace(estimator=grid, geometry=geometry, render_step_size=2 * 3**0.5 / 256,
                               cfg=SimpleNamespace(occ_thre=0.01, occ_ema_decay=0.95))
    occupied = fill_occupancy(renderer, updates=2)["occupied_fraction"]
    assert 0.02 < occupied < 0.5, occupied
    assert fill_occupancy(SimpleNamespace(estimator=None)) == {}
    with pytest.raises(ValueError, match="start shape 'cube'"):
        StartShape("cube")
