"""core/training/losses.py against values worked out by hand on tiny tensors, and the table of own losses."""
import dataclasses
import math
from types import SimpleNamespace

import pytest
import torch

from animate124.core.training import losses
from animate124.core.training.losses import LOSSES, LossInputs, OwnLoss
from animate124.core.training.stages import PARAM_GROUPS


def test_rgb_mse_composites_the_reference_on_the_render_background():
    rgb = torch.tensor([[[[0.5, 0.5, 0.5], [1.0, 0.0, 0.0]]]])  # [1, 1, 2, 3]
    ref = torch.tensor([[[[0.0, 0.0, 0.0], [0.2, 0.2, 0.2]]]])
    mask = torch.tensor([[[[True], [False]]]])
    bg = torch.ones(1, 1, 2, 3)
    # pixel 0 target = ref (0): errors 0.25 x3; pixel 1 target = bg (1): errors 0, 1, 1 -> mean = (0.75 + 2) / 6
    assert losses.rgb_mse(rgb, ref, mask, bg).item() == pytest.approx(2.75 / 6)


def test_mask_bce_by_hand_and_clamped():
    opacity = torch.tensor([0.9, 0.2, 0.0]).reshape(1, 1, 3, 1)
    mask = torch.tensor([1.0, 0.0, 1.0]).reshape(1, 1, 3, 1)
    expected = -(math.log(0.9) + math.log(0.8) + math.log(1e-5)) / 3  # opacity 0 is clamped to 1e-5
    assert losses.mask_bce(opacity, mask).item() == pytest.approx(expected, rel=1e-5)
    assert losses.mask_bce(opacity.half(), mask).dtype == torch.float32


def test_depth_pearson_values():
    ref = torch.rand(1, 8, 8, 1, generator=torch.Generator().manual_seed(0))  # relative depth, larger = nearer
    mask = torch.ones(1, 8, 8, 1, dtype=torch.bool)
    far = 2.0 + 3.0 * (1.0 - ref)  # rendered depth grows where the reference says "far": perfect agreement
    assert losses.depth_pearson(far, ref, mask).item() == pytest.approx(0.0, abs=1e-6)
    assert losses.depth_pearson(2.0 + ref, ref, mask).item() == pytest.approx(1.0, abs=1e-6)
    mask[:, :4] = False  # only the masked pixels count: the first 4 rows are ignored
    noisy = far.clone()
    noisy[:, :4] = torch.rand(1, 4, 8, 1)
    assert losses.depth_pearson(noisy, ref, mask).item() == pytest.approx(0.0, abs=1e-6)
    # two pixels: depth (1, 2) against 1 - ref = (0.5, 0) -> correlation -1 -> loss 1
    two = losses.depth_pearson(torch.tensor([1.0, 2.0]).reshape(1, 1, 2, 1), torch.tensor([0.5, 1.0]).reshape(1, 1, 2, 1),
                               torch.ones(1, 1, 2, 1, dtype=torch.bool))
    assert two.item() == pytest.approx(1.0, abs=1e-6)
    one_pixel = torch.zeros(1, 8, 8, 1, dtype=torch.bool)
    one_pixel[0, 0, 0] = True
    depth = far.clone().requires_grad_(True)
    zero = losses.depth_pearson(depth, ref, one_pixel)
    assert zero.item() == 0.0 and zero.requires_grad


def test_normal_smoothness_2d_by_hand():
    n = torch.zeros(1, 2, 2, 3)
    n[0, 1, 1] = torch.tensor([1.0, 2.0, 0.0])
    # vertical differences: one pixel pair of 2 columns x 3 channels differs by (1, 2, 0) -> sum 5 over 6 entries;
    # horizontal: the same -> 5 / 6 + 5 / 6
    assert losses.normal_smoothness_2d(n).item() == pytest.approx(10 / 6)


def test_sparsity_and_opaque_by_hand():
    opacity = torch.tensor([0.0, 0.5]).reshape(1, 1, 2, 1)
    assert losses.sparsity(opacity).item() == pytest.approx((0.1 + math.sqrt(0.26)) / 2)
    # entropy: 0 clamps to 1e-3; 0.5 gives log 2
    h0 = -(1e-3 * math.log(1e-3) + (1 - 1e-3) * math.log(1 - 1e-3))
    assert losses.opaque(opacity).item() == pytest.approx((h0 + math.log(2)) / 2, rel=1e-5)


def _render_and_reference(seed=0, frames=1):
    g = torch.Generator().manual_seed(seed)
    out = {"comp_rgb": torch.rand(frames, 4, 4, 3, generator=g),
           "comp_rgb_bg": torch.rand(frames, 4, 4, 3, generator=g),
           "opacity": torch.rand(frames, 4, 4, 1, generator=g), "depth": torch.rand(frames, 4, 4, 1, generator=g),
           "comp_normal": torch.rand(frames, 4, 4, 3, generator=g)}
    batch = {"rgb": torch.rand(1, 4, 4, 3, generator=g), "mask": torch.rand(1, 4, 4, 1, generator=g) > 0.5,
             "ref_depth": torch.rand(1, 4, 4, 1, generator=g)}
    return out, batch


def test_each_entry_computes_its_function_on_its_inputs():
    """Catches an entry wired to the wrong function or the wrong input (rgb against the opacity, the mask term on
    the depth, the render's background swapped for the reference's ...)."""
    out, batch = _render_and_reference()
    x = LossInputs(out, batch)
    expected = {
        "rgb": losses.rgb_mse(out["comp_rgb"], batch["rgb"], batch["mask"], out["comp_rgb_bg"]),
        "mask": losses.mask_bce(out["opacity"], batch["mask"]),
        "depth": losses.depth_pearson(out["depth"], batch["ref_depth"], batch["mask"]),
        "normal_smoothness_2d": losses.normal_smoothness_2d(out["comp_normal"]),
        "sparsity": losses.sparsity(out["opacity"]),
        "opaque": losses.opaque(out["opacity"]),
    }
    for name, value in expected.items():
        assert LOSSES[name].compute(x) == value, name
    # every pair differs on this input, so the equalities above pin each entry to one function
    values = sorted(float(v) for v in expected.values())
    assert min(b - a for a, b in zip(values, values[1:])) > 1e-3


def test_normal_smoothness_only_on_the_frames_that_got_normals():
    """Catches the normal smoothness taken over every frame when the renderer gave normals to some only
    (``normal_frame_mask``: the others hold no normals, and would pull the field towards flat grey)."""
    out, _ = _render_and_reference(1, frames=3)
    mask = torch.tensor([True, False, True])
    term = LOSSES["normal_smoothness_2d"].compute(LossInputs({**out, "normal_frame_mask": mask}))
    assert term == losses.normal_smoothness_2d(out["comp_normal"][[0, 2]])
    assert term != losses.normal_smoothness_2d(out["comp_normal"])


def test_time_smoothness_reads_the_field_with_the_system_settings_and_stream():
    """Catches the time smoothness called with its point count and time step swapped, the default settings instead
    of the system's, or a fresh random stream instead of the system's seeded one."""
    calls = []

    class Field:
        def time_smoothness_loss(self, n_points, dt, generator=None):
            calls.append((n_points, dt, generator))
            return torch.tensor(0.25)

    stream = torch.Generator()
    settings = SimpleNamespace(time_smoothness_points=123, time_smoothness_dt=0.03125)
    value = LOSSES["time_smoothness"].compute(LossInputs(geometry=Field(), settings=settings, generator=stream))
    assert value == 0.25 and calls == [(123, 0.03125, stream)]


def test_each_entry_reads_only_what_its_view_provides():
    """Catches an entry whose declared view or needs disagree with what it reads: a term on the main render or the
    random view reading the reference batch (those batches hold no rgb / mask), a field term reading a render, a term
    without ``normals`` reading ``comp_normal`` (absent from renders made without normals), a term reading the
    reference depth without ``needs_ref_depth``."""
    out, batch = _render_and_reference()
    field = SimpleNamespace(time_smoothness_loss=lambda n, dt, generator=None: torch.tensor(0.0))
    settings = SimpleNamespace(time_smoothness_points=8, time_smoothness_dt=0.1)
    for loss in LOSSES.values():
        given_out = {k: v for k, v in out.items() if loss.normals or k != "comp_normal"}
        given_batch = {k: v for k, v in batch.items() if loss.needs_ref_depth or k != "ref_depth"}
        if loss.view == "field":
            x = LossInputs(None, None, field, settings)
        elif loss.view == "reference":
            x = LossInputs(given_out, given_batch)
        else:  # the clip or the random view: cameras only, no reference images
            x = LossInputs(given_out, {})
        assert loss.compute(x).ndim == 0, loss.name


def test_table_entries_are_valid():
    """Catches a table entry naming a view that does not exist, a parameter group that does not exist, or a field
    term asking for normals (it has no render)."""
    assert list(LOSSES) == [loss.name for loss in LOSSES.values()]
    assert all(loss.trains is None or loss.trains in PARAM_GROUPS for loss in LOSSES.values())
    with pytest.raises(ValueError, match="view='clip' is not one of"):
        OwnLoss("x", "clip", lambda x: x)
    with pytest.raises(ValueError, match="a field term has no render to carry normals"):
        dataclasses.replace(LOSSES["time_smoothness"], normals=True)
