"""A frozen network's no-grad forward replayed as a CUDA graph (``system.compile_denoisers: cuda-graphs``).

Every SDS step calls the same frozen U-Nets with the same shapes, and eager calls are bound by kernel launches: the
SD U-Net took 46.4 ms eager against 12.1 ms replayed from this module's graph (H200, benchmarks/denoiser_compile.py).
``torch.compile``'s ``reduce-overhead`` gets as far after about a minute of compilation per network and
shape, and its outputs are overwritten by the next replay. :class:`GraphedForward` records the *eager* forward
instead (no compilation), once per input signature, and on each call copies the inputs into the graph's own buffers,
replays it and returns copies of its outputs: a result stays valid whatever runs next (the ControlNet's residuals go
into the U-Net; noise predictions live on to the loss).

It runs the plain forward instead when a graph would be wrong or wasted:

- gradient needed: grad mode on and an input requires grad; or any parameter requires grad, in any grad mode (a
  trained LoRA U-Net: autocast would feed the recording its cached casts of those weights, stale after an update);
- an input that is not a tensor, a bool, None, a str or a number, or a tensor not on a device the graphs support;
- a first tensor argument (a denoiser's noisy latents) of more than ``max_sample_elements`` elements: such a call keeps
  the GPU busy long enough to hide its launches, so a graph saves nothing, while its memory pool would keep the
  call's activations from the rest of the step (measured on an H200: the refine stage's ControlNet +
  U-Net on [4, 4, 128, 128] latents took 104 ms eager, 102 ms as a graph, and recording it raised the default
  refine's reserved memory from 22.9 to 30.9 GiB);
- the first call of a signature (it warms cuDNN / cuBLAS up; the second records);
- more than ``max_graphs`` signatures (each holds its input buffers; a timestep passed as a Python number makes a
  signature per value);
- a signature whose recording failed (a forward that waits on the CPU, e.g. ``.item()``): logged once, eager after.

A signature is the tensors' shapes, dtypes and strides, the other arguments' values, autocast, inference mode and
the module's ``training`` flag. What a recording cannot see is frozen in it: attention processors or hooks swapped
after it, or a forward's Python side effects; weights that move or change dtype (``module.to``, ``.half()``) drop
every recording. One caller at a time: the buffers and outputs are shared, as a module's are.

The graphs of one :class:`GraphPool` share one memory pool. That is safe because they replay one at a time on the
calling stream, each writing its temporaries before reading them, and their outputs are copied out right after the
replay, before any other graph runs; the recorded outputs themselves stay referenced, so no later recording reuses them.
"""
from __future__ import annotations

import inspect
import logging
from typing import Any, Callable, Iterable, Iterator, Optional

import torch

__all__ = ["GraphedForward", "GraphPool", "CudaGraph", "autocast_state", "copy_outputs", "records_total", "tree_leaves",
           "tree_rebuild"]

log = logging.getLogger(__name__)
_records_total = 0
_MISSING = object()
_SCALARS = (bool, int, float, str, type(None))
MAX_SAMPLE_ELEMENTS = 200_000
"""Largest first tensor argument recorded, between the calls measured (benchmark JSON ``floor_calls``): recorded, the
SD U-Net [2, 4, 64, 64] (32,768), the fast preset's 512 px ControlNet / U-Net [4, 4, 64, 64] (65,536), the U-Net3D
[2, 4, 16, 32, 32] (131,072); eager, the default refine's compute-bound 1024 px ControlNet / U-Net [4, 4, 128, 128]
(262,144). ``tests/unit/test_cuda_graphs.py`` reads those shapes from the committed results."""
_MAX_SEEN = 64  # signatures remembered as seen once (a Python-number argument makes one per value)
# another thread's CUDA call during a recording (a logger, a loader) is not this graph's business: only this thread's
# calls must be recordable (the option exists from torch 2.1)
_CAPTURE_KW = ({"capture_error_mode": "thread_local"}
               if "capture_error_mode" in inspect.signature(torch.cuda.graph.__init__).parameters else {})


class CudaGraph:
    """One recorded CUDA graph (``torch.cuda.CUDAGraph``); tests substitute a CPU stand-in with the same methods."""

    @staticmethod
    def supports(device: torch.device) -> bool:
        return device.type == "cuda"

    def __init__(self, pool: "GraphPool", device: torch.device) -> None:
        self.graph, self.pool, self.device = torch.cuda.CUDAGraph(), pool, device

    def record(self, fn: Callable[[], Any]) -> Any:
        # one eager run on a side stream first, as torch.cuda.graphs asks (lazy workspaces are made outside the capture)
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            fn()
        torch.cuda.current_stream(self.device).wait_stream(side)
        with torch.cuda.device(self.device), torch.cuda.graph(self.graph, pool=self.pool.handle(self.device),
                                                               **_CAPTURE_KW):
            return fn()

    def replay(self) -> None:
        self.graph.replay()


class GraphPool:
    """One CUDA memory pool per device shared by the graphs of several :class:`GraphedForward` (one slot set)."""

    def __init__(self) -> None:
        self._handles: dict = {}

    def handle(self, device: torch.device):
        if device not in self._handles:
            self._handles[device] = torch.cuda.graph_pool_handle()
        return self._handles[device]


class GraphedForward:
    """``module.forward = GraphedForward(module.forward, module.parameters(), pool)``: see the module docstring.

    ``replays`` / ``records`` / ``eager_calls`` count what the calls did (the tests and the benchmark read them)."""

    def __init__(self, forward: Callable, params: Iterable[torch.Tensor] = (), pool: Optional[GraphPool] = None,
                 max_graphs: int = 8, max_sample_elements: int = MAX_SAMPLE_ELEMENTS, graph_type: Optional[type] = None,
                 name: str = "") -> None:
        self.forward, self.params = forward, list(params)
        self.pool = pool if pool is not None else GraphPool()
        self.max_graphs, self.max_sample_elements = max_graphs, max_sample_elements
        self.graph_type = graph_type or CudaGraph
        self.name = name or getattr(forward, "__qualname__", "forward")
        self._seen: set = set()
        self._graphs: dict = {}  # signature -> _Recorded, or None: eager for good
        self.replays = self.records = self.eager_calls = 0
        self._warned: set = set()
        self._weights = self._weights_where()

    def __call__(self, *args, **kwargs):
        weights = self._weights_where()
        if weights != self._weights:  # moved or cast (module.to, .half()): the recordings read the old storage
            self._graphs.clear()
            self._seen.clear()
            self._weights = weights
        leaves = tree_leaves((args, kwargs))
        key = self._signature(leaves)
        recorded = _MISSING if key is None else self._graphs.get(key, _MISSING)
        if recorded is _MISSING and key is not None and key in self._seen and len(self._graphs) < self.max_graphs:
            recorded = self._graphs[key] = self._record(leaves, (args, kwargs))
        if recorded is _MISSING or recorded is None:
            if key is not None and len(self._seen) < _MAX_SEEN:
                self._seen.add(key)
            self.eager_calls += 1
            return self.forward(*args, **kwargs)
        self.replays += 1
        return recorded.run(leaves)

    def _weights_where(self) -> tuple:
        """Where the first and last parameter live: ``module.to`` / ``.half()`` make new storage for all of them
        (``load_state_dict`` copies in place, which a replay sees)."""
        ends = (self.params[0], self.params[-1]) if self.params else ()
        return tuple((p.data_ptr(), p.device, p.dtype) for p in ends)

    def _signature(self, leaves: list) -> Optional[tuple]:
        """What a recording depends on besides the input values; None: not recordable."""
        tensors = [x for x in leaves if torch.is_tensor(x)]
        if not tensors:
            return None
        device = tensors[0].device
        if not self.graph_type.supports(device) or any(t.device != device for t in tensors):
            return None
        if tensors[0].numel() > self.max_sample_elements:
            return None
        if any(p.requires_grad for p in self.params) or (
                torch.is_grad_enabled() and any(t.requires_grad for t in tensors)):
            return None
        sig = []
        for x in leaves:
            if torch.is_tensor(x):
                sig.append((tuple(x.shape), x.dtype, x.stride()))
            elif isinstance(x, _SCALARS):
                sig.append((type(x), x))
            else:
                return None
        return (device, autocast_state(device), torch.is_inference_mode_enabled(),
                getattr(getattr(self.forward, "__self__", None), "training", None), tuple(sig))

    def _record(self, leaves: list, call: tuple) -> Optional["_Recorded"]:
        try:
            # empty_like keeps the strides of a dense input; an expanded one (stride 0) gets a contiguous buffer
            static = [torch.empty_like(x).copy_(x) if torch.is_tensor(x) else x for x in leaves]
            args, kwargs = tree_rebuild(call, iter(static))
            graph = self.graph_type(self.pool, next(x for x in static if torch.is_tensor(x)).device)
            out = graph.record(lambda: self.forward(*args, **kwargs))
        except Exception as err:  # e.g. "operation not permitted when stream is capturing"
            message = f"{self.name}: CUDA graph recording failed, this input signature runs eager: {err}"
            message = message.splitlines()[0]
            if message not in self._warned:
                self._warned.add(message)
                log.warning(message)
            return None
        global _records_total
        self.records += 1
        _records_total += 1
        return _Recorded(graph, [x for x in static if torch.is_tensor(x)], out)


def records_total() -> int:
    """Graphs recorded so far in this process, by every :class:`GraphedForward` (the step benchmark counts a step that
    recorded as a one-time cost, like a ``torch.compile`` step)."""
    return _records_total


class _Recorded:
    def __init__(self, graph, inputs: list, out) -> None:
        self.graph, self.inputs, self.out = graph, inputs, out

    def run(self, leaves: list):
        for buf, x in zip(self.inputs, (x for x in leaves if torch.is_tensor(x))):
            buf.copy_(x)
        self.graph.replay()
        return copy_outputs(self.out)


def copy_outputs(out):
    """``out`` with every tensor copied, the containers rebuilt (tuple, list, namedtuple, dict, diffusers' outputs)."""
    if torch.is_tensor(out):
        return out.clone()
    if isinstance(out, tuple) and hasattr(out, "_fields"):
        return type(out)(*(copy_outputs(v) for v in out))
    if isinstance(out, (list, tuple)):
        return type(out)(copy_outputs(v) for v in out)
    if isinstance(out, dict):  # diffusers' BaseOutput is an OrderedDict dataclass: rebuilt from keywords
        items = {k: copy_outputs(v) for k, v in out.items()}
        return type(out)(**items) if all(isinstance(k, str) for k in items) else type(out)(items)
    return out


def tree_leaves(tree) -> list:
    """The leaves of nested tuples / lists / dicts (a namedtuple is a leaf), in order."""
    if isinstance(tree, (list, tuple)) and not hasattr(tree, "_fields"):
        return [x for v in tree for x in tree_leaves(v)]
    if isinstance(tree, dict):
        return [x for v in tree.values() for x in tree_leaves(v)]
    return [tree]


def tree_rebuild(tree, new: Iterator):
    """``tree`` with its leaves (in :func:`tree_leaves` order) taken from ``new``."""
    if isinstance(tree, (list, tuple)) and not hasattr(tree, "_fields"):
        return type(tree)(tree_rebuild(v, new) for v in tree)
    if isinstance(tree, dict):
        return {k: tree_rebuild(v, new) for k, v in tree.items()}
    return next(new)


def autocast_state(device: torch.device) -> tuple[bool, Optional[torch.dtype]]:
    """Whether autocast is on for ``device``'s type, and its dtype (None when off): part of what a call computes (the
    step benchmark's call recorder keys and replays its calls by it too)."""
    try:  # torch >= 2.4
        enabled = torch.is_autocast_enabled(device.type)
        dtype = torch.get_autocast_dtype(device.type)
    except (TypeError, AttributeError):
        if device.type == "cuda":
            enabled, dtype = torch.is_autocast_enabled(), torch.get_autocast_gpu_dtype()
        else:
            enabled, dtype = torch.is_autocast_cpu_enabled(), torch.get_autocast_cpu_dtype()
    return enabled, dtype if enabled else None
