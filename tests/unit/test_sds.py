"""Shared SDS math: timestep ranges and sampling, CFG, weights, the reparameterised loss, resizing."""

import math
from types import SimpleNamespace

import pytest
import torch

from animate124.core.guidance import pretrained, sds, vae_encoding


def test_timestep_range_defaults_and_annealing():
    assert sds.timestep_range(0) == (20, 980)  # int(1000 * 0.02), int(1000 * 0.98), as upstream
    # hard switch (upstream): strictly after anneal_start_step
    kw = dict(max_step_percent_annealed=0.5, anneal_start_step=100)
    assert sds.timestep_range(100, **kw) == (20, 980)
    assert sds.timestep_range(101, **kw) == (20, 500)
    # linear: 0.98 -> 0.5 between steps 100 and 300; halfway = 0.74
    kw = dict(max_step_percent_annealed=0.5, anneal_start_step=100, anneal_end_step=300)
    assert sds.timestep_range(50, **kw) == (20, 980)
    assert sds.timestep_range(200, **kw) == (20, 740)
    assert sds.timestep_range(10_000, **kw) == (20, 500)
    # never below min_step
    assert sds.timestep_range(1, min_step_percent=0.6, max_step_percent_annealed=0.5, anneal_start_step=0) == (600, 600)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(min_step_percent=1.5), "min_step_percent=1.5"),
        (dict(min_step_percent=0.9, max_step_percent=0.1), "swap"),
        (dict(max_step_percent_annealed=0.5, anneal_start_step=10, anneal_end_step=5), "anneal_end_step=5"),
    ],
)
def test_timestep_range_rejects_bad_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        sds.timestep_range(0, **kwargs)


def test_sample_timesteps_respects_range_and_annealing():
    gen = torch.Generator().manual_seed(0)
    t = sds.sample_timesteps(20_000, 20, 980, generator=gen)
    assert t.dtype == torch.long and t.min() == 20 and t.max() == 980  # both ends inclusive and reached
    assert abs(t.float().mean().item() - 500) < 5  # uniform: mean 500, sd of the mean ≈ 2
    draws = []
    for step in range(0, 400, 2):
        lo, hi = sds.timestep_range(step, max_step_percent_annealed=0.5, anneal_start_step=100, anneal_end_step=300)
        t = sds.sample_timesteps(50, lo, hi, generator=gen)
        assert t.min() >= lo and t.max() <= hi
        draws.append(t.max().item())
    assert max(draws[-50:]) <= 500 < max(draws[:50])
    with pytest.raises(ValueError, match="min_step=5, max_step=4"):
        sds.sample_timesteps(1, 5, 4)


def test_same_generator_seed_gives_same_draws():
    a = sds.randn((3, 4), generator=torch.Generator().manual_seed(7))
    b = sds.randn((3, 4), generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    t1 = sds.sample_timesteps(5, 0, 999, generator=torch.Generator().manual_seed(7))
    t2 = sds.sample_timesteps(5, 0, 999, generator=torch.Generator().manual_seed(7))
    assert t1.tolist() == t2.tolist()


def test_cfg_combine_hand_numbers_and_upstream_plus_one_form():
    eps_u, eps_c = torch.tensor([1.0, -2.0]), torch.tensor([3.0, 0.0])
    # standard: eps_u + 7.5 (eps_c - eps_u) = [1 + 15, -2 + 15]
    torch.testing.assert_close(sds.cfg_combine(eps_u, eps_c, 7.5), torch.tensor([16.0, 13.0]))
    # upstream eps_c + 100 (eps_c - eps_u) = [3 + 200, 0 + 200] = standard scale 101
    upstream = eps_c + 100 * (eps_c - eps_u)
    torch.testing.assert_close(sds.cfg_combine(eps_u, eps_c, 101.0), upstream)
    torch.testing.assert_close(sds.cfg_combine(eps_u, eps_c, 1.0), eps_c)


def test_sds_weight_hand_numbers():
    alphas = torch.tensor([0.25, 0.64, 0.81])
    t = torch.tensor([0, 1, 2])
    torch.testing.assert_close(sds.sds_weight(alphas, t, "sds"), torch.tensor([0.75, 0.36, 0.19]))
    torch.testing.assert_close(sds.sds_weight(alphas, t, "sqrt"), torch.tensor([0.75, 0.36, 0.19]).sqrt())
    torch.testing.assert_close(sds.sds_weight(alphas, t, "one-minus-sqrt-alpha"), torch.tensor([0.5, 0.2, 0.1]))
    torch.testing.assert_close(sds.sds_weight(alphas, t, "x0"), torch.tensor([3.0, 0.5625, 0.19 / 0.81]).sqrt())
    torch.testing.assert_close(sds.sds_weight(alphas, t, "uniform"), torch.ones(3))
    with pytest.raises((ValueError, TypeError), match="fantasia"):  # TypeError: a runtime type checker got there first
        sds.sds_weight(alphas, t, "fantasia")


def test_add_noise_hand_numbers():
    alphas = torch.tensor([0.36, 0.64])
    z, eps = torch.full((2, 1, 2), 2.0), torch.full((2, 1, 2), 1.0)
    out = sds.add_noise(z, eps, alphas, torch.tensor([0, 1]))
    torch.testing.assert_close(out[0], torch.full((1, 2), 0.6 * 2 + 0.8))
    torch.testing.assert_close(out[1], torch.full((1, 2), 0.8 * 2 + 0.6))


def test_sds_loss_gradient_is_g_over_b_and_value_half_g_squared():
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(2, 4, 3, 5, 5, generator=gen, requires_grad=True)
    g = torch.randn(2, 4, 3, 5, 5, generator=gen)
    loss = sds.sds_loss(z, g)
    loss.backward()
    torch.testing.assert_close(z.grad, g / 2)
    torch.testing.assert_close(loss, 0.5 * (g**2).sum() / 2)


def test_sds_step_hand_computed_with_a_linear_noise_predictor():
    """One step with a predictor whose outputs are known by hand: eps_c = 2 z_t, eps_u = z_t / 2."""
    alphas_cumprod = torch.linspace(0.99, 0.01, 10)
    z = torch.randn(3, 4, 2, 2, generator=torch.Generator().manual_seed(1), requires_grad=True)
    seen = []

    def predict(noisy, t):
        seen.append(torch.is_grad_enabled())
        return 2 * noisy, noisy / 2

    step = sds.sds_step(z, predict, alphas_cumprod, guidance_scale=3.0, weighting="one-minus-sqrt-alpha",
                        min_step=2, max_step=7, generator=torch.Generator().manual_seed(5))
    step.loss.backward()
    # the same draws, in the step's order: timesteps, then noise
    gen = torch.Generator().manual_seed(5)
    t = torch.randint(2, 8, (3,), generator=gen)
    eps = torch.randn(3, 4, 2, 2, generator=gen)
    a = alphas_cumprod[t].view(-1, 1, 1, 1)
    z_t = a.sqrt() * z.detach() + (1 - a).sqrt() * eps
    eps_hat = z_t / 2 + 3.0 * (2 * z_t - z_t / 2)  # standard CFG
    g = (1 - a.sqrt()) * (eps_hat - eps)
    assert step.timestep.tolist() == t.tolist() and seen == [False]  # the frozen model runs without gradient
    torch.testing.assert_close(step.noise, eps, rtol=0, atol=0)
    torch.testing.assert_close(step.weight, 1 - alphas_cumprod[t].sqrt())
    torch.testing.assert_close(step.grad, g)
    torch.testing.assert_close(z.grad, g / 3)
    torch.testing.assert_close(step.loss, 0.5 * (g**2).sum() / 3)
    torch.testing.assert_close(step.grad_norm, g.norm())


def test_encode_latents_samples_the_posterior_with_the_generator_and_scales():
    class Posterior:  # the VAE interface with a known posterior: mean = 2 x on channels (r, g, b, r), std 0.1
        dtype = torch.float32
        config = SimpleNamespace(scaling_factor=0.5)

        def encode(self, x):
            mean = 2 * x[:, [0, 1, 2, 0]]
            return SimpleNamespace(latent_dist=SimpleNamespace(mean=mean, std=torch.full_like(mean, 0.1)))

    images = torch.rand(2, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    x = images * 2 - 1
    mean = 2 * x[:, [0, 1, 2, 0]]  # x in [-1, 1]
    got = vae_encoding.encode_latents(Posterior(), images, generator=torch.Generator().manual_seed(3))
    want = 0.5 * (mean + 0.1 * torch.randn(mean.shape, generator=torch.Generator().manual_seed(3)))
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(vae_encoding.encode_latents(Posterior(), images, sample_posterior=False), 0.5 * mean)


def test_sds_gradient_weights_per_sample_and_is_nan_safe():
    eps_pred = torch.tensor([[1.0, float("nan")], [float("inf"), 2.0]])
    noise = torch.tensor([[0.5, 0.0], [0.0, 1.0]])
    g = sds.sds_gradient(eps_pred, noise, torch.tensor([2.0, 0.5]))
    assert torch.isfinite(g).all()
    assert g[0, 0] == 1.0 and g[0, 1] == 0.0 and g[1, 1] == 0.5
    assert g[1, 0] == torch.finfo(torch.float32).max


def test_resize_to_model_crops_centre_to_aspect_then_resizes():
    # a 2x8 image whose columns are numbered 0..7: a square target keeps the two central columns 3, 4
    img = torch.arange(8.0).repeat(2, 1)[None, None]
    out = vae_encoding.resize_to_model(img, (2, 2))
    torch.testing.assert_close(out, torch.tensor([[[[3.0, 4.0], [3.0, 4.0]]]]))
    # too tall (8x2) for a 1:2 target: keep 1 central row (row 3 or 4 -> index (8-1)//2 = 3), then resize
    tall = torch.arange(8.0)[:, None].repeat(1, 2)[None, None]
    out = vae_encoding.resize_to_model(tall, (1, 2))
    torch.testing.assert_close(out, torch.tensor([[[[3.0, 3.0]]]]))
    # 80x144 render into the 320x576 model: same aspect 9:16 -> no crop, bilinear resize only
    x = torch.rand(1, 3, 81, 144, requires_grad=True)
    y = vae_encoding.resize_to_model(x, (320, 576))
    assert y.shape == (1, 3, 320, 576)
    y.sum().backward()
    assert x.grad.abs().sum() > 0
    # 256x256 into 320x576: crop to 144x256 first
    sq = torch.rand(1, 3, 256, 256)
    torch.testing.assert_close(vae_encoding.resize_to_model(sq, (144, 256)), sq[:, :, 56:200])


def test_cpu_generator_is_deterministic_and_passes_cpu_through():
    g = torch.Generator().manual_seed(3)
    assert sds.cpu_generator(g) is g
    assert sds.cpu_generator(None) is None


def test_missing_model_error_names_the_id_and_the_fix(tmp_path):
    from diffusers import AutoencoderKL

    with pytest.raises(OSError, match="could not load AutoencoderKL from .*nowhere/vae.*local folder"):
        pretrained.load_pretrained_component(AutoencoderKL, str(tmp_path / "nowhere"), "vae", local_files_only=True)


def test_weight_names_listed():
    assert set(sds.WEIGHTINGS) == {"sds", "sqrt", "one-minus-sqrt-alpha", "x0", "uniform"}
    assert math.isclose(sds.sds_weight(torch.tensor([0.5]), torch.tensor([0]), "sds").item(), 0.5)


def _tiny_vae():
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    return AutoencoderKL(
        block_out_channels=(8, 8),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        norm_num_groups=4,
        layers_per_block=1,
    ).eval()


def test_encode_moments_split_and_chunks_agree_and_tiny_encoder_is_supported():
    vae = _tiny_vae()
    x = torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(1)).requires_grad_(True)
    mean, std = vae_encoding.encode_moments(vae, x)
    graded = torch.tensor([True, False, True, False])
    mean2, std2 = vae_encoding.encode_moments(vae, x, graded, chunk_size=1)
    torch.testing.assert_close(mean2, mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(std2, std, rtol=1e-5, atol=1e-6)
    mean2.sum().backward()
    assert (x.grad.abs().sum(dim=(1, 2, 3)) > 0).tolist() == graded.tolist()
    try:
        from diffusers import AutoencoderTiny
    except ImportError:  # diffusers < 0.20 has no AutoencoderTiny: the AutoencoderKL half above still ran
        print("AutoencoderTiny part skipped: not in this diffusers")
        return
    taesd = AutoencoderTiny(
        encoder_block_out_channels=(8, 8, 8, 8),
        decoder_block_out_channels=(8, 8, 8, 8),
        num_encoder_blocks=(1, 1, 1, 1),
        num_decoder_blocks=(1, 1, 1, 1),
    ).eval()
    m, s = vae_encoding.encode_moments(taesd, torch.rand(2, 3, 32, 32) * 2 - 1)
    assert m.shape == (2, 4, 4, 4) and s.abs().sum() == 0


def test_checkpointed_encode_gives_the_same_values_and_gradients_and_keeps_one_chunk_of_activations():
    vae = _tiny_vae()
    x0 = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    w = torch.randn(4, 4, 16, 16, generator=torch.Generator().manual_seed(2))

    def run(**kwargs):
        """Values, input gradient and bytes of tensors the graph saved for the backward."""
        x = x0.clone().requires_grad_(True)
        saved = []

        def pack(t):
            saved.append(t.numel() * t.element_size())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            mean, std = vae_encoding.encode_moments(vae, x * 2 - 1, **kwargs)
        ((mean * w).sum() + std.sum()).backward()
        return mean.detach(), std.detach(), x.grad, sum(saved)

    mean, std, grad, kept = run()
    for kwargs in ({"checkpoint": True}, {"checkpoint": True, "chunk_size": 1}):
        m, s_, g, kept_ckpt = run(**kwargs)
        torch.testing.assert_close(m, mean, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(s_, std, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(g, grad, rtol=1e-3, atol=1e-5)  # summation order differs per chunk
        # the forward keeps only the inputs of each checkpointed call, not the encoder's activations
        assert kept_ckpt < kept / 10, (kwargs, kept_ckpt, kept)
    # graded rows only: checkpointing leaves the no-grad rows alone
    graded = torch.tensor([True, False, False, True])
    _, _, g, _ = run(graded=graded, chunk_size=1, checkpoint=True)
    assert (g.abs().sum(dim=(1, 2, 3)) > 0).tolist() == graded.tolist()


def test_load_pretrained_component_prefers_the_fp16_variant_when_present(tmp_path):
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(
        block_out_channels=(8,),
        down_block_types=("DownEncoderBlock2D",),
        up_block_types=("UpDecoderBlock2D",),
        norm_num_groups=4,
        layers_per_block=1,
    )
    vae.half().save_pretrained(tmp_path / "only_fp16" / "vae", variant="fp16", safe_serialization=True)
    vae.float().save_pretrained(tmp_path / "plain" / "vae", safe_serialization=True)
    a = pretrained.load_pretrained_component(
        AutoencoderKL, str(tmp_path / "only_fp16"), "vae", torch_dtype=torch.float16, prefer_fp16_variant=True
    )
    b = pretrained.load_pretrained_component(
        AutoencoderKL, str(tmp_path / "plain"), "vae", torch_dtype=torch.float16, prefer_fp16_variant=True
    )
    assert a.dtype == b.dtype == torch.float16
    torch.testing.assert_close(a.encoder.conv_in.weight, b.encoder.conv_in.weight)
    assert sorted(p.name for p in (tmp_path / "only_fp16" / "vae").iterdir()) == [
        "config.json",
        "diffusion_pytorch_model.fp16.safetensors",
    ]


def test_missing_hub_model_offline_error_names_the_id():
    from diffusers import UNet3DConditionModel

    with pytest.raises(
        OSError,
        match=r"could not load UNet3DConditionModel from 'no-such-org/no-such-model/unet'.*"
        r"(hf|huggingface-cli) download no-such-org/no-such-model",
    ):
        pretrained.load_pretrained_component(UNet3DConditionModel, "no-such-org/no-such-model", "unet", local_files_only=True)


def _autocast_on() -> bool:
    return torch.is_autocast_enabled("cpu")


def _record_autocast(module, seen: list, label: str):
    return module.register_forward_pre_hook(lambda m, args: seen.append((label, _autocast_on())))


def test_half_precision_networks_run_outside_autocast_and_fp32_ones_are_left_alone(tiny_models):
    """16-mixed training wraps the step in autocast; a half-precision VAE / U-Net / ControlNet runs in its own dtype
    (as threestudio's guidances run theirs), so GroupNorm does not keep fp32 activations; fp32 networks (CPU tests)
    see autocast as it is. CPU autocast (bf16) stands in for CUDA's."""
    from animate124.core.guidance.controlnet_sds import ControlNetTileSDS
    from animate124.core.guidance.video_sds import VideoSDS

    video = VideoSDS.from_pretrained(tiny_models["text-to-video"], model_size=(32, 32))
    cn = ControlNetTileSDS.from_pretrained(tiny_models["sd"], tiny_models["controlnet-tile"])
    frames = torch.rand(4, 32, 32, 3, generator=torch.Generator().manual_seed(0)).requires_grad_(True)
    for dtype, expect_autocast in ((torch.float32, True), (torch.bfloat16, False)):
        for net in (video.unet, video.vae, cn.unet, cn.controlnet, cn.vae):
            net.to(dtype)
        seen, hooks = [], []
        for label, net in (("video unet", video.unet), ("video vae", video.vae.encoder), ("cn unet", cn.unet),
                           ("controlnet", cn.controlnet), ("cn vae", cn.vae.encoder)):
            hooks.append(_record_autocast(net, seen, label))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = video(frames, "a panda is dancing", vae_checkpoint=True, vae_chunk_size=2,
                         generator=torch.Generator().manual_seed(1))["loss_sds_video"]
            loss = loss + cn(frames, "a panda", num_frames=1, fixed_size=32, vae_checkpoint=True,
                             generator=torch.Generator().manual_seed(2))["loss_sds_cn"]
            assert _autocast_on()  # restored after each network
        loss.backward()  # the checkpointed encodes run again here, in the same precision as their forward
        for hook in hooks:
            hook.remove()
        labels = {label for label, _ in seen}
        assert labels == {"video unet", "video vae", "cn unet", "controlnet", "cn vae"}, labels
        assert all(state is expect_autocast for _, state in seen), (dtype, seen)
        assert torch.isfinite(frames.grad).all() and frames.grad.abs().sum() > 0
        frames.grad = None


def test_vae_encode_benchmark_smoke(tiny_models, tmp_path):
    """benchmarks/vae_encode.py on the CPU (tiny VAE, bf16 autocast): every shape and variant timed, each one's
    latents and image gradient close to the fp32 VAE's."""
    import json
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
    from vae_encode import VARIANTS, main

    out = tmp_path / "vae.json"
    assert main(["--models", str(tiny_models["sd"].parent), "--calls", "2", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert set(result["shapes"]) == {"cn-1024", "cn-512", "video-chunk4"}
    for entry in result["shapes"].values():
        assert set(entry["variants"]) == set(VARIANTS)
        for row in entry["variants"].values():
            assert row["ms"] > 0 and row["peak_gib"] is None  # no peak on the CPU
            assert 0 < row["rel_error_latents"] < 0.05 and 0 < row["rel_error_grad"] < 0.05, row


def test_half_math_attention_only_for_half_networks_on_cuda_and_restores_the_flags():
    backends = torch.backends.cuda
    flags = lambda: (backends.flash_sdp_enabled(), backends.mem_efficient_sdp_enabled(),  # noqa: E731
                     backends.math_sdp_enabled(), backends.fp16_bf16_reduction_math_sdp_allowed())
    before = flags()
    half, full = torch.nn.Linear(2, 2).half(), torch.nn.Linear(2, 2)
    half.dtype, full.dtype = torch.float16, torch.float32  # as diffusers' ModelMixin.dtype
    for network, device in ((half, torch.device("cpu")), (full, torch.device("cuda"))):
        with vae_encoding.half_math_attention(network, device):  # the CPU, or an fp32 network: nothing changes
            assert flags() == before
    with vae_encoding.half_math_attention(half, torch.device("cuda")):  # only the flags: no CUDA needed to set them
        assert flags() == (False, False, True, True)
    assert flags() == before
    # a 1024 px image's attention (128^2 tokens) goes to the math kernel; a larger one (score matrix ~ tokens^2) not
    with vae_encoding.half_math_attention(half, torch.device("cuda"), tokens=128 * 128):
        assert flags() == (False, False, True, True)
    with vae_encoding.half_math_attention(half, torch.device("cuda"), tokens=128 * 128 + 1):
        assert flags() == before
    # an exception inside (a non-reentrant checkpoint stops its recomputation early by raising one) restores them too
    with pytest.raises(RuntimeError, match="stop"):
        with vae_encoding.half_math_attention(half, torch.device("cuda")):
            raise RuntimeError("stop")
    assert flags() == before
