"""core/training/losses.py against values worked out by hand on tiny tensors."""
import math

import pytest
import torch

from animate124.core.training import losses


def test_all_exports_import():
    assert all(hasattr(losses, name) for name in losses.__all__)


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


def test_render_term_is_the_named_loss_on_the_render_and_its_batch():
    g = torch.Generator().manual_seed(0)
    out = {"comp_rgb": torch.rand(1, 4, 4, 3, generator=g), "comp_rgb_bg": torch.ones(1, 4, 4, 3),
           "opacity": torch.rand(1, 4, 4, 1, generator=g), "depth": torch.rand(1, 4, 4, 1, generator=g),
           "comp_normal": torch.rand(1, 4, 4, 3, generator=g)}
    batch = {"rgb": torch.rand(1, 4, 4, 3, generator=g), "mask": torch.rand(1, 4, 4, 1, generator=g) > 0.5,
             "ref_depth": torch.rand(1, 4, 4, 1, generator=g)}
    assert losses.render_term("rgb", out, batch) == losses.rgb_mse(out["comp_rgb"], batch["rgb"], batch["mask"],
                                                                   out["comp_rgb_bg"])
    assert losses.render_term("opaque", out, batch) == losses.opaque(out["opacity"])
    assert losses.render_term("sparsity", out, batch) == losses.sparsity(out["opacity"])
    assert losses.render_term("depth", out, batch) == losses.depth_pearson(out["depth"], batch["ref_depth"],
                                                                           batch["mask"])
    with pytest.raises(ValueError, match="unknown term 'rbg'"):
        losses.render_term("rbg", out, batch)
    # the renderer's normal_frames: the normal smoothness on the images that got normals only
    out = {"comp_normal": torch.rand(3, 4, 4, 3, generator=g), "normal_frame_mask": torch.tensor([True, False, True])}
    assert losses.render_term("normal_smoothness_2d", out, batch) == losses.normal_smoothness_2d(out["comp_normal"][[0, 2]])
    del out["normal_frame_mask"]
    assert losses.render_term("normal_smoothness_2d", out, batch) == losses.normal_smoothness_2d(out["comp_normal"])
