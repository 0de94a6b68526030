"""The diffusion floor of a step: every U-Net / ControlNet forward and VAE encode recorded with its exact inputs and
states while the step runs, then replayed alone (encodes with gradient with their backward)."""

from __future__ import annotations

import statistics
import sys
import time
import weakref
from contextlib import contextmanager, nullcontext


class CallRecorder:
    """Wraps the renderer's ``forward``, every U-Net / ControlNet ``forward`` and every VAE ``encode`` of the loaded
    guidances. While ``active`` it times each call (CUDA events; wall clock on CPU) and keeps the first call of each
    distinct signature (module, input shapes and dtypes, grad, autocast and attention-kernel state) with a detached
    copy of its inputs, to replay it alone for the floor, in the same states."""

    def __init__(self, device):
        self.device = device
        self.active = False
        self.pending: list[tuple] = []  # (category, key, start, end) of the current step
        self.samples: dict = {}  # key -> (call, (args, kwargs), grad, (autocast, attention), backward, label)
        self.modules: dict[str, list] = {}  # slot -> weak references to its networks

    def mark(self):
        import torch

        if self.device.type == "cuda":
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return self.clock()

    def clock(self) -> float:
        """Seconds for whole steps: wall clock on a GPU; on the CPU (tests) the process's CPU time, so that other load
        on a shared machine cannot make a step look cheaper than its own floor."""
        return time.perf_counter() if self.device.type == "cuda" else time.process_time()

    def elapsed_ms(self, start, end) -> float:
        if self.device.type == "cuda":
            return start.elapsed_time(end)
        return (end - start) * 1000

    def wrap(self, module, method: str, category: str) -> None:
        call = getattr(module, method)
        if getattr(call, "_a124_bench", False):
            return
        recorder, label = self, type(module).__name__

        def timed(*args, **kwargs):
            if not recorder.active:
                return call(*args, **kwargs)
            start = recorder.mark()
            out = call(*args, **kwargs)
            end = recorder.mark()
            key = None
            if category != "render":
                key = recorder._remember(module, method, label, category, args, kwargs)
            recorder.pending.append((category, key, start, end))
            return out

        timed._a124_bench = True
        setattr(module, method, timed)

    def attach_slot(self, name: str, *objects) -> None:
        """Wrap the networks found in a loaded slot's guidance / prompt processor (attributes, 4 levels deep)."""
        from animate124.core.guidance.diffusion_networks import find_networks

        found = find_networks(objects, depth=4)
        for module in found.denoisers:
            self.wrap(module, "forward", "unets")
        for module in found.vaes:
            self.wrap(module, "encode", "encode")
        self.modules[name] = [weakref.ref(m) for m in found.all()]

    def _remember(self, module, method, label, category, args, kwargs):
        import torch

        from animate124.core.guidance.cuda_graphs import autocast_state

        grad = torch.is_grad_enabled()
        # the attention kernels allowed (sds picks the math kernel for half VAEs): part of what the call costs
        states = (autocast_state(self.device), _attention_state())
        backward = category == "encode" and grad and _first_tensor_arg(args, kwargs).requires_grad
        key = (id(module), category, _signature((args, kwargs)), grad, states, backward)
        if key not in self.samples:
            shapes = [list(t.shape) for t in _tensors((args, kwargs))][:2]
            what = f"{label} {'encode' if category == 'encode' else 'forward'} {shapes}"
            what += " + backward" if backward else ""
            # replayed through the module's own __call__ / method (its hooks run, this wrapper passes through)
            call = module if method == "forward" else getattr(module, method)
            self.samples[key] = (call, _detached((args, kwargs)), grad, states, backward, what)
        return key

    def replay(self, replays: int) -> dict:
        """Median milliseconds of each remembered call replayed alone (after one warm-up); forgets the inputs."""
        import torch

        self.active = False
        timings = {}
        for key, (call, (args, kwargs), grad, (autocast, attention), backward, what) in self.samples.items():
            def once():
                with torch.set_grad_enabled(grad), _autocast_ctx(self.device, autocast), _attention_ctx(attention):
                    if backward:
                        x = _first_tensor_arg(args, kwargs).detach().requires_grad_(True)
                        a = (x,) + tuple(args[1:]) if args else args
                        out = call(*a, **kwargs)
                        _output_tensor(out).float().sum().backward()
                    else:
                        call(*args, **kwargs)

            try:
                once()
            except Exception as error:  # noqa: BLE001  reported: that call is left out of the floor
                print(f"animate124 benchmark: replay of {what} failed ({type(error).__name__}: {error})",
                      file=sys.stderr)
                continue
            times = []
            for _ in range(replays):
                start = self.mark()
                once()
                end = self.mark()
                self.sync()
                times.append(self.elapsed_ms(start, end))
            timings[key] = (statistics.median(times), what)
        self.samples.clear()
        return timings

    def sync(self) -> None:
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def _tensors(obj) -> list:
    import torch

    from animate124.core.guidance.cuda_graphs import tree_leaves

    return [x for x in tree_leaves(obj) if isinstance(x, torch.Tensor)]


def _signature(obj):
    import torch

    if isinstance(obj, torch.Tensor):
        return ("T", tuple(obj.shape), str(obj.dtype), obj.requires_grad)
    if isinstance(obj, (list, tuple)):
        return tuple(_signature(v) for v in obj)
    if isinstance(obj, dict):
        return tuple((k, _signature(v)) for k, v in sorted(obj.items()))
    return repr(obj)[:80]


def _detached(obj):
    """``obj`` with detached copies of its tensors (the same nesting)."""
    import torch

    from animate124.core.guidance.cuda_graphs import tree_leaves, tree_rebuild

    return tree_rebuild(obj, iter([x.detach().clone() if isinstance(x, torch.Tensor) else x for x in tree_leaves(obj)]))


def _first_tensor_arg(args, kwargs):
    for t in _tensors((args, kwargs)):
        return t
    raise ValueError("a recorded VAE encode had no tensor input")


def _output_tensor(out):
    """The tensor a VAE encode returns (the posterior's parameters, or AutoencoderTiny's latents)."""
    import torch

    if isinstance(out, torch.Tensor):
        return out
    dist = getattr(out, "latent_dist", None)
    if dist is not None:
        return dist.parameters
    if getattr(out, "latents", None) is not None:
        return out.latents
    return out[0] if not hasattr(out[0], "parameters") else out[0].parameters


_ATTENTION_FLAGS = (  # (getter, setter) in torch.backends.cuda; those this torch lacks are skipped
    ("flash_sdp_enabled", "enable_flash_sdp"), ("mem_efficient_sdp_enabled", "enable_mem_efficient_sdp"),
    ("math_sdp_enabled", "enable_math_sdp"), ("cudnn_sdp_enabled", "enable_cudnn_sdp"),
    ("fp16_bf16_reduction_math_sdp_allowed", "allow_fp16_bf16_reduction_math_sdp"),
)


def _attention_state() -> tuple:
    """Which scaled-dot-product attention kernels are allowed now (global flags, as ``sdpa_kernel`` sets them)."""
    import torch

    backends = torch.backends.cuda
    return tuple((setter, getattr(backends, getter)()) for getter, setter in _ATTENTION_FLAGS
                 if hasattr(backends, getter) and hasattr(backends, setter))


@contextmanager
def _attention_ctx(state: tuple):
    import torch

    backends = torch.backends.cuda
    before = _attention_state()
    try:
        for setter, value in state:
            getattr(backends, setter)(value)
        yield
    finally:
        for setter, value in before:
            getattr(backends, setter)(value)


def _autocast_ctx(device, state):
    import torch

    enabled, dtype = state
    return torch.autocast(device.type, dtype=dtype) if enabled else nullcontext()


def autocast_for(device, precision: str):
    """The trainer's precision context for evaluation renders (Lightning applies it in validation / test)."""
    import torch

    def ctx():
        if precision.startswith("16") and device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.float16)
        if precision.startswith("bf16"):
            return torch.autocast(device.type, dtype=torch.bfloat16)
        return nullcontext()

    return ctx


def compiled_graphs() -> int:
    """Graphs torch.compile has built (0 while torch._dynamo was never imported) and CUDA graphs ``cuda-graphs``
    has recorded so far in this process."""
    from animate124.core.guidance.cuda_graphs import records_total

    dynamo_utils = sys.modules.get("torch._dynamo.utils")
    return (int(dynamo_utils.counters["stats"]["unique_graphs"]) if dynamo_utils is not None else 0) + records_total()
