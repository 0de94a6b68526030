"""Assertion helpers shared by test modules (tests/ is on sys.path through tests/conftest.py)."""
from __future__ import annotations

import contextlib
import re

import jaxtyping
import pytest
import torch


@contextlib.contextmanager
def bad_input(match):
    """Our ValueError naming the problem, or (in the runtime shape-checking tier) the checker's TypeError first."""
    with pytest.raises((ValueError, jaxtyping.TypeCheckError)) as info:
        yield
    if info.type is ValueError:
        assert re.search(match, str(info.value)), str(info.value)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread for a test module that imports this: two threads on a busy 2-core machine spin-wait and the
    tiny convolutions get ~40x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def step_record(record) -> dict:
    """A system's ``last_step`` (``core.training.step_plan.StepRecord``) as a plain dict, its tensors as floats."""
    return {"stage": record.stage, "guidances": list(record.guidances), "anchor": record.anchor,
            "loss": float(record.loss), "losses": {k: float(v) for k, v in record.losses.items()},
            "weights": dict(record.weights)}


class ReplayingGraph:
    """A CPU stand-in for ``animate124.core.guidance.cuda_graphs.CudaGraph`` with a real CUDA graph's contract: recording runs
    the function once on the recorded input buffers and keeps its output tensors; a replay computes again *from those
    buffers* and writes the result *into those same output tensors* (earlier results are overwritten)."""

    @staticmethod
    def supports(device: torch.device) -> bool:
        return device.type == "cpu"

    def __init__(self, pool, device) -> None:
        self.fn = self.out = None

    def record(self, fn):
        self.fn, self.out = fn, fn()
        return self.out

    def replay(self) -> None:
        for old, value in zip(_tensors(self.out), _tensors(self.fn())):
            old.copy_(value)


def _tensors(out) -> list:
    if torch.is_tensor(out):
        return [out]
    if isinstance(out, dict):
        out = list(out.values())
    return [t for v in out for t in _tensors(v)] if isinstance(out, (list, tuple)) else []
