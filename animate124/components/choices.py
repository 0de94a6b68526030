"""Validated string choices for threestudio ``Config`` dataclasses.

threestudio pins ``omegaconf==2.3.0``, which rejects typing.Literal annotations in structured configs
(``ValidationError: Unexpected type annotation``). Choices are therefore typed ``str`` and checked here, in the
Config's ``__post_init__``, so a bad value fails when the component is configured, not at the first forward.
"""
from __future__ import annotations

from typing import Iterable


def check_choice(component: str, key: str, value: str, allowed: Iterable[str]) -> None:
    """Raise one line naming the component key, the value received and the allowed values."""
    allowed = tuple(allowed)
    if value not in allowed:
        raise ValueError(f"{component}: {key}={value!r} is not allowed; choose one of {', '.join(allowed)}")
