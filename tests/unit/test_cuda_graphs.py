"""``system.compile_denoisers: cuda-graphs`` (``core.cuda_graphs.GraphedForward``) on the CPU, with the tiny random
models: when a call records, replays or runs eager, and what a replay returns.

The CPU has no CUDA graphs, so ``checks.ReplayingGraph`` stands in with a real graph's contract (see there): a
wrapper that forgot to copy new inputs in, or returned the recorded outputs themselves, gives wrong numbers here as it
would on a GPU (tests/gpu/test_cuda_graphs_gpu.py runs the real graphs)."""
from __future__ import annotations

import collections
import dataclasses
import logging
import types
from pathlib import Path

import pytest
import torch
from checks import ReplayingGraph

from animate124.core.guidance.cuda_graphs import MAX_SAMPLE_ELEMENTS, GraphedForward, copy_outputs
from animate124.core.guidance.diffusion_networks import compile_networks


def _graphed(module, **kw) -> GraphedForward:
    module.forward = GraphedForward(module.forward, module.parameters(), graph_type=ReplayingGraph, **kw)
    return module.forward


def _graphed_unet(cn_sds):
    """The tiny U-Net with its forward graphed (the CPU stand-in), and one batch of its inputs."""
    return cn_sds.unet, _graphed(cn_sds.unet), _unet_inputs(0)


@pytest.fixture()
def cn_sds(tiny_models):
    from animate124.core.guidance.controlnet_sds import ControlNetTileSDS

    return ControlNetTileSDS.from_pretrained(tiny_models["sd"], tiny_models["controlnet-tile"])


def _unet_inputs(seed: int, batch: int = 2):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, 4, 8, 8, generator=g), torch.randint(0, 1000, (batch,), generator=g),
            torch.randn(batch, 77, 32, generator=g))


def test_first_call_eager_second_records_then_replays_with_each_calls_inputs(cn_sds):
    unet = cn_sds.unet
    eager = [unet(x, t, encoder_hidden_states=c).sample for x, t, c in map(_unet_inputs, range(5))]
    graphed = _graphed(unet)
    with torch.no_grad():
        outs = [unet(x, t, encoder_hidden_states=c) for x, t, c in map(_unet_inputs, range(5))]
    assert (graphed.eager_calls, graphed.records, graphed.replays) == (1, 1, 4)  # the recording call replays too
    assert type(outs[0]).__name__ == "UNet2DConditionOutput"  # diffusers' output type kept: `.sample` works
    for out, ref in zip(outs, eager):  # all five still right after the later replays: each was copied out
        torch.testing.assert_close(out.sample, ref, rtol=0, atol=0)
    assert not any(torch.equal(outs[i].sample, outs[i + 1].sample) for i in range(4))  # new timesteps, new values


def test_controlnet_residuals_into_the_unet_as_the_guidance_calls_them(cn_sds):
    """The ControlNet's outputs (a list of residuals and a tensor) are the U-Net's inputs: with both graphed, and the
    ControlNet replayed again before the U-Net's output is read, every step equals the eager chain."""
    def chain(seed):
        x, t, c = _unet_inputs(seed)
        cond = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(seed))
        down, mid = cn_sds.controlnet(x, t, encoder_hidden_states=c, controlnet_cond=cond, conditioning_scale=0.8,
                                      return_dict=False)
        eps = cn_sds.unet(x, t, encoder_hidden_states=c, down_block_additional_residuals=down,
                          mid_block_additional_residual=mid).sample
        cn_sds.controlnet(x, t, encoder_hidden_states=c, controlnet_cond=cond * 0, conditioning_scale=0.8,
                          return_dict=False)  # a later replay must not change what was returned
        return eps, down, mid

    with torch.no_grad():
        ref = [chain(s) for s in range(4)]
        g_cn, g_unet = _graphed(cn_sds.controlnet), _graphed(cn_sds.unet)
        got = [chain(s) for s in range(4)]
    assert (g_cn.eager_calls, g_cn.replays, g_unet.eager_calls, g_unet.replays) == (1, 7, 1, 3)
    for (eps, down, mid), (eps0, down0, mid0) in zip(got, ref):
        assert type(down) is type(down0) and len(down) == len(down0)
        torch.testing.assert_close(eps, eps0, rtol=0, atol=0)
        torch.testing.assert_close(mid, mid0, rtol=0, atol=0)
        for a, b in zip(down, down0):
            torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_gradient_needed_runs_eager(cn_sds):
    unet, graphed, (x, t, c) = _graphed_unet(cn_sds)
    for _ in range(3):  # grad mode on, nothing requires grad: the frozen SDS case, recorded
        unet(x, t, encoder_hidden_states=c)
    assert graphed.replays == 2
    xg = x.clone().requires_grad_(True)
    out = unet(xg, t, encoder_hidden_states=c).sample  # an input that needs its gradient: eager, gradient flows
    out.sum().backward()
    assert xg.grad is not None and xg.grad.abs().sum() > 0 and graphed.replays == 2
    unet.conv_in.weight.requires_grad_(True)  # a trained parameter (a LoRA U-Net): eager
    before = graphed.eager_calls
    unet(x, t, encoder_hidden_states=c).sample.sum().backward()
    assert graphed.eager_calls == before + 1 and unet.conv_in.weight.grad.abs().sum() > 0
    with torch.no_grad():  # also under no_grad: autocast would hand a recording its cached casts of such weights
        for _ in range(2):
            unet(x, t, encoder_hidden_states=c)
    assert graphed.replays == 2 and graphed.eager_calls == before + 3
    unet.conv_in.weight.requires_grad_(False)
    with torch.no_grad():
        unet(x, t, encoder_hidden_states=c)
    assert graphed.replays == 3


def test_the_training_flag_is_part_of_the_signature(cn_sds):
    unet, graphed, (x, t, c) = _graphed_unet(cn_sds)
    with torch.no_grad():
        for _ in range(2):
            unet(x, t, encoder_hidden_states=c)
        unet.train()  # dropout would be on: not the eval recording
        unet(x, t, encoder_hidden_states=c)
    assert (graphed.records, graphed.replays, graphed.eager_calls) == (1, 1, 2)


FLOOR_CALLS = Path(__file__).resolve().parents[1] / "fixtures" / "denoiser_floor_calls.json"


@pytest.mark.parametrize("config, recorded", [
    ("default", {"UNet2DConditionModel [2, 4, 64, 64]", "UNet2DConditionModel [2, 8, 32, 32]",
                 "UNet3DConditionModel [2, 4, 16, 32, 32]"}),
    ("fast", {"UNet2DConditionModel [2, 4, 64, 64]", "UNet2DConditionModel [2, 8, 32, 32]",
              "UNet3DConditionModel [2, 4, 16, 32, 32]", "ControlNetModel [4, 4, 64, 64]",
              "UNet2DConditionModel [4, 4, 64, 64]"}),
])
def test_the_sample_limit_splits_the_measured_calls_as_documented(config, recorded):
    """The denoiser calls of each stage as the H200 benchmark recorded them (``floor_calls``): the launch-bound ones
    are recorded, the default refine's compute-bound 1024 px ControlNet / U-Net run eager."""
    import json
    import math
    import re

    calls = set()
    for stage in json.loads(FLOOR_CALLS.read_text())[config]["stages"]:
        for call in stage["floor_calls"]:
            m = re.match(r"(\w+) forward \[(\[[\d, ]+\])", call["what"])
            if m:
                calls.add((m.group(1), tuple(json.loads(m.group(2)))))
    graphed = GraphedForward(lambda x: x, graph_type=ReplayingGraph)
    got = {f"{name} {list(shape)}" for name, shape in calls
           if graphed._signature([torch.empty(shape, dtype=torch.float16)]) is not None}
    assert got == recorded
    if config == "default":  # the eager ones were measured too
        assert {("UNet2DConditionModel", (4, 4, 128, 128)), ("ControlNetModel", (4, 4, 128, 128))} <= calls
    assert all(math.prod(shape) != MAX_SAMPLE_ELEMENTS for _, shape in calls)  # none on the boundary


def test_moved_weights_are_recorded_again_and_a_freed_network_is_collected(cn_sds):
    import gc
    import weakref

    unet, graphed, (x, t, c) = _graphed_unet(cn_sds)
    with torch.no_grad():
        for _ in range(3):
            unet(x, t, encoder_hidden_states=c)
        unet.double()  # new storage for every weight: the recording would read the old one
        outs = [unet(x.double(), t, encoder_hidden_states=c.double()).sample for _ in range(3)]
    assert (graphed.records, graphed.replays) == (2, 4)
    assert outs[-1].dtype == torch.float64 and torch.equal(outs[-1], outs[0])
    expanded = c.double()[:1].expand(2, -1, -1)  # stride 0: recorded through a dense buffer of its own
    assert expanded.stride(0) == 0
    with torch.no_grad():
        got = [unet(x.double(), t, encoder_hidden_states=expanded).sample for _ in range(3)]
    assert graphed.records == 3
    torch.testing.assert_close(got[2], got[0])  # eager read the strided input, the replay a dense copy
    ref = weakref.ref(unet)
    del cn_sds.unet, unet, graphed
    gc.collect()
    assert ref() is None  # the wrapper (module -> forward -> bound method -> module) keeps no slot alive


def test_signatures_shapes_scalars_autocast_and_the_graph_limit():
    calls = []

    def forward(x, scale=1.0, flag=None):
        calls.append(scale)
        return {"y": x * scale, "n": torch.tensor(float(x.shape[0]))}

    graphed = GraphedForward(forward, max_graphs=2, graph_type=ReplayingGraph)
    x = torch.ones(2, 3)
    for scale in (1.0, 1.0, 0.5, 0.5):  # a Python number is part of the signature: each value its own graph
        torch.testing.assert_close(graphed(x, scale)["y"], x * scale)
    assert (graphed.records, graphed.replays) == (2, 2)
    for _ in range(3):  # a third signature, past max_graphs=2: eager every time
        torch.testing.assert_close(graphed(torch.ones(4, 3), 2.0)["y"], torch.full((4, 3), 2.0))
    assert (graphed.records, graphed.eager_calls) == (2, 5)
    graphed = GraphedForward(forward, graph_type=ReplayingGraph)
    for _ in range(2):
        graphed(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        graphed(x)  # autocast on: another signature, seen first, eager
    assert (graphed.records, graphed.eager_calls) == (1, 2)
    assert graphed(x, 1.0, flag=object()) is not None and graphed.eager_calls == 3  # not a recordable input
    with torch.inference_mode():  # another signature: a recording made here holds inference tensors
        graphed(x)
    assert graphed.eager_calls == 4 and graphed(x)["y"] is not None and graphed.replays == 2
    big = GraphedForward(forward, max_sample_elements=6, graph_type=ReplayingGraph)
    for _ in range(3):  # the first tensor over max_sample_elements: compute-bound, eager
        big(torch.ones(7))
    for _ in range(2):
        big(torch.ones(6))
    assert (big.eager_calls, big.records, big.replays) == (4, 1, 1)
    assert GraphedForward(forward)(x)["y"] is not None  # CUDA graphs on a CPU tensor: eager, no error


def test_a_failed_recording_runs_eager_for_good_and_warns_once(caplog):
    class FailingGraph(ReplayingGraph):
        def record(self, fn):
            raise RuntimeError("operation not permitted when stream is capturing\nmore detail")

    graphed = GraphedForward(lambda x: x + 1, graph_type=FailingGraph, name="UNet2DConditionModel")
    with caplog.at_level(logging.WARNING, logger="animate124.core.guidance.cuda_graphs"):
        results = [graphed(torch.zeros(2)) for _ in range(4)]
    assert all(torch.equal(r, torch.ones(2)) for r in results)
    assert (graphed.records, graphed.replays, graphed.eager_calls) == (0, 0, 4)
    assert [r.getMessage() for r in caplog.records] == [
        "UNet2DConditionModel: CUDA graph recording failed, this input signature runs eager: "
        "operation not permitted when stream is capturing"]


def test_copy_outputs_keeps_the_containers_and_copies_every_tensor():
    from diffusers.utils import BaseOutput

    @dataclasses.dataclass
    class UNet2DConditionOutput(BaseOutput):  # as diffusers declares its U-Nets' outputs
        sample: torch.Tensor = None

    Pair = collections.namedtuple("Pair", "a b")
    a, b = torch.zeros(2), torch.ones(3)
    out = {"t": (a, [b, None]), "p": Pair(a, 3), "o": UNet2DConditionOutput(sample=b), "s": "x"}
    got = copy_outputs(out)
    assert isinstance(got["p"], Pair) and got["p"].b == 3 and got["s"] == "x" and got["t"][1][1] is None
    assert isinstance(got["o"], UNet2DConditionOutput) and torch.equal(got["o"].sample, b)
    for copied, original in ((got["t"][0], a), (got["t"][1][0], b), (got["p"].a, a), (got["o"].sample, b)):
        assert torch.equal(copied, original) and copied.data_ptr() != original.data_ptr()


def test_compile_networks_cuda_graphs_wraps_each_denoiser_once(cn_sds):
    holder = types.SimpleNamespace(model=cn_sds)
    labels = compile_networks([holder], "cuda-graphs")
    assert sorted(labels) == ["ControlNetModel", "UNet2DConditionModel"]
    assert isinstance(cn_sds.unet.forward, GraphedForward)
    assert cn_sds.unet.forward.pool is cn_sds.controlnet.forward.pool  # one memory pool for the graphs of one call
    assert compile_networks([holder], "cuda-graphs") == []  # already wrapped
    x, t, c = _unet_inputs(0)
    with torch.no_grad():  # on the CPU the wrapper runs eager: same numbers
        assert cn_sds.unet(x, t, encoder_hidden_states=c).sample.shape == (2, 4, 8, 8)
    with pytest.raises(ValueError, match=r"^compile_networks: cuda-graphs replays no-grad forwards only and a VAE "
                                         r"encoder runs with gradient: compile the encoders with mode='default'"):
        compile_networks([holder], "cuda-graphs", vae_encoder=True)
