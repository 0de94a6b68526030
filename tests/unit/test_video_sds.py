"""VideoSDS on the tiny text-to-video model loaded through from_pretrained of its saved folder."""


import pytest
import torch

from animate124.core.guidance import sds
from animate124.core.guidance.video_sds import VideoSDS
from animate124.testing.oracle import LinearLatentEncoder

SIZE = (64, 64)  # model size override: 8x8 latents keep the CPU tests fast


@pytest.fixture(scope="module")
def video_sds(tiny_models):
    return VideoSDS.from_pretrained(tiny_models["text-to-video"], model_size=SIZE)


def _frames(shape, seed=0):
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed)).requires_grad_(True)


def test_gradient_reaches_every_frame_and_is_finite(video_sds):
    frames = _frames((4, 48, 80, 3))  # non-square render: centre-cropped to 48x48, resized to 64x64
    out = video_sds(frames, "a panda is dancing", generator=torch.Generator().manual_seed(0))
    out["loss_sds_video"].backward()
    assert torch.isfinite(frames.grad).all()
    per_frame = frames.grad.abs().sum(dim=(1, 2, 3))
    assert (per_frame > 0).all()
    # the cropped-away side columns (16 of 80 on each side) get no gradient
    assert frames.grad[:, :, :16].abs().sum() == 0 and frames.grad[:, :, 64:].abs().sum() == 0
    assert out["timestep"].shape == (1,) and 20 <= out["timestep"].item() <= 980
    assert out["grad_norm"] > 0


def test_linear_vae_gradient_is_w_times_eps_difference_mapped_back(video_sds):
    vae = LinearLatentEncoder(downsample=8, scaling_factor=0.5, seed=1, posterior=True)
    model = VideoSDS(video_sds.unet, vae, video_sds.alphas_cumprod, video_sds.prompt_encoder, SIZE)
    b, t, s = 2, 3, 7.5
    frames = _frames((b, t, *SIZE, 3))
    out = model(
        frames,
        "a panda",
        negative_prompt="blurry",
        guidance_scale=s,
        weighting="sds",
        sample_posterior=False,
        generator=torch.Generator().manual_seed(0),
        return_intermediates=True,
    )
    out["loss_sds_video"].backward()
    # recompute eps_hat with a direct U-Net call on both halves and the standard CFG formula
    z, eps, ts = out["latents"].detach(), out["noise"], out["timestep"]
    a = video_sds.alphas_cumprod[ts].view(-1, 1, 1, 1, 1)
    z_t = a.sqrt() * z + (1 - a).sqrt() * eps
    cond, uncond = model.encode_prompt("a panda"), model.encode_prompt("blurry")
    with torch.no_grad():
        e = video_sds.unet(
            torch.cat([z_t, z_t]),
            torch.cat([ts, ts]),
            encoder_hidden_states=torch.cat([cond.expand(b, -1, -1), uncond.expand(b, -1, -1)]),
        ).sample
    eps_c, eps_u = e.chunk(2)
    g = (1 - a) * (eps_u + s * (eps_c - eps_u) - eps)
    torch.testing.assert_close(out["grad"], g, rtol=1e-4, atol=1e-5)
    # map dLoss/dz = g / B back through z = 0.5 * pool8(W (2x - 1)): dx = 2 * 0.5 / 64 * W^T (g / B) per 8x8 block
    g_frames = (g / b).permute(0, 2, 1, 3, 4)  # [B, T, 4, h, w]
    dx = torch.einsum("kc,btkhw->bthwc", vae.weight.detach(), g_frames) * (2 * 0.5 / 64)
    dx = dx.repeat_interleave(8, dim=2).repeat_interleave(8, dim=3)
    torch.testing.assert_close(frames.grad, dx, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("n", [1, 3])
def test_low_ram_vae_grades_exactly_n_frames_per_clip(video_sds, n):
    frames = _frames((2, 4, *SIZE, 3))
    out = video_sds(frames, "a panda", low_ram_vae=n, generator=torch.Generator().manual_seed(1))
    out["loss_sds_video"].backward()
    graded = frames.grad.abs().sum(dim=(2, 3, 4)) > 0  # [B, T]
    assert graded.sum(dim=1).tolist() == [n, n]
    with pytest.raises(ValueError, match="low_ram_vae=5"):
        video_sds(frames, "a panda", low_ram_vae=5)


def test_chunked_encoding_and_embeddings_path_match_the_default(video_sds):
    frames = _frames((3, *SIZE, 3))
    ref = video_sds(frames, "a panda", generator=torch.Generator().manual_seed(2))["loss_sds_video"]
    chunked = video_sds(frames, "a panda", vae_chunk_size=1, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(chunked["loss_sds_video"], ref, rtol=1e-5, atol=1e-4)
    emb = video_sds(
        frames,
        cond_embeddings=video_sds.encode_prompt("a panda"),
        uncond_embeddings=video_sds.encode_prompt(""),
        generator=torch.Generator().manual_seed(2),
    )
    torch.testing.assert_close(emb["loss_sds_video"], ref, rtol=0, atol=0)


def test_same_seed_same_loss_other_seed_other_loss(video_sds):
    frames = _frames((2, *SIZE, 3))
    a = video_sds(frames, "a panda", generator=torch.Generator().manual_seed(5))
    b = video_sds(frames, "a panda", generator=torch.Generator().manual_seed(5))
    c = video_sds(frames, "a panda", generator=torch.Generator().manual_seed(6))
    torch.testing.assert_close(a["loss_sds_video"], b["loss_sds_video"], rtol=0, atol=0)
    assert a["timestep"].tolist() == b["timestep"].tolist()
    assert not torch.equal(a["loss_sds_video"], c["loss_sds_video"])


def test_timestep_range_is_passed_through(video_sds):
    frames = _frames((2, *SIZE, 3))
    gen = torch.Generator().manual_seed(0)
    ts = [video_sds(frames, "a panda", min_step=300, max_step=302, generator=gen)["timestep"].item() for _ in range(12)]
    assert set(ts) <= {300, 301, 302} and len(set(ts)) > 1
    out = video_sds(frames, "a panda", min_step=500, max_step=500, generator=gen)
    assert out["timestep"].item() == 500 and out["min_step"].item() == 500 and out["max_step"].item() == 500


def test_zeroscope_layout_defaults_to_320x576(tiny_models):
    model = VideoSDS.from_pretrained(tiny_models["zeroscope"], load_text_encoder=False)
    assert model.model_size == (320, 576)
    assert VideoSDS.from_pretrained(tiny_models["text-to-video"], load_text_encoder=False).model_size == (256, 256)


def test_bad_inputs_fail_with_one_line(video_sds):
    # a runtime shape checker (jaxtyping) may reject it first, as a TypeError naming the argument
    with pytest.raises((ValueError, TypeError), match="frames"):
        video_sds(torch.rand(4, 3, 64, 64), "a panda")
    with pytest.raises(ValueError, match="prompt="):
        video_sds(torch.rand(2, 64, 64, 3))
    weightless = VideoSDS(video_sds.unet, video_sds.vae, video_sds.alphas_cumprod)
    with pytest.raises(ValueError, match="no text encoder"):
        weightless(torch.rand(2, 64, 64, 3), "a panda")


def test_weighting_changes_only_the_scale(video_sds):
    frames = _frames((2, *SIZE, 3))
    kw = dict(min_step=400, max_step=400, return_intermediates=True)
    a = video_sds(frames, "a panda", weighting="sds", generator=torch.Generator().manual_seed(3), **kw)
    u = video_sds(frames, "a panda", weighting="uniform", generator=torch.Generator().manual_seed(3), **kw)
    w = 1 - video_sds.alphas_cumprod[400]
    torch.testing.assert_close(a["grad"], w * u["grad"], rtol=1e-5, atol=1e-6)
    assert sds.sds_weight(video_sds.alphas_cumprod, torch.tensor([400]), "sds").item() == pytest.approx(w.item())
