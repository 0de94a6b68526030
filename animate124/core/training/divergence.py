"""Where a diverging run went wrong, and which checkpoint still holds sound parameters.

A run whose loss turns NaN/inf has usually diverged a little earlier: its parameters grew (a learning rate too high)
until something overflowed. The checkpoints written in between are finite but hold those grown parameters, so resuming
from the latest one fails again at once. :func:`divergence_onset` finds the first step whose loss was already abnormal;
:func:`checkpoint_before` picks the last checkpoint whose parameters produced a normal loss.

Steps are numbered as Lightning's ``global_step``: step ``s`` runs with the parameters that ``s`` earlier updates made,
and the checkpoint named ``...step=N.ckpt`` holds the parameters after ``N`` updates, i.e. those step ``N`` runs with.
"""
from __future__ import annotations

import re
import statistics
from pathlib import Path
from typing import Iterable, Optional, Sequence

__all__ = ["divergence_onset", "checkpoint_before", "checkpoint_step"]


def divergence_onset(history: Sequence[tuple[int, int, float]], first_bad: int, stage: int, window: int = 20,
                     factor: float = 10.0) -> int:
    """The first step of the divergence that ended in a non-finite loss at ``first_bad``.

    Args:
        history: ``(step, stage index, finite total loss)`` of the steps that ran, in order.
        first_bad: the first step of the final run of non-finite steps.
        stage: the stage index of ``first_bad``; the look-back stays inside it (each stage weighs its losses
            differently, so a change of stage is not a divergence).
        window: finite steps of that stage before a step that form its baseline (their median).
        factor: a loss above ``factor`` times the baseline's magnitude is abnormal.

    Returns:
        The earliest step ``t`` such that every step of the stage from ``t`` to ``first_bad - 1`` had an abnormal loss
        (each against the ``window`` steps before it); ``first_bad`` when the step before it was normal (the loss went
        from normal straight to non-finite).

    Example: losses 1.0 at steps 0..29, then 50, 400, 3000 at steps 30..32, NaN at 33 -> 30.
    """
    before = [(s, loss) for s, st, loss in history if s < first_bad and st == stage]
    onset, i = first_bad, len(before) - 1
    while i >= window:
        baseline = abs(statistics.median(loss for _, loss in before[i - window:i]))
        if abs(before[i][1]) > factor * baseline and before[i][0] == onset - 1:
            onset, i = before[i][0], i - 1
        else:
            break
    return onset


def checkpoint_step(path: str | Path) -> Optional[int]:
    """``N`` of a checkpoint named like Lightning's default ``epoch=E-step=N.ckpt``; None for ``last.ckpt`` and
    others."""
    found = re.search(r"step=(\d+)", Path(path).name)
    return int(found.group(1)) if found else None


def checkpoint_before(paths: Iterable[str | Path], onset: int) -> Optional[tuple[Path, int]]:
    """The checkpoint among ``paths`` with the most updates whose parameters step ``onset - 1`` still ran with (a
    normal loss): ``step=N`` with ``N <= onset - 1``, and its ``N``; None when there is none."""
    steps = [(Path(p), checkpoint_step(p)) for p in paths]
    sound = [(p, n) for p, n in steps if n is not None and n <= onset - 1]
    return max(sound, key=lambda item: (item[1], str(item[0]))) if sound else None
