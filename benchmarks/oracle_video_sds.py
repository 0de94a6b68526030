"""Oracle check of video SDS: with an exact denoiser, SDS alone must pull a clip onto a known target.

The U-Net is replaced by the optimal noise predictor of a data distribution concentrated on one target latent video
``z*``: ``ε̂(z_t, t) = (z_t − √ᾱ_t z*) / √(1 − ᾱ_t)``. Then ``ε̂ − ε = √ᾱ_t (z − z*) / √(1 − ᾱ_t)`` exactly, so the
SDS gradient ``w(t)(ε̂ − ε)`` points from ``z*`` to ``z`` at every draw, and optimising with the real ``VideoSDS``
code path (resize, VAE encode with gradient, timesteps, noise, CFG, weighting, reparameterised loss) must converge.

Three modes, all through ``VideoSDS``:

- ``latents``: the latents are the parameters (``VideoSDS.sds_from_latents``); PSNR on latents (peak = range of z*);
- ``frames``: pixel frames in [0, 1] through the tiny VAE; target frames are block-constant over 8×8 pixels (one
  colour per latent cell, 3 unknowns for 4 latent values) so the VAE encoder can identify them; PSNR on pixels;
- ``field``: a small continuous field, colour = sigmoid(MLP(Fourier(x, y, time))) with frequencies π and 2π (smooth within an 8×8
  block, so a block-mean encoder can identify it), rendered to frames and optimised
  through the VAE; the target is the same field family with other weights; PSNR on pixels.

Encoders (``--vae``): ``tiny`` is the tiny random ``AutoencoderKL``; ``linear`` is a linear stand-in with the VAE's
interface (1×1 convolution 3 → 4 then 8×8 average pooling, i.e. one latent cell per 8×8 block). The random tiny VAE
is badly conditioned: even regressing ``½‖E(x) − E(x*)‖²`` directly, without SDS, does not recover the pixels, so pixel
PSNR through it says nothing about SDS; use ``latents`` with it and the pixel modes with ``linear``.

Run: ``python benchmarks/oracle_video_sds.py --out oracle.json`` (CPU, about a minute; tiny random models).
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
from types import SimpleNamespace

import torch
import torch.nn.functional as F

from animate124.testing.oracle import LinearLatentEncoder


class ExactDenoiser(torch.nn.Module):
    """Stands in for ``UNet3DConditionModel``: returns the exact ε of a point-mass data distribution at ``target``."""

    def __init__(self, target, alphas_cumprod):
        super().__init__()
        self.register_buffer("target", target.float())
        self.register_buffer("alphas_cumprod", alphas_cumprod.float())
        self._anchor = torch.nn.Parameter(torch.zeros(()), requires_grad=False)  # gives the module a device / dtype

    @property
    def dtype(self):
        return torch.float32

    def forward(self, sample, timestep, encoder_hidden_states=None, **_):
        a = self.alphas_cumprod[timestep].view(-1, *([1] * (sample.dim() - 1)))
        target = self.target.repeat(sample.shape[0] // self.target.shape[0], *([1] * (sample.dim() - 1)))
        return SimpleNamespace(sample=(sample.float() - a.sqrt() * target) / (1 - a).sqrt())


def psnr(x, y, peak: float = 1.0) -> float:
    mse = F.mse_loss(x.float(), y.float()).item()
    return 10 * math.log10(peak**2 / max(mse, 1e-20))


def run_oracle(
    model_dir,
    mode: str = "frames",
    vae: str = "linear",
    steps: int = 300,
    frames: int = 4,
    size: int = 64,
    lr: float | None = None,
    seed: int = 0,
) -> dict:
    """Optimise one clip with video SDS against an exact denoiser; return PSNR before / after and timings."""
    from animate124.core.guidance.video_sds import VideoSDS

    base = VideoSDS.from_pretrained(model_dir, model_size=(size, size))
    if vae == "linear":
        base.vae = LinearLatentEncoder(downsample=8, seed=1, posterior=True)
    elif vae != "tiny":
        raise ValueError(f"run_oracle: vae={vae!r} is not one of ['tiny', 'linear']")
    gen = torch.Generator().manual_seed(seed)
    render, params, target_frames = _parameterisation(mode, frames, size, gen)
    with torch.no_grad():
        target_latents = base.encode_frames(target_frames[None].permute(0, 1, 4, 2, 3), sample_posterior=False)
    model = VideoSDS(
        ExactDenoiser(target_latents, base.alphas_cumprod),
        base.vae,
        base.alphas_cumprod,
        base.prompt_encoder,
        (size, size),
    )
    if mode == "latents":
        params = [torch.zeros_like(target_latents, requires_grad=True)]
        render = lambda: params[0]  # noqa: E731
    cond = model.encode_prompt("a video")
    opt = torch.optim.Adam(params, lr=lr or {"field": 0.03}.get(mode, 0.05))

    def score():
        with torch.no_grad():
            if mode == "latents":
                peak = (target_latents.max() - target_latents.min()).item()
                return psnr(params[0], target_latents, peak)
            return psnr(render(), target_frames)

    before, t0 = score(), time.time()
    for _ in range(steps):
        if mode == "latents":
            out = model.sds_from_latents(render(), cond_embeddings=cond, uncond_embeddings=cond, generator=gen)
        else:
            out = model(render(), cond_embeddings=cond, uncond_embeddings=cond, sample_posterior=False, generator=gen)
        opt.zero_grad()
        out["loss_sds_video"].backward()
        opt.step()
    return {
        "mode": mode,
        "vae": vae,
        "steps": steps,
        "frames": frames,
        "size": size,
        "psnr_before": before,
        "psnr_after": score(),
        "seconds": time.time() - t0,
    }


def _parameterisation(mode, frames, size, gen):
    """(render() -> [T, H, W, 3], parameters, target frames [T, H, W, 3])."""
    cells = size // 8
    if mode in ("frames", "latents"):
        # target: block-constant colours drifting smoothly over time
        base = torch.rand(1, 3, cells, cells, generator=gen)
        drift = torch.linspace(0, 1, frames).view(frames, 1, 1, 1) * (
            torch.rand(1, 3, cells, cells, generator=gen) - 0.5
        )
        target = (base + 0.5 * drift).clamp(0, 1)
        up = lambda x: F.interpolate(x, scale_factor=8, mode="nearest").permute(0, 2, 3, 1)  # noqa: E731
        logits = torch.zeros(frames, 3, cells, cells, requires_grad=True)  # grey start
        return (lambda: up(torch.sigmoid(logits))), [logits], up(target)
    if mode == "field":
        target_field, field = _Field(gen), _Field(gen)
        grid = _coords(frames, size)
        with torch.no_grad():
            target = target_field(grid)
        return (lambda: field(grid)), list(field.parameters()), target
    raise ValueError(f"run_oracle: mode={mode!r} is not one of ['latents', 'frames', 'field']")


class _Field(torch.nn.Module):
    """colour(x, y, time) = sigmoid(MLP(Fourier features)): a tiny stand-in for a dynamic NeRF's appearance."""

    def __init__(self, gen, bands: int = 2, width: int = 32):
        super().__init__()
        self.freqs = torch.nn.Parameter(2 ** torch.arange(bands).float() * math.pi, requires_grad=False)
        self.net = torch.nn.Sequential(
            torch.nn.Linear(3 * 2 * bands, width), torch.nn.SiLU(), torch.nn.Linear(width, 3)
        )
        with torch.no_grad():
            for p in self.net.parameters():
                p.copy_(torch.randn(p.shape, generator=gen) * (1.0 / math.sqrt(p.shape[-1])))

    def forward(self, xyt):
        feats = (xyt[..., None] * self.freqs).flatten(-2)
        return torch.sigmoid(self.net(torch.cat([feats.sin(), feats.cos()], -1)))


def _coords(frames, size):
    t, y, x = torch.meshgrid(
        torch.linspace(0, 1, frames), torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij"
    )
    return torch.stack([x, y, t], -1)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="text-to-video folder (default: tiny random model in a temp dir)")
    parser.add_argument(
        "--runs",
        nargs="+",
        default=["latents:tiny", "frames:linear", "field:linear", "frames:tiny"],
        help="mode:vae pairs",
    )
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    args = parser.parse_args()
    model = args.model
    if model is None:
        from animate124.testing.tiny_models import make_tiny_models

        model = make_tiny_models(tempfile.mkdtemp(), kinds=("text-to-video",))["text-to-video"]
    rows = [run_oracle(model, *run.split(":"), steps=args.steps) for run in args.runs]
    print(f"{'mode':8s} {'vae':6s} {'steps':>5s} {'PSNR before':>11s} {'PSNR after':>10s} {'gain dB':>8s} {'s':>6s}")
    for r in rows:
        gain = r["psnr_after"] - r["psnr_before"]
        print(
            f"{r['mode']:8s} {r['vae']:6s} {r['steps']:5d} {r['psnr_before']:11.2f} {r['psnr_after']:10.2f} {gain:8.2f} "
            f"{r['seconds']:6.1f}"
        )
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
