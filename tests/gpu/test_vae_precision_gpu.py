"""A half-precision VAE encode with its backward (what every SDS step of the video and ControlNet-Tile guidances
does) under 16-mixed autocast: run in the VAE's own dtype (``vae_encoding.own_precision``, with the attention on the math
kernel in half precision, ``vae_encoding.half_math_attention``) it holds less memory than under autocast with the default
attention kernel, where GroupNorm keeps fp32 activations, and is as close to an fp32 encode. SD 1.5's VAE architecture,
random weights, one 512 px image, checkpointed as the presets run it."""

import time
from contextlib import nullcontext

import pytest
import torch

from animate124.core.guidance import vae_encoding

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="gpu tier: torch.cuda.is_available() is False"),
]


def _sd_vae():
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    return AutoencoderKL(
        block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2, latent_channels=4, norm_num_groups=32,
    ).eval().requires_grad_(False)


def _encode(vae, x0, w, autocast: bool):
    """Latents, input gradient, peak bytes above the start, ms."""
    x = x0.clone().requires_grad_(True)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start = torch.cuda.memory_allocated()
    t0 = time.perf_counter()
    with torch.autocast("cuda", dtype=torch.float16, enabled=autocast):
        latents = vae_encoding.encode_latents(vae, x, sample_posterior=False, chunk_size=1, checkpoint=True)
        (latents * w).sum().backward()
    torch.cuda.synchronize()
    ms = (time.perf_counter() - t0) * 1e3
    return latents.detach(), x.grad, torch.cuda.max_memory_allocated() - start, ms


def test_own_precision_vae_encode_holds_less_and_is_as_accurate(monkeypatch):
    vae32 = _sd_vae().cuda()
    vae16 = _sd_vae().half().cuda()
    gen = torch.Generator(device="cuda").manual_seed(1)
    x0 = torch.rand(1, 3, 512, 512, device="cuda", generator=gen)
    w = torch.randn(1, 4, 64, 64, device="cuda", generator=gen)
    ref_latents, ref_grad, _, _ = _encode(vae32, x0, w, autocast=False)

    def error(latents, grad):
        return ((latents - ref_latents).norm() / ref_latents.norm()).item(), \
            ((grad - ref_grad).norm() / ref_grad.norm()).item()

    rows = {}
    for name in ("autocast", "own", "autocast", "own"):  # second round timed warm
        if name == "autocast":  # the guidances before own precision: autocast on, the default attention kernel
            monkeypatch.setattr(vae_encoding, "own_precision", lambda network, device: torch.autocast("cuda", enabled=True))
            monkeypatch.setattr(vae_encoding, "half_math_attention", lambda *args: nullcontext())
        else:  # now: own precision, the math attention kernel in half precision
            monkeypatch.undo()
        latents, grad, peak, ms = _encode(vae16, x0, w, autocast=True)
        rows[name] = (peak, ms) + error(latents, grad)
    for name, (peak, ms, e_lat, e_grad) in rows.items():
        print(f"{name}: peak {peak / 2**30:.3f} GiB, {ms:.1f} ms, rel. error latents {e_lat:.2e} grad {e_grad:.2e}")
    (peak_a, _, lat_a, grad_a), (peak_o, _, lat_o, grad_o) = rows["autocast"], rows["own"]
    assert peak_o < 0.75 * peak_a, (peak_o, peak_a)
    assert lat_o < max(2 * lat_a, 5e-3) and grad_o < max(2 * grad_a, 5e-3), rows
