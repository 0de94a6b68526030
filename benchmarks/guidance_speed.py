"""Time our guidance calls against their diffusion floor, measured in the same run.

Full-size architectures with random weights, built from the real configs written below (no downloads; time and
memory do not depend on the weights' values):

- video SDS: ModelScope ``UNet3DConditionModel`` + SD VAE, one clip of 16 × 256² frames;
- ControlNet-Tile SDS: SD 1.5 ``UNet2DConditionModel`` + ``ControlNetModel`` + SD VAE, 2 frames at 1024².

Floor = what any SDS step with these networks must run: the U-Net forward(s) on the CFG batch (no grad) plus the
VAE encoder forward and backward on the frames. "call" = ``VideoSDS`` / ``ControlNetTileSDS`` forward + ``backward``
from the rendered frames. Each number is the median of ``--iters`` timed runs after ``--warmup`` runs; peak VRAM is
``torch.cuda.max_memory_allocated`` during the timed runs of that row.

Options: ``--dtype bf16``, ``--channels-last``, ``--compile`` (``torch.compile`` of the U-Nets / ControlNet, default
mode; compiling the U-Net3D alone took 130-170 s on an H100), ``--tiny-vae`` (adds rows where our call uses a random
``AutoencoderTiny`` (TAESD architecture) encoder instead of the SD VAE).

GPU:  ``python benchmarks/guidance_speed.py --out guidance_speed.json`` (about 1-2 minutes on an H100 without
``--compile``). CPU smoke test of the script: ``python benchmarks/guidance_speed.py --tiny``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

# the real architectures' configs (one home: the full-size random models of animate124 benchmark)
from animate124.testing.full_size_models import (
    CONTROLNET_CONDITIONING,
    MODELSCOPE_UNET3D,
    SD15_UNET,
    SD_VAE,
)

TINY_UNET3D = dict(
    MODELSCOPE_UNET3D,
    block_out_channels=(32, 64, 64, 64),
    cross_attention_dim=32,
    attention_head_dim=8,
    layers_per_block=1,
)
TINY_UNET = dict(SD15_UNET, block_out_channels=(32, 64, 64, 64), cross_attention_dim=32, layers_per_block=1)
TINY_VAE = dict(SD_VAE, block_out_channels=(32, 32, 32, 32), layers_per_block=1)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", choices=["fp16", "bf16", "fp32"], default="fp16")
    parser.add_argument("--frames", type=int, default=16, help="video clip length")
    parser.add_argument("--cn-size", type=int, default=1024, help="ControlNet fixed_size")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--tiny-vae", action="store_true")
    parser.add_argument("--only", choices=["video", "cn"], default=None)
    parser.add_argument("--tiny", action="store_true", help="tiny architectures, small sizes (CPU smoke test)")
    parser.add_argument("--out", default=None, help="write the table as JSON here")
    args = parser.parse_args()
    if args.tiny:
        args.frames, args.cn_size, args.warmup, args.iters = 2, 64, 1, 2
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu":
        args.dtype = "fp32"  # CPU half-precision kernels are slow emulations: time the smoke run in fp32
    if device.type == "cpu" and not args.tiny:
        raise SystemExit(
            "guidance_speed: no CUDA device; full-size timings need a GPU (use --tiny for a CPU smoke run)"
        )
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()  # casting random full-size models with .to(dtype) warns once per model
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    torch.backends.cudnn.benchmark = True
    rows = []
    if args.only in (None, "video"):
        rows += bench_video(args, device, dtype)
    if args.only in (None, "cn"):
        rows += bench_controlnet(args, device, dtype)
    _print_table(rows, device, args)
    if args.out:
        meta = {
            "device": _device_name(device),
            "torch": torch.__version__,
            "dtype": args.dtype,
            "channels_last": args.channels_last,
            "compile": args.compile,
            "tiny": args.tiny,
        }
        with open(args.out, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=2)


def bench_video(args, device, dtype) -> list[dict]:
    from diffusers import AutoencoderKL, UNet3DConditionModel

    from animate124.core.guidance.video_sds import VideoSDS

    size = 64 if args.tiny else 256
    with torch.device(device):  # random init on the GPU: seconds instead of a minute on the CPU
        unet_raw = UNet3DConditionModel(**(TINY_UNET3D if args.tiny else MODELSCOPE_UNET3D))
        vae_raw = AutoencoderKL(**(TINY_VAE if args.tiny else SD_VAE))
    unet = _prepare(unet_raw, device, dtype, args)
    vae = _prepare(vae_raw, device, dtype, args, compile_it=False)
    alphas = _sd_alphas_cumprod()
    d_text = unet.config.cross_attention_dim
    emb = torch.randn(1, 77, d_text, device=device, dtype=dtype)
    t_frames, h = args.frames, size // 8
    gen = torch.Generator(device=device).manual_seed(0)
    unet_fwd = _unet3d_forward(unet, t_frames, h, emb)
    vae_fb = _vae_fwd_bwd(vae, t_frames, size, device)
    rows = []
    r_unet = _time(unet_fwd, args, device)
    r_vae = _time(vae_fb, args, device)
    floor_ms = r_unet["ms"] + r_vae["ms"]
    rows.append(dict(guidance="video", piece=f"U-Net3D fwd, batch 2 (CFG), {t_frames}x{h}^2 latents", **r_unet))
    rows.append(dict(guidance="video", piece=f"VAE encoder fwd+bwd, {t_frames}x{size}^2", **r_vae))
    rows.append(
        dict(guidance="video", piece="floor (sum)", ms=floor_ms, peak_gb=max(r_unet["peak_gb"], r_vae["peak_gb"]))
    )
    model = VideoSDS(unet, vae, alphas, model_size=(size, size))
    frames = torch.rand(t_frames, size, size, 3, device=device, requires_grad=True)

    def call(m=model):
        out = m(frames, cond_embeddings=emb, uncond_embeddings=emb, generator=gen)
        out["loss_sds_video"].backward()
        frames.grad = None

    r = _time(call, args, device)
    rows.append(dict(guidance="video", piece="VideoSDS call + backward", ratio_to_floor=r["ms"] / floor_ms, **r))
    if args.tiny_vae:
        rows += _tiny_vae_rows(
            "video",
            args,
            device,
            dtype,
            lambda v: VideoSDS(unet, v, alphas, model_size=(size, size)),
            lambda m: call(m),
            r_unet["ms"],
            t_frames,
            size,
        )
    return rows


def bench_controlnet(args, device, dtype) -> list[dict]:
    from diffusers import AutoencoderKL, ControlNetModel, UNet2DConditionModel

    from animate124.core.guidance.controlnet_sds import ControlNetTileSDS

    size, k = args.cn_size, 2
    with torch.device(device):
        unet_raw = UNet2DConditionModel(**(TINY_UNET if args.tiny else SD15_UNET))
        cn_raw = ControlNetModel.from_unet(unet_raw, conditioning_embedding_out_channels=CONTROLNET_CONDITIONING)
        vae_raw = AutoencoderKL(**(TINY_VAE if args.tiny else SD_VAE))
    unet, controlnet = _prepare(unet_raw, device, dtype, args), _prepare(cn_raw, device, dtype, args)
    vae = _prepare(vae_raw, device, dtype, args, compile_it=False)
    alphas = _sd_alphas_cumprod()
    emb = torch.randn(1, 77, unet_raw.config.cross_attention_dim, device=device, dtype=dtype)
    gen = torch.Generator(device=device).manual_seed(0)
    h = size // 8

    def unet_fwd():
        with torch.no_grad():
            x = torch.randn(2 * k, 4, h, h, device=device, dtype=dtype)
            t = torch.full((2 * k,), 500, device=device)
            e = emb.expand(2 * k, -1, -1)
            cond = torch.rand(2 * k, 3, size, size, device=device, dtype=dtype)
            down, mid = controlnet(x, t, encoder_hidden_states=e, controlnet_cond=cond, return_dict=False)
            unet(x, t, encoder_hidden_states=e, down_block_additional_residuals=down, mid_block_additional_residual=mid)

    r_unet = _time(unet_fwd, args, device)
    r_vae = _time(_vae_fwd_bwd(vae, k, size, device), args, device)
    floor_ms = r_unet["ms"] + r_vae["ms"]
    rows = [
        dict(guidance="cn", piece=f"ControlNet + U-Net fwd, batch {2 * k}, {h}^2 latents, {size}^2 cond", **r_unet),
        dict(guidance="cn", piece=f"VAE encoder fwd+bwd, {k}x{size}^2", **r_vae),
        dict(guidance="cn", piece="floor (sum)", ms=floor_ms, peak_gb=max(r_unet["peak_gb"], r_vae["peak_gb"])),
    ]
    model = ControlNetTileSDS(unet, controlnet, vae, alphas)
    render = 64 if args.tiny else 256
    frames = torch.rand(args.frames, render, render, 3, device=device, requires_grad=True)

    def call(m=model):
        out = m(
            frames,
            cond_embeddings=emb,
            uncond_embeddings=emb,
            controlnet_embeddings=emb,
            num_frames=k,
            fixed_size=size,
            generator=gen,
        )
        out["loss_sds_cn"].backward()
        frames.grad = None

    r = _time(call, args, device)
    rows.append(
        dict(
            guidance="cn",
            piece=f"ControlNetTileSDS call + backward ({args.frames}x{render}^2 render)",
            ratio_to_floor=r["ms"] / floor_ms,
            **r,
        )
    )
    if args.tiny_vae:
        rows += _tiny_vae_rows(
            "cn",
            args,
            device,
            dtype,
            lambda v: ControlNetTileSDS(unet, controlnet, v, alphas),
            lambda m: call(m),
            r_unet["ms"],
            k,
            size,
        )
    return rows


# ----------------------------------------------------------------------------------------------------------------------
# helpers


def _tiny_vae_rows(guidance, args, device, dtype, make_model, call, unet_ms, n, size):
    from diffusers import AutoencoderTiny

    with torch.device(device):
        taesd_raw = AutoencoderTiny()
    taesd = _prepare(taesd_raw, device, dtype, args, compile_it=False)
    r_vae = _time(_vae_fwd_bwd(taesd, n, size, device), args, device)
    model = make_model(taesd)
    r = _time(lambda: call(model), args, device)
    floor = unet_ms + r_vae["ms"]
    return [
        dict(guidance=guidance, piece=f"AutoencoderTiny encoder fwd+bwd, {n}x{size}^2", **r_vae),
        dict(guidance=guidance, piece="floor with AutoencoderTiny (sum)", ms=floor, peak_gb=r_vae["peak_gb"]),
        dict(guidance=guidance, piece="call + backward with AutoencoderTiny", ratio_to_floor=r["ms"] / floor, **r),
    ]


def _prepare(module, device, dtype, args, compile_it: bool = True):
    module = module.to(device=device, dtype=dtype).eval().requires_grad_(False)
    if args.channels_last:  # 2-D convolutions only: U-Net3D's temporal Conv3d weights cannot be channels_last
        for conv in module.modules():
            if isinstance(conv, torch.nn.Conv2d):
                conv.to(memory_format=torch.channels_last)
    if args.compile and compile_it:
        module.forward = torch.compile(module.forward)
    return module


def _unet3d_forward(unet, t_frames, h, emb):
    def run():
        with torch.no_grad():
            x = torch.randn(2, 4, t_frames, h, h, device=emb.device, dtype=emb.dtype)
            t = torch.full((2,), 500, device=emb.device)
            unet(x, t, encoder_hidden_states=emb.expand(2, -1, -1))

    return run


def _vae_fwd_bwd(vae, n, size, device):
    x = torch.rand(n, 3, size, size, device=device, requires_grad=True)

    def run():
        encoded = vae.encode((x * 2 - 1).to(vae.dtype))
        latents = encoded.latent_dist.mean if hasattr(encoded, "latent_dist") else encoded.latents
        latents.float().sum().backward()
        x.grad = None

    return run


def _time(fn, args, device) -> dict:
    for _ in range(args.warmup):
        fn()
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(args.iters):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append((time.perf_counter() - t0) * 1000)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
    return {"ms": statistics.median(times), "peak_gb": peak}


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _sd_alphas_cumprod():
    from diffusers import DDIMScheduler

    return DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear").alphas_cumprod


def _device_name(device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def _print_table(rows, device, args):
    flags = [f for f, on in (("channels_last", args.channels_last), ("compile", args.compile)) if on]
    print(f"device: {_device_name(device)}; dtype {args.dtype}; torch {torch.__version__}; flags {flags or 'none'}")
    print(f"{'guidance':8s} {'piece':62s} {'ms':>9s} {'x floor':>8s} {'peak GiB':>9s}")
    for r in rows:
        ratio = f"{r['ratio_to_floor']:.2f}" if "ratio_to_floor" in r else ""
        print(f"{r['guidance']:8s} {r['piece'][:62]:62s} {r['ms']:9.1f} {ratio:>8s} {r['peak_gb']:9.2f}")


if __name__ == "__main__":
    main()
