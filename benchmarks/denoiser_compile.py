"""Does ``system.compile_denoisers`` pay back? Eager vs ``torch.compile`` (each mode) of the frozen networks, alone.

Per case and variant: ``ms`` (median of ``--calls`` calls, the GPU synchronised after each, as a training step is),
``one_time_s`` (the first ``--first-calls`` calls minus as many steady calls: compilation, autotuning, CUDA-graph
recording), ``break_even_calls`` (``one_time_s`` / the time saved per call; null when nothing is saved) and
``max_abs_diff`` of the output against eager. Compilation as the system does it
(:func:`animate124.core.guidance.diffusion_networks.compile_networks`: the ``forward`` of each U-Net / ControlNet, the VAE's
``encoder``); a fresh inductor cache per run, so ``one_time_s`` is a fresh machine's.

Cases (the stages' shapes; fp16 on CUDA): Zero123 U-Net [2,8,32,32], SD U-Net [2,4,64,64], ControlNet + SD U-Net
[4,4,128,128] (condition 1024 px), VAE encode + backward [1,3,1024,1024] with and without channels_last, ModelScope
UNet3D [2,4,16,32,32]. Results are written after each case, so a run cut short keeps the cases it finished. Random weights: honest for time, never for quality.

    GPU:  python benchmarks/denoiser_compile.py --models /tmp/a124-full-size --out denoiser_compile.json
          (the folder of ``animate124 make-tiny-models DIR --full-size``)
    CPU smoke (tiny models and shapes, fp32, backend aot_eager):  python benchmarks/denoiser_compile.py --out x.json
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", tempfile.mkdtemp(prefix="a124-inductor-"))  # before torch loads

import torch  # noqa: E402

from animate124.core.guidance.diffusion_networks import COMPILE_MODES, MEASURE_ONLY_MODES, compile_networks  # noqa: E402
from animate124.core.io.atomic_io import write_json  # noqa: E402

# case -> (model folder, input shape on the GPU, on the CPU smoke run)
CASES = {
    "zero123-unet": ("zero123", (2, 8, 32, 32), (2, 8, 8, 8)),
    "sd-unet": ("sd", (2, 4, 64, 64), (2, 4, 8, 8)),
    "controlnet+unet": ("sd", (4, 4, 128, 128), (2, 4, 8, 8)),
    "vae-encode+backward": ("sd", (1, 3, 1024, 1024), (1, 3, 32, 32)),
    "vae-encode+backward-channels-last": ("sd", (1, 3, 1024, 1024), (1, 3, 32, 32)),
    "unet3d": ("text-to-video", (2, 4, 16, 32, 32), (2, 4, 2, 8, 8)),  # last: the slowest to compile
}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", help="full-size models folder (GPU); on the CPU tiny models are made when omitted")
    p.add_argument("--modes", nargs="+", default=list(COMPILE_MODES), choices=COMPILE_MODES + MEASURE_ONLY_MODES,
                   help="cuda-graphs: the eager forward recorded as CUDA graphs (no VAE case: it needs gradient); "
                        "reduce-overhead (torch.compile's CUDA graphs) is timed here only, one call per step")
    p.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    p.add_argument("--calls", type=int, default=20)
    p.add_argument("--first-calls", type=int, default=3)
    p.add_argument("--backend", default=None, help="torch.compile backend (default: inductor on CUDA, aot_eager on CPU)")
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    cuda = torch.cuda.is_available()
    device, dtype = (torch.device("cuda"), torch.float16) if cuda else (torch.device("cpu"), torch.float32)
    backend = args.backend or ("inductor" if cuda else "aot_eager")
    models = Path(args.models) if args.models else None
    if models is None:
        if cuda:
            p.error("--models DIR is needed on a GPU (animate124 make-tiny-models DIR --full-size)")
        from animate124.testing.tiny_models import make_tiny_models

        models = Path(tempfile.mkdtemp(prefix="a124-tiny-"))
        make_tiny_models(models, kinds=("sd", "controlnet-tile", "zero123", "text-to-video"))
    result = {"device": torch.cuda.get_device_name() if cuda else "cpu", "torch": torch.__version__,
              "dtype": str(dtype), "backend": backend, "calls": args.calls, "cases": {}}
    for case in args.cases:
        nets, call = _build(case, models, device, dtype, cuda)
        rows = {"eager": _time(call, args.calls, args.first_calls, device)}
        reference = rows["eager"].pop("output")
        for mode in args.modes:
            if mode == "cuda-graphs" and case.startswith("vae"):
                continue  # the encode runs with gradient: CUDA graphs here take no-grad forwards only
            torch._dynamo.reset()
            compile_networks([nets], mode, vae_encoder=mode != "cuda-graphs", backend=backend)
            row = _time(call, args.calls, args.first_calls, device, rows["eager"]["ms"])
            row["max_abs_diff"] = (row.pop("output") - reference).abs().max().item()
            rows[mode] = row
            for module in vars(nets).values():  # back to eager for the next mode
                for m in (module, getattr(module, "encoder", None)):
                    if m is not None and "forward" in vars(m):
                        del m.forward
        result["cases"][case] = rows
        print(f"{case}: " + ", ".join(f"{k} {v['ms']:.2f} ms" + (f" (+{v['one_time_s']:.1f} s once, break-even "
                                                                  f"{v['break_even_calls'] or 'never'})" if k != "eager" else "")
                                      for k, v in rows.items()), file=sys.stderr)
        write_json(args.out, result, indent=1)  # after each case: a run cut short keeps what it measured
        del nets, call
    return 0


def _build(case: str, models: Path, device, dtype, cuda: bool):
    """The case's networks (a namespace, as a guidance holds them) and a call returning one output tensor."""
    from types import SimpleNamespace

    from diffusers import AutoencoderKL, ControlNetModel, UNet2DConditionModel, UNet3DConditionModel

    folder, gpu_shape, cpu_shape = CASES[case]
    shape = gpu_shape if cuda else cpu_shape
    gen = torch.Generator(device).manual_seed(0)
    load = dict(torch_dtype=dtype)
    if case.startswith("vae"):
        vae = AutoencoderKL.from_pretrained(models / folder, subfolder="vae", **load).to(device).requires_grad_(False)
        fmt = torch.channels_last if case.endswith("channels-last") else torch.contiguous_format
        vae = vae.to(memory_format=fmt)
        x0 = torch.rand(shape, generator=gen, device=device, dtype=dtype).contiguous(memory_format=fmt)

        def encode_backward():
            x = x0.clone().requires_grad_(True)
            vae.encode(x * 2 - 1).latent_dist.mean.float().square().sum().backward()
            return x.grad

        return SimpleNamespace(vae=vae), encode_backward
    cls = UNet3DConditionModel if case == "unet3d" else UNet2DConditionModel
    unet = cls.from_pretrained(models / folder, subfolder="unet", **load).to(device).eval().requires_grad_(False)
    latents = torch.randn(shape, generator=gen, device=device, dtype=dtype)
    t = torch.full((shape[0],), 500, device=device)
    tokens = 1 if case == "zero123-unet" else 77  # Zero123: one CLIP image embedding
    text = torch.randn(shape[0], tokens, unet.config.cross_attention_dim, generator=gen, device=device, dtype=dtype)
    if case != "controlnet+unet":
        return SimpleNamespace(unet=unet), torch.no_grad()(lambda: unet(latents, t, encoder_hidden_states=text).sample)
    cn = ControlNetModel.from_pretrained(models / "controlnet-tile", **load).to(device).eval().requires_grad_(False)
    side = shape[-1] * 8
    cond = torch.rand(shape[0], 3, side, side, generator=gen, device=device, dtype=dtype)

    @torch.no_grad()
    def controlnet_unet():
        down, mid = cn(latents, t, encoder_hidden_states=text, controlnet_cond=cond, return_dict=False)
        return unet(latents, t, encoder_hidden_states=text, down_block_additional_residuals=down,
                    mid_block_additional_residual=mid).sample

    return SimpleNamespace(unet=unet, controlnet=cn), controlnet_unet


def _time(call, calls: int, first_calls: int, device, eager_ms: float | None = None) -> dict:
    def once() -> tuple[float, torch.Tensor]:
        if hasattr(torch, "compiler") and hasattr(torch.compiler, "cudagraph_mark_step_begin"):
            torch.compiler.cudagraph_mark_step_begin()  # one call = one training step (CUDA graphs reuse outputs)
        t0 = time.perf_counter()
        out = call().detach().float().clone()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - t0, out

    first = [once() for _ in range(max(first_calls, 1))]
    ms = statistics.median(once()[0] for _ in range(calls)) * 1000
    row = {"ms": round(ms, 3), "output": first[0][1]}
    if eager_ms is not None:
        one_time = round(sum(s for s, _ in first) - len(first) * ms / 1000, 2)
        saved_ms = eager_ms - row["ms"]  # from the numbers written, so the JSON is consistent
        row.update(one_time_s=one_time, first_call_s=round(first[0][0], 2),
                   break_even_calls=round(one_time * 1000 / saved_ms) if saved_ms > 0 else None)
    return row


if __name__ == "__main__":
    sys.exit(main())
