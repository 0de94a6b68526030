"""ControlNetTileSDS on the tiny SD 1.5 + ControlNet-Tile models loaded through from_pretrained of saved folders."""

import pytest
import torch

from animate124.core.guidance import vae_encoding
from animate124.core.guidance.controlnet_sds import ControlNetTileSDS

SIZE = 64  # fixed_size override: 8x8 latents


@pytest.fixture(scope="module")
def cn_sds(tiny_models):
    return ControlNetTileSDS.from_pretrained(tiny_models["sd"], tiny_models["controlnet-tile"])


def _frames(shape, seed=0):
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed)).requires_grad_(True)


def test_gradient_reaches_only_the_chosen_frames(cn_sds):
    frames = _frames((6, 40, 72, 3))  # ZeroScope-shaped render: centre-cropped to 40x40
    out = cn_sds(
        frames, "a panda is dancing", num_frames=2, fixed_size=SIZE, generator=torch.Generator().manual_seed(0)
    )
    out["loss_sds_cn"].backward()
    chosen = out["frame_indices"].tolist()
    assert len(chosen) == 2 and len(set(chosen)) == 2
    graded = (frames.grad.abs().sum(dim=(1, 2, 3)) > 0).nonzero().flatten().tolist()
    assert sorted(graded) == sorted(chosen)
    assert torch.isfinite(frames.grad).all()
    assert frames.grad[:, :, :16].abs().sum() == 0  # cropped-away columns
    assert out["timestep"].shape == (2,)


def test_gradient_matches_a_direct_controlnet_unet_recomputation(cn_sds):
    """Wiring check: U-Net text = prompt | negative, ControlNet text = 'best quality' | negative, same condition."""
    frames = _frames((4, SIZE, SIZE, 3))
    s = 7.5
    out = cn_sds(
        frames,
        "a panda",
        negative_prompt="ugly",
        frame_indices=[3, 1],
        fixed_size=SIZE,
        guidance_scale=s,
        generator=torch.Generator().manual_seed(1),
        return_intermediates=True,
    )
    assert out["frame_indices"].tolist() == [3, 1]
    z, eps, t = out["latents"].detach(), out["noise"], out["timestep"]
    a = cn_sds.alphas_cumprod[t].view(-1, 1, 1, 1)
    z_t = torch.cat([a.sqrt() * z + (1 - a).sqrt() * eps] * 2)
    tt = torch.cat([t, t])
    cond = frames.detach()[[3, 1]].permute(0, 3, 1, 2)
    torch.testing.assert_close(out["cond_image"], cond, rtol=0, atol=0)  # already at fixed_size: no resize
    enc = cn_sds.encode_prompt
    unet_text = torch.cat([enc("a panda").expand(2, -1, -1), enc("ugly").expand(2, -1, -1)])
    cn_text = torch.cat([enc("best quality").expand(2, -1, -1), enc("ugly").expand(2, -1, -1)])
    with torch.no_grad():
        down, mid = cn_sds.controlnet(
            z_t, tt, encoder_hidden_states=cn_text, controlnet_cond=torch.cat([cond, cond]), return_dict=False
        )
        e = cn_sds.unet(
            z_t,
            tt,
            encoder_hidden_states=unet_text,
            down_block_additional_residuals=down,
            mid_block_additional_residual=mid,
        ).sample
    eps_c, eps_u = e.chunk(2)
    torch.testing.assert_close(out["grad"], (1 - a) * (eps_u + s * (eps_c - eps_u) - eps), rtol=1e-4, atol=1e-5)


def test_frozen_condition_is_what_gets_fed_and_changes_the_loss(cn_sds):
    frames = _frames((3, SIZE, SIZE, 3))
    frozen = _frames((3, SIZE, SIZE, 3), seed=9).detach()
    kw = dict(frame_indices=[0, 2], fixed_size=SIZE, min_step=500, max_step=500, return_intermediates=True)
    current = cn_sds(frames, "a panda", generator=torch.Generator().manual_seed(4), **kw)
    fed = cn_sds(frames, "a panda", cond_rgb=frozen, generator=torch.Generator().manual_seed(4), **kw)
    torch.testing.assert_close(current["cond_image"], frames.detach()[[0, 2]].permute(0, 3, 1, 2), rtol=0, atol=0)
    torch.testing.assert_close(fed["cond_image"], frozen[[0, 2]].permute(0, 3, 1, 2), rtol=0, atol=0)
    torch.testing.assert_close(fed["latents"], current["latents"], rtol=0, atol=0)  # same frames, same draws
    assert (fed["eps_pred"] - current["eps_pred"]).abs().max() > 1e-3  # only the condition differs
    fed["loss_sds_cn"].backward()
    assert frames.grad is not None and frozen.grad is None


def test_condition_is_resized_with_the_frames(cn_sds):
    frames = _frames((2, 40, 72, 3))
    out = cn_sds(
        frames,
        "a panda",
        num_frames=1,
        fixed_size=32,
        generator=torch.Generator().manual_seed(0),
        return_intermediates=True,
    )
    assert out["cond_image"].shape == (1, 3, 32, 32) and out["latents"].shape == (1, 4, 4, 4)
    i = out["frame_indices"].item()
    expected = vae_encoding.resize_to_model(frames.detach()[i : i + 1].permute(0, 3, 1, 2), (32, 32))
    torch.testing.assert_close(out["cond_image"], expected, rtol=0, atol=0)


def test_same_seed_same_loss_and_per_frame_timesteps(cn_sds):
    frames = _frames((5, SIZE, SIZE, 3))
    a = cn_sds(frames, "a panda", num_frames=3, fixed_size=SIZE, generator=torch.Generator().manual_seed(7))
    b = cn_sds(frames, "a panda", num_frames=3, fixed_size=SIZE, generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(a["loss_sds_cn"], b["loss_sds_cn"], rtol=0, atol=0)
    assert a["frame_indices"].tolist() == b["frame_indices"].tolist()
    assert a["timestep"].shape == (3,) and len(set(a["timestep"].tolist())) == 3  # independent draws per frame


def test_bad_inputs_fail_with_one_line(cn_sds):
    frames = torch.rand(3, SIZE, SIZE, 3)
    # a runtime shape checker (jaxtyping) may reject the mismatch first, as a TypeError naming the argument
    with pytest.raises((ValueError, TypeError), match="cond_rgb"):
        cn_sds(frames, "a panda", cond_rgb=torch.rand(2, SIZE, SIZE, 3), fixed_size=SIZE)
    with pytest.raises(ValueError, match=r"frame_indices=\[5\]"):
        cn_sds(frames, "a panda", frame_indices=[5], fixed_size=SIZE)
    with pytest.raises(ValueError, match="num_frames=4"):
        cn_sds(frames, "a panda", num_frames=4, fixed_size=SIZE)
