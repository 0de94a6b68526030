"""``system.compile_denoisers: cuda-graphs`` on a GPU: real CUDA graphs of the frozen U-Nets and ControlNet give the
eager numbers (each call's own inputs; outputs still right after other graphs replayed; graphs sharing one memory pool
replayed in another order than recorded), are faster than eager on the static stage's SD U-Net call (SD 1.5's
architecture, random weights: honest for time, never for quality), and a forward that cannot be recorded runs eager."""

import statistics
import time

import pytest
import torch

from animate124.core.guidance.cuda_graphs import GraphedForward, GraphPool

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="gpu tier: torch.cuda.is_available() is False"),
]


def _sd_unet():
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    with torch.device("cuda"):
        return UNet2DConditionModel(cross_attention_dim=768, attention_head_dim=8).half().eval().requires_grad_(False)


def _ms(fn, calls: int = 15) -> float:
    times = []
    for _ in range(calls):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def test_sd_unet_graph_equals_eager_and_is_faster():
    unet = _sd_unet()
    gen = torch.Generator(device="cuda").manual_seed(1)
    inputs = [(torch.randn(2, 4, 64, 64, device="cuda", generator=gen, dtype=torch.half),
               torch.randint(20, 980, (2,), device="cuda", generator=gen).half(),
               torch.randn(2, 77, 768, device="cuda", generator=gen, dtype=torch.half)) for _ in range(4)]
    # as the host's SD guidance calls it during 16-mixed training: autocast on, no_grad
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.float16):
        eager = [unet(x, t, encoder_hidden_states=c).sample for x, t, c in inputs]
        eager_ms = _ms(lambda: unet(*inputs[0][:2], encoder_hidden_states=inputs[0][2]))
        unet.forward = graphed = GraphedForward(unet.forward, unet.parameters(), name="sd-unet")
        got = [unet(x, t, encoder_hidden_states=c).sample for x, t, c in inputs]
        graph_ms = _ms(lambda: unet(*inputs[0][:2], encoder_hidden_states=inputs[0][2]))
    assert graphed.records == 1 and graphed.replays == 3 + 15
    for a, b in zip(got[1:], eager[1:]):  # call 0 ran eager (warm-up)
        torch.testing.assert_close(a, b, rtol=0, atol=2e-3)
    print(f"\nSD U-Net [2, 4, 64, 64] fp16: eager {eager_ms:.1f} ms, CUDA graph {graph_ms:.1f} ms")
    assert graph_ms < 0.8 * eager_ms


def test_controlnet_into_unet_with_a_shared_pool_replayed_out_of_order(tiny_models):
    from animate124.core.guidance.controlnet_sds import ControlNetTileSDS

    sds = ControlNetTileSDS.from_pretrained(tiny_models["sd"], tiny_models["controlnet-tile"], device="cuda",
                                            torch_dtype=torch.float32)
    cn, unet = sds.controlnet, sds.unet

    def step(seed):
        g = torch.Generator(device="cuda").manual_seed(seed)
        x, c = torch.randn(4, 4, 16, 16, device="cuda", generator=g), torch.randn(4, 77, 32, device="cuda", generator=g)
        t = torch.randint(0, 1000, (4,), device="cuda", generator=g)
        cond = torch.rand(4, 3, 128, 128, device="cuda", generator=g)
        plain = unet(x, t, encoder_hidden_states=c).sample if seed % 2 else None  # recorded first (seed 1)
        down, mid = cn(x, t, encoder_hidden_states=c, controlnet_cond=cond, conditioning_scale=1.0, return_dict=False)
        eps = unet(x, t, encoder_hidden_states=c, down_block_additional_residuals=down,
                   mid_block_additional_residual=mid).sample
        if plain is None:  # even seeds: after the chain, so the graphs replay in another order than recorded
            plain = unet(x, t, encoder_hidden_states=c).sample
        return plain, eps, mid

    with torch.no_grad():
        ref = [step(s) for s in range(5)]
        pool = GraphPool()
        cn.forward = g_cn = GraphedForward(cn.forward, cn.parameters(), pool)
        unet.forward = g_unet = GraphedForward(unet.forward, unet.parameters(), pool)
        got = [step(s) for s in range(5)]
    assert (g_cn.records, g_unet.records, g_unet.eager_calls, g_unet.replays) == (1, 2, 2, 8)
    for row, row0 in zip(got, ref):
        for a, b in zip(row, row0):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_a_forward_that_waits_on_the_cpu_runs_eager():
    def forward(x):
        return x * float(x.sum().item())  # a device-to-host read: not recordable

    graphed = GraphedForward(forward, name="syncing")
    x = torch.ones(3, device="cuda")
    outs = [graphed(x) for _ in range(3)]
    assert graphed.records == 0 and graphed.eager_calls == 3
    assert all(torch.equal(o, torch.full((3,), 3.0, device="cuda")) for o in outs)
    assert torch.equal(torch.arange(3, device="cuda") + 1, torch.tensor([1, 2, 3], device="cuda"))  # CUDA still fine


def test_trainable_weights_under_autocast_run_eager_and_follow_their_updates():
    """A trained layer (a LoRA U-Net's) called under no_grad and autocast: a recording would replay autocast's cached
    fp16 copy of the weights from before the update; it runs eager and sees the update."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 64, device="cuda")
    lin.forward = graphed = GraphedForward(lin.forward, lin.parameters(), name="lora")
    x = torch.randn(8, 64, device="cuda")
    # one autocast region per step, as Lightning enters one per training_step: autocast's cast cache lives for a
    # region, so an update between regions reaches an eager call (inside one region even eager calls would not see it)
    with torch.no_grad():
        for _ in range(3):
            with torch.autocast("cuda", dtype=torch.float16):
                lin(x)
        lin.weight.add_(1.0)
        with torch.autocast("cuda", dtype=torch.float16):
            after = lin(x)
    assert graphed.records == 0 and graphed.eager_calls == 4
    ref = torch.nn.functional.linear(x, lin.weight, lin.bias)
    torch.testing.assert_close(after.float(), ref, rtol=2e-2, atol=5e-2)
