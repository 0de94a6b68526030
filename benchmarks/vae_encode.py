"""What a VAE encode with its backward costs, per precision and attention kernel: the piece of every SDS step that the
ControlNet-Tile guidance runs at 1024 px (twice per refine step in animate124.yaml) and the video guidance per chunk.

Per shape and variant: ``ms`` (median of ``--calls``, the GPU synchronised after each, as a step is), ``peak_gib``
(allocated above the start) and the relative error of the latents and of the image gradient against an fp32 VAE
with no autocast. Every variant runs ``vae_encoding.encode_latents(..., chunk_size=1, checkpoint=True)`` under 16-mixed
autocast, as the guidances run it:

- ``autocast``: the half VAE under autocast with the default attention kernel (how the guidances ran it before ``own``:
  GroupNorm and SiLU kept fp32 activations);
- ``own``: the half VAE in its own dtype (``vae_encoding.own_precision``), default attention kernel;
- ``own+math-attention``: the same with scaled-dot-product attention on the math kernel, reducing in fp32 (its
  default). The SD VAE's mid-block attention is one head of 512 channels over (side / 8)^2 tokens; no flash kernel
  takes a 512-wide head, and the profile of a refine step showed the memory-efficient kernel's backward at about
  60 ms per 1024 px image;
- ``own+math-attention-half``: the math kernel reducing in half precision (``vae_encoding.half_math_attention``): what the
  guidances do now.

Random weights (SD 1.5's VAE architecture from ``--models DIR/sd/vae``, ``animate124 make-tiny-models DIR
--full-size``): honest for time and memory, never for quality. JSON written after each shape.

    GPU:  python benchmarks/vae_encode.py --models /tmp/a124-full-size --out vae_encode.json
    CPU smoke (tiny VAE, bf16, small shapes):  python benchmarks/vae_encode.py --out x.json
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path
from unittest.mock import patch

import torch

from animate124.core.guidance import vae_encoding
from animate124.core.io.atomic_io import write_json

SHAPES = {"cn-1024": (1, 3, 1024, 1024), "cn-512": (1, 3, 512, 512), "video-chunk4": (4, 3, 256, 256)}
CPU_SHAPES = {"cn-1024": (1, 3, 64, 64), "cn-512": (1, 3, 32, 32), "video-chunk4": (4, 3, 16, 16)}
VARIANTS = ("autocast", "own", "own+math-attention", "own+math-attention-half")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", help="full-size models folder (its sd/vae); on the CPU a tiny VAE is made when omitted")
    p.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--calls", type=int, default=10)
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    from diffusers import AutoencoderKL

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    half = torch.float16 if cuda else torch.bfloat16  # CPU autocast runs bf16
    models = Path(args.models) if args.models else None
    if models is None:
        if cuda:
            p.error("--models DIR is needed on a GPU (animate124 make-tiny-models DIR --full-size)")
        from animate124.testing.tiny_models import make_tiny_models

        models = Path(tempfile.mkdtemp(prefix="a124-tiny-"))
        make_tiny_models(models, kinds=("sd",))
    vae_half = AutoencoderKL.from_pretrained(models / "sd", subfolder="vae", torch_dtype=half).to(device)
    vae_fp32 = AutoencoderKL.from_pretrained(models / "sd", subfolder="vae", torch_dtype=torch.float32).to(device)
    for vae in (vae_half, vae_fp32):
        vae.eval().requires_grad_(False)
    result = {"device": torch.cuda.get_device_name() if cuda else "cpu", "torch": torch.__version__, "dtype": str(half),
              "calls": args.calls, "note": "random weights: honest for time and memory, never for quality",
              "shapes": {}}
    for name in args.shapes:
        shape = (SHAPES if cuda else CPU_SHAPES)[name]
        gen = torch.Generator(device).manual_seed(0)
        x0 = torch.rand(shape, generator=gen, device=device)
        w = torch.randn(shape[0], 4, shape[2] // 8, shape[3] // 8, generator=gen, device=device)
        ref_latents, ref_grad = _encode(vae_fp32, x0, w, device, autocast=None)
        rows = {}
        for variant in args.variants:
            call = lambda: _encode(vae_half, x0, w, device, autocast=half, variant=variant)  # noqa: E731
            latents, grad = call()  # warm-up (and cuDNN / kernel selection)
            times, peaks = [], []
            for _ in range(args.calls):
                start = _reset_peak(device)
                t0 = time.perf_counter()
                latents, grad = call()
                _sync(device)
                times.append((time.perf_counter() - t0) * 1e3)
                peaks.append(_peak(device) - start)
            rows[variant] = {"ms": round(statistics.median(times), 3),
                             "peak_gib": round(max(peaks) / 2**30, 4) if cuda else None,
                             "rel_error_latents": _rel(latents, ref_latents), "rel_error_grad": _rel(grad, ref_grad)}
        result["shapes"][name] = {"shape": list(shape), "variants": rows}
        print(f"{name} {list(shape)}: " + "; ".join(
            f"{v} {r['ms']:.1f} ms" + (f", {r['peak_gib']:.2f} GiB" if r["peak_gib"] is not None else "")
            + f", err {r['rel_error_latents']:.1e}/{r['rel_error_grad']:.1e}" for v, r in rows.items()), file=sys.stderr)
        write_json(args.out, result, indent=1)
    return 0


def _encode(vae, x0, w, device, autocast, variant: str = "own"):
    """Latents and image gradient of one checkpointed encode + backward, as the guidances run it."""
    x = x0.clone().requires_grad_(True)
    off = lambda *args: nullcontext()  # noqa: E731
    precision = patch.object(vae_encoding, "own_precision", off) if variant == "autocast" else nullcontext()
    # every variant but the last runs without the guidances' half math attention
    attention_patch = patch.object(vae_encoding, "half_math_attention", off) if variant != "own+math-attention-half" \
        else nullcontext()
    attention = nullcontext()
    if variant == "own+math-attention":
        from torch.nn.attention import SDPBackend, sdpa_kernel

        attention = sdpa_kernel([SDPBackend.MATH])
    amp = torch.autocast(device.type, dtype=autocast) if autocast is not None else nullcontext()
    with precision, attention_patch, attention, amp:
        latents = vae_encoding.encode_latents(vae, x, sample_posterior=False, chunk_size=1, checkpoint=True)
        (latents * w).sum().backward()
    return latents.detach().float(), x.grad


def _rel(a: torch.Tensor, ref: torch.Tensor) -> float:
    return float((a.float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-30))


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _reset_peak(device) -> int:
    _sync(device)
    if device.type != "cuda":
        return 0
    torch.cuda.reset_peak_memory_stats(device)
    return torch.cuda.memory_allocated(device)


def _peak(device) -> int:
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0


if __name__ == "__main__":
    sys.exit(main())
