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
