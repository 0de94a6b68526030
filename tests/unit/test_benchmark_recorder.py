"""The benchmark's floor: calls recorded during a step are replayed alone, VAE encodes with gradient with their
backward, the others forward only, once per distinct signature (no threestudio needed)."""
from __future__ import annotations

import torch

from step_benchmark.floor import CallRecorder


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


def test_compiled_networks_are_recorded_and_replayed_compiled():
    """system.compile_denoisers compiles a slot's networks when it loads; the recorder attaches afterwards, so it wraps
    the compiled forward: the step's calls are recorded and the floor replays the compiled networks."""
    import types

    from torch._dynamo.utils import counters

    from animate124.core.guidance.diffusion_networks import compile_networks

    vae, unet = _tiny_vae_and_unet()
    guidance = types.SimpleNamespace(model=types.SimpleNamespace(unet=unet, vae=vae))
    assert compile_networks([guidance], "default", backend="aot_eager") == ["UNet2DConditionModel"]
    rec = CallRecorder(torch.device("cpu"))
    rec.attach_slot("sd", guidance, None)
    assert [m() for m in rec.modules["sd"]] == [unet, vae]
    assert getattr(unet.forward, "_a124_bench", False) and getattr(vae.encode, "_a124_bench", False)
    args = (torch.randn(2, 4, 8, 8), torch.tensor([10, 10]))
    rec.active = True
    graphs = counters["stats"]["unique_graphs"]
    with torch.no_grad():
        unet(*args, encoder_hidden_states=torch.randn(2, 77, 16))
    assert counters["stats"]["unique_graphs"] == graphs + 1  # the compiled forward ran (and compiled) once
    assert [c for c, *_ in rec.pending] == ["unets"] and len(rec.samples) == 1
    timings = rec.replay(replays=2)
    assert len(timings) == 1 and counters["stats"]["unique_graphs"] == graphs + 1  # replayed without recompiling


def test_steps_that_compiled_count_once_in_the_stage_switch_not_in_the_step_time():
    """A network first called after a stage's first step (e.g. an image slot that runs only on anchor steps) compiles
    there: that step is a one-time cost, so it leaves step_ms and its excess goes to switch_s, which the projection
    adds once per stage."""
    import types

    from animate124.core.training.stages import parse_stages
    from step_benchmark.timer import StepTimer

    slots = types.SimpleNamespace(keep_only=lambda *a, **k: None, guidances={}, prompt_processors={})
    system = types.SimpleNamespace(renderer=torch.nn.Identity(), guidance_slots=slots,
                                   stages=parse_stages([{"name": "static", "steps": 10, "guidances": ["sd"]}]))
    timer = StepTimer(CallRecorder(torch.device("cpu")), system, warmup=2, steps=4, replays=1)
    # (role, offset, wall ms, graphs compiled): the first step loads + compiles, warm-up 1 and measured step 3 compile
    steps = [("warmup", 0, 5000.0, 3), ("warmup", 1, 900.0, 1), ("measure", 2, 100.0, 0), ("measure", 3, 700.0, 2),
             ("measure", 4, 110.0, 0), ("measure", 5, 90.0, 0)]
    timer.records = [{"stage": "static", "role": role, "offset": offset, "wall_ms": ms, "compiles": graphs,
                      "floor_keys": ["unet"], "categories": {"render": 10.0, "encode": 0.0, "unets": 50.0},
                      "finite": True} for role, offset, ms, graphs in steps]
    timer.floors["static"] = {"unet": (50.0, "UNet2DConditionModel forward")}
    (stage,) = timer.stage_results([10])
    assert stage["step_ms"] == {"median": 100.0, "mean": 100.0, "min": 90.0, "max": 110.0,
                               "all": [100.0, 110.0, 90.0]}  # steps 2, 4, 5
    assert stage["compile_steps"] == [0, 1, 3]
    assert stage["switch_s"] == (4900 + 800 + 600) / 1000  # each compiling step's excess over the mean step
    assert stage["floor_ms"]["mean"] == 50.0 and stage["ratio_mean"] == 2.0


def test_evaluation_is_timed_in_eval_mode_and_training_mode_comes_back():
    """Lightning's fit leaves the system training; the benchmark's validation / test timing must render as the real
    loops do (eval mode: no jitter, chunked, with normals), then leave the mode as it found it."""
    from contextlib import nullcontext

    from step_benchmark.runner import _time_eval

    class System(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.child = torch.nn.Linear(1, 1)
            self.modes, self.device = [], torch.device("cpu")

        def validation_step(self, batch, index):
            self.modes.append((self.training, self.child.training))

        def on_validation_epoch_end(self):
            self.modes.append((self.training, self.child.training))

    class Data:
        def setup(self, split):
            pass

        def val_dataloader(self):
            class Loader(list):
                dataset = range(10)
            return Loader([{"index": i} for i in range(10)])

    system = System().train()
    result = _time_eval(system, Data(), "validate", 3, nullcontext)
    assert system.modes == [(False, False)] * 4  # 3 timed images + the epoch end (the video)
    assert system.training and system.child.training
    assert result["images"] == 10 and result["timed_images"] == 3


def test_calls_replay_with_the_attention_kernels_they_ran_with():
    """sds runs half VAEs' attention on the math kernel (global flags, as sdpa_kernel sets them): the floor replays
    a call with the flags it was recorded under, and puts the flags back afterwards."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    vae, _ = _tiny_vae_and_unet()
    rec = CallRecorder(torch.device("cpu"))
    rec.wrap(vae, "encode", "encode")
    seen = []
    vae.encoder.register_forward_pre_hook(lambda *a: seen.append(torch.backends.cuda.flash_sdp_enabled()))
    rec.active = True
    with torch.no_grad():
        with sdpa_kernel([SDPBackend.MATH]):
            vae.encode(torch.rand(1, 3, 16, 16))
        vae.encode(torch.rand(1, 3, 16, 16))  # the same signature under the default flags: a second sample
    rec.active = False
    assert len(rec.samples) == 2 and seen == [False, True]
    default = torch.backends.cuda.flash_sdp_enabled()
    seen.clear()
    rec.replay(replays=1)
    assert sorted(seen) == [False, False, True, True]  # warm-up + 1 replay each
    assert torch.backends.cuda.flash_sdp_enabled() == default
