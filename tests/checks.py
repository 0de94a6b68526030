"""Assertion helpers shared by test modules (tests/ is on sys.path through tests/conftest.py)."""
from __future__ import annotations

import contextlib
import re

import jaxtyping
import pytest


@contextlib.contextmanager
def bad_input(match):
    """Our ValueError naming the problem, or (in the runtime shape-checking tier) the checker's TypeError first."""
    with pytest.raises((ValueError, jaxtyping.TypeCheckError)) as info:
        yield
    if info.type is ValueError:
        assert re.search(match, str(info.value)), str(info.value)
