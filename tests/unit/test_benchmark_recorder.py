"""The benchmark's floor: calls recorded during a step are replayed alone, VAE encodes with gradient with their
backward, the others forward only, once per distinct signature (no threestudio needed)."""
from __future__ import annotations

import torch

from animate124.tools.benchmark_steps import CallRecorder


def _tiny_vae_and_unet():
    from diffusers import AutoencoderKL, UNet2DConditionModel

    torch.manual_seed(0)
    vae = AutoencoderKL(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=8, latent_channels=4)
    unet = UNet2DConditionModel(block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), layers_per_block=1,
                                cross_attention_dim=16, attention_head_dim=8, sample_size=8)
    return vae.eval().requires_grad_(False), unet.eval().requires_grad_(False)


def test_recorded_calls_replay_with_the_backward_they_needed():
    vae, unet = _tiny_vae_and_unet()
    rec = CallRecorder(torch.device("cpu"))
    rec.wrap(vae, "encode", "encode")
    rec.wrap(unet, "forward", "unets")
    rec.wrap(unet, "forward", "unets")  # wrapping twice is a no-op
    counts = {"encoder_backward": 0, "unet_forward": 0}
    vae.encoder.conv_in.register_full_backward_hook(lambda *a: counts.__setitem__("encoder_backward",
                                                                                 counts["encoder_backward"] + 1))
    unet.register_forward_pre_hook(lambda *a: counts.__setitem__("unet_forward", counts["unet_forward"] + 1))

    vae.encode(torch.rand(1, 3, 16, 16))  # inactive: not recorded
    rec.active = True
    frames = torch.rand(2, 3, 16, 16, requires_grad=True)
    vae.encode(frames * 2 - 1).latent_dist.mean.sum().backward()  # with gradient: floor = forward + backward
    with torch.no_grad():
        vae.encode(torch.rand(1, 3, 16, 16))  # a low_ram_vae frame without gradient: forward only
        for _ in range(2):  # the same signature twice in one step: remembered once, counted twice
            unet(torch.randn(2, 4, 8, 8), torch.tensor([10, 10]), encoder_hidden_states=torch.randn(2, 77, 16))
    rec.active = False
    assert [c for c, *_ in rec.pending] == ["encode", "encode", "unets", "unets"]
    keys = [k for _, k, *_ in rec.pending]
    assert keys[2] == keys[3] and len(set(keys)) == 3 and len(rec.samples) == 3
    whats = sorted(s[-1] for s in rec.samples.values())
    assert whats == ["AutoencoderKL encode [[1, 3, 16, 16]]", "AutoencoderKL encode [[2, 3, 16, 16]] + backward",
                     "UNet2DConditionModel forward [[2, 4, 8, 8], [2]]"]
    assert all(rec.elapsed_ms(s, e) > 0 for _, _, s, e in rec.pending)

    counts.update(encoder_backward=0, unet_forward=0)
    timings = rec.replay(replays=2)
    # each sample: one warm-up + 2 timed runs; only the graded encode runs a backward
    assert counts == {"encoder_backward": 3, "unet_forward": 3}
    assert set(timings) == set(keys) and all(ms > 0 for ms, _ in timings.values())
    assert rec.samples == {}  # inputs forgotten: nothing keeps the networks or tensors alive
