"""Finding the frozen diffusion networks of loaded guidances and compiling their forwards in place
(``system.compile_denoisers``), on the tiny random models loaded through ``from_pretrained``.

Compiled tests use the ``aot_eager`` backend: the same graph capture and autograd split as inductor, seconds instead of
a minute per U-Net on this CPU; inductor itself is checked by the one ``slow`` test."""
from __future__ import annotations

import gc
import types
import weakref

import pytest
import torch

from animate124.core.guidance import vae_encoding
from animate124.core.guidance.controlnet_sds import ControlNetTileSDS
from animate124.core.guidance.diffusion_networks import COMPILE_MODES, compile_networks, compile_problem, find_networks
from animate124.core.guidance.video_sds import VideoSDS

SIZE = 64  # ControlNet fixed_size: 8x8 latents


@pytest.fixture()
def cn_sds(tiny_models):  # per test: compiling replaces forwards in place
    return ControlNetTileSDS.from_pretrained(tiny_models["sd"], tiny_models["controlnet-tile"])


def _ids(modules) -> set:
    return {id(m) for m in modules}


def test_finds_exactly_the_denoisers_and_vaes_of_loaded_guidances(tiny_models, cn_sds):
    from diffusers import StableDiffusionPipeline

    video = VideoSDS.from_pretrained(tiny_models["text-to-video"])
    pipe = StableDiffusionPipeline.from_pretrained(tiny_models["sd"], safety_checker=None)
    # as guidances hold them: ours under .model; the host's SD guidance under .pipe (and .unet / .vae shortcuts)
    ours_cn, ours_video = types.SimpleNamespace(model=cn_sds), types.SimpleNamespace(model=video)
    host_sd = types.SimpleNamespace(pipe=pipe, unet=pipe.unet, vae=pipe.vae, other={"scale": 7.5})

    found = find_networks([ours_cn, None])
    assert _ids(found.denoisers) == _ids([cn_sds.unet, cn_sds.controlnet]) and len(found.denoisers) == 2
    assert _ids(found.vaes) == _ids([cn_sds.vae]) and len(found.vaes) == 1
    found = find_networks([ours_video])
    assert [type(m).__name__ for m in found.denoisers] == ["UNet3DConditionModel"]
    assert found.denoisers[0] is video.unet and found.vaes == [video.vae]
    found = find_networks([host_sd])  # reached twice: listed once; the text encoder is not a diffusion network
    assert found.denoisers == [pipe.unet] and found.vaes == [pipe.vae]
    deep = types.SimpleNamespace(a=types.SimpleNamespace(b=types.SimpleNamespace(model=cn_sds)))
    assert find_networks([deep], depth=3).all() == [] and len(find_networks([deep], depth=4).all()) == 3


def test_compiled_networks_give_the_eager_loss_and_gradient(cn_sds):
    """The whole ControlNet-Tile SDS step (VAE encode with gradient, checkpointed, ControlNet + U-Net) before and
    after compiling every network in place: the same loss and the same gradient on the frames."""
    def run():
        frames = torch.rand(2, SIZE, SIZE, 3, generator=torch.Generator().manual_seed(1)).requires_grad_(True)
        out = cn_sds(frames, "a panda is dancing", num_frames=2, fixed_size=SIZE, vae_checkpoint=True,
                     generator=torch.Generator().manual_seed(0))
        out["loss_sds_cn"].backward()
        return out["loss_sds_cn"].detach(), frames.grad

    loss_eager, grad_eager = run()
    unet, controlnet, encoder = cn_sds.unet, cn_sds.controlnet, cn_sds.vae.encoder
    labels = compile_networks([types.SimpleNamespace(model=cn_sds)], "default", vae_encoder=True, backend="aot_eager")
    assert sorted(labels) == ["AutoencoderKL.encoder", "ControlNetModel", "UNet2DConditionModel"]
    # the same module objects, with a compiled forward as an instance attribute; the class's forward untouched
    assert cn_sds.unet is unet and cn_sds.controlnet is controlnet and cn_sds.vae.encoder is encoder
    assert all("forward" in vars(m) and getattr(m.forward, "_a124_compiled", False) for m in (unet, controlnet, encoder))
    assert "forward" not in vars(cn_sds.vae)  # the VAE's encode is left for the benchmark to wrap
    graphs = _graphs()
    loss, grad = run()
    assert _graphs() > graphs  # the compiled code ran
    torch.testing.assert_close(loss, loss_eager, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad, grad_eager, rtol=1e-4, atol=1e-7)
    assert compile_networks([types.SimpleNamespace(model=cn_sds)], "default", vae_encoder=True,
                            backend="aot_eager") == []  # compiled once only


def test_compiled_vae_encoder_gradient_under_autocast(cn_sds):
    """The encoder runs with gradient under the trainer's mixed precision (bf16 autocast on the CPU): compiled and
    eager moments and image gradients agree, with and without checkpointing."""
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(2)) * 2 - 1

    def moments_and_grad(checkpoint):
        x = images.clone().requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            mean, std = vae_encoding.encode_moments(cn_sds.vae, x, chunk_size=1, checkpoint=checkpoint)
        (mean.float().square().sum() + std.float().sum()).backward()
        return mean.detach().float(), x.grad

    eager = {c: moments_and_grad(c) for c in (False, True)}
    assert compile_networks([cn_sds.vae], "default", vae_encoder=True, backend="aot_eager") == ["AutoencoderKL.encoder"]
    for checkpoint in (False, True):
        mean, grad = moments_and_grad(checkpoint)
        torch.testing.assert_close(mean, eager[checkpoint][0], rtol=2e-2, atol=2e-2)
        torch.testing.assert_close(grad, eager[checkpoint][1], rtol=5e-2, atol=5e-3)
        assert grad.abs().sum() > 0


def test_a_freed_compiled_network_is_collected(cn_sds):
    """A slot freed at a stage switch must not stay alive through its compiled forward (the benchmark's
    stale_guidances would list it, and its weights would stay on the GPU)."""
    compile_networks([cn_sds], "default", backend="aot_eager")
    cn_sds.unet(torch.randn(1, 4, 8, 8), torch.tensor([10]), encoder_hidden_states=torch.randn(1, 77, 32))
    ref = weakref.ref(cn_sds.unet)
    del cn_sds.unet
    gc.collect()
    assert ref() is None


def test_bad_mode_and_support_messages():
    with pytest.raises(ValueError, match=r"^compile_networks: mode='fast' is not one of cuda-graphs, default, "
                                         r"max-autotune-no-cudagraphs$"):
        compile_networks([], "fast")
    assert COMPILE_MODES == ("cuda-graphs", "default", "max-autotune-no-cudagraphs")  # not reduce-overhead
    assert compile_problem(torch.device("cpu")) is None  # torch.compile exists in every supported torch
    assert compile_problem(torch.device("cpu"), mode="cuda-graphs") is None


@pytest.mark.slow
def test_inductor_on_the_cpu_matches_eager(cn_sds):
    """The real backend (C++ kernels from gcc here; Triton on a GPU), one U-Net, mode as the system passes it."""
    x, t, text = torch.randn(2, 4, 8, 8), torch.tensor([10, 500]), torch.randn(2, 77, 32)
    eager = cn_sds.unet(x, t, encoder_hidden_states=text).sample
    assert compile_networks([types.SimpleNamespace(unet=cn_sds.unet)], "max-autotune-no-cudagraphs") == [
        "UNet2DConditionModel"]
    torch.testing.assert_close(cn_sds.unet(x, t, encoder_hidden_states=text).sample, eager, rtol=1e-4, atol=1e-4)


def _graphs() -> int:
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def test_denoiser_compile_script_smoke(tiny_models, tmp_path):
    """benchmarks/denoiser_compile.py on the CPU: tiny models, aot_eager; every row timed, compiled = eager output
    (the VAE case compares the image gradient), break-even consistent with the numbers it is made of."""
    import json
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
    from denoiser_compile import main

    out = tmp_path / "compile.json"
    assert main(["--models", str(tiny_models["sd"].parent), "--cases", "controlnet+unet", "vae-encode+backward",
                 "--modes", "default", "--calls", "2", "--first-calls", "1", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["backend"] == "aot_eager" and set(result["cases"]) == {"controlnet+unet", "vae-encode+backward"}
    for rows in result["cases"].values():
        eager, compiled = rows["eager"], rows["default"]
        assert eager["ms"] > 0 and compiled["ms"] > 0 and compiled["max_abs_diff"] <= 1e-5
        saved_ms = eager["ms"] - compiled["ms"]
        assert compiled["break_even_calls"] == (round(compiled["one_time_s"] * 1000 / saved_ms) if saved_ms > 0
                                                else None)
