"""What a step does besides taking time: the field's work counters per step (``animate124.core.field.work_counters``)
summarised per stage, and the kernel launches of one whole step."""

from __future__ import annotations

import statistics

import torch

# per-sample ratios derived from the counters: name -> (numerator, denominator)
RATIOS = {
    "marched_per_ray": ("samples_marched", "rays"),
    "samples_per_ray": ("samples", "rays"),
    "normal_queries_per_sample": ("normal_queries", "samples"),
    "grid_queries_per_sample": ("grid4d_fwd", "samples"),
}


def stage_work(steps: list[dict]) -> dict:
    """Mean of each counter over the given steps' counts (a counter a step lacks counts 0 there), and the ratios of
    :data:`RATIOS` of those means (rounded; absent where the denominator is 0)."""
    if not steps:
        return {}
    keys = sorted({k for counts in steps for k in counts})
    work = {k: statistics.mean(counts.get(k, 0) for counts in steps) for k in keys}
    for name, (num, den) in RATIOS.items():
        if work.get(den):
            work[name] = round(work.get(num, 0) / work[den], 3)
    return {k: round(v, 1) if isinstance(v, float) and k not in RATIOS else v for k, v in work.items()}


class LaunchCount:
    """Kernel launches between :meth:`start` and :meth:`stop`: on CUDA the kernels torch.profiler saw run (memory
    copies and fills apart); without CUDA the ATen operators dispatched (each one a kernel on a GPU, for pointwise
    work), counted by a ``TorchDispatchMode``. Triton launches of the hash grids are in the work counters
    (``triton_launches``) on every device."""

    def __init__(self, device) -> None:
        self.cuda = torch.device(device).type == "cuda"
        self._profile = None
        self._mode = None
        self.aten_ops = 0

    def start(self) -> None:
        if self.cuda:
            from torch.profiler import ProfilerActivity, profile

            self._profile = profile(activities=[ProfilerActivity.CUDA])
            self._profile.__enter__()
        else:
            from torch.utils._python_dispatch import TorchDispatchMode

            counter = self

            class _Count(TorchDispatchMode):
                def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                    counter.aten_ops += 1
                    return func(*args, **(kwargs or {}))

            self._mode = _Count()
            self._mode.__enter__()

    def stop(self) -> dict:
        if self._mode is not None:
            self._mode.__exit__(None, None, None)
            self._mode = None
            return {"aten_ops": self.aten_ops}
        if self._profile is None:
            return {}
        torch.cuda.synchronize()
        self._profile.__exit__(None, None, None)
        kinds = {"kernels": 0, "memcpy": 0, "memset": 0}
        for event in self._profile.events():
            if event.device_type != torch.autograd.DeviceType.CUDA:
                continue
            name = event.name.lower()
            kinds["memcpy" if "memcpy" in name else "memset" if "memset" in name else "kernels"] += 1
        self._profile = None
        return {"cuda_kernels": kinds["kernels"], "cuda_memcpy": kinds["memcpy"], "cuda_memset": kinds["memset"]}
