"""Stage schedule of one training run: static -> dynamic -> refine, switched by the global step.

A run is configured with a ``stages:`` mapping from each stage's name to its settings, in the order they run, so
that the command line reaches every value (``system.stages.dynamic.steps=2000``,
``system.stages.refine.loss_weights.cn=3``; ``system.stages.refine=null`` drops a stage)::

    dynamic:                      # the stage's name
      steps: 10000                # > 0 (required)
      guidances: [video, zero123] # guidance slots active in this stage (default: none)
      loss_weights: {sds_video: 1.0, rgb: [0, 1000., 100., 5000]}  # number or a host C() schedule list (default {})
      learning_rates: {field_4d: 0.01, background: 0.001}         # param group -> lr >= 0 (default {})
      trainable: [field_4d, background]                           # param groups that train (default: all; [] = none)

The older list form (``- name: dynamic`` followed by the same keys) is still read; its entries cannot be addressed
from the command line (OmegaConf cannot merge ``system.stages.0.steps=1`` into a list).

The parameter groups (``learning_rates`` / ``trainable`` keys) are named once, in :data:`PARAM_GROUPS`: group ->
the attribute path of its module on the system and what it is.

Stage i covers the global steps [start_i, start_i + steps_i), start_0 = 0, start_{i+1} = start_i + steps_i; the
total is the sum of steps. Steps at or past the total (the host runs validation, test and export at
``global_step == max_steps``) resolve to the **last** stage with ``done=True``, so rendering after training uses the
last stage's settings.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Optional

__all__ = [
    "PARAM_GROUPS",
    "ParamGroup",
    "Stage",
    "StagePosition",
    "STAGE_KEYS",
    "parse_stages",
    "stage_entries",
    "stage_total",
    "stage_starts",
    "total_steps",
    "stage_at",
    "starts_later_stage",
]

STAGE_KEYS = ("name", "steps", "guidances", "loss_weights", "learning_rates", "trainable")


@dataclass(frozen=True)
class ParamGroup:
    """One parameter group: ``path`` = attribute path of its module on the system, ``description`` for messages."""

    path: str
    description: str


# the one list of parameter groups: the stages' learning_rates / trainable keys, the optimizer's groups, the losses'
# ``trains``; a new group is one entry here
PARAM_GROUPS: dict[str, ParamGroup] = {
    "field_3d": ParamGroup("geometry.encoding", "the 3-D grid"),
    "field_4d": ParamGroup("geometry.encoding_time", "the 4-D grid"),
    "density_mlp": ParamGroup("geometry.density_network", "the density MLP"),
    "feature_mlp": ParamGroup("geometry.feature_network", "the colour MLP"),
    "background": ParamGroup("background", "the background"),
}


@dataclass(frozen=True)
class Stage:
    """One validated stage (see the module docstring for the keys).

    ``trainable`` is None when the entry did not set it, meaning every parameter group trains.
    ``loss_weights`` values are floats or tuples (a host ``C()`` schedule, evaluated by the caller; ints are kept as
    ints because ``C()`` reads an integer end step as a global step; evaluate it with ``step_in_stage`` for schedules
    relative to the stage start).
    """

    name: str
    steps: int
    guidances: tuple[str, ...] = ()
    loss_weights: dict[str, float | tuple[int | float, ...]] = field(default_factory=dict)
    learning_rates: dict[str, float] = field(default_factory=dict)
    trainable: Optional[tuple[str, ...]] = None

    def trains(self, group: str) -> bool:
        """Whether the parameter group ``group`` is optimised in this stage."""
        return self.trainable is None or group in self.trainable


class StagePosition(NamedTuple):
    """Where a global step falls: ``index`` of the stage, the ``stage``, ``step_in_stage`` = global step - start
    (>= stage.steps only when ``done``), and ``done`` = the step is at or past the total."""

    index: int
    stage: Stage
    step_in_stage: int
    done: bool


def parse_stages(entries: Any) -> tuple[Stage, ...]:
    """Validate a ``stages:`` mapping (name -> settings) or list (the older form), plain or OmegaConf, and return
    frozen ``Stage`` objects in order.

    ``entries`` is typed ``Any`` on purpose: this is the user-input check, so every wrong shape gets its own message.

    Raises:
        ValueError / TypeError with one line naming the stage, the key, the value and what is allowed: no stage,
        unknown keys, a missing name or steps, non-positive or non-integer steps, duplicate names, negative learning
        rates, non-numeric loss weights, non-string guidance or group names; in the keyed form a stage that trains
        nothing (no guidances, no loss weights: a misspelt name in an override makes such a stage) or a numeric name
        (``system.stages.0.steps=1`` meant for the list form).
    """
    if isinstance(entries, Mapping):
        stages = _parse_keyed(entries)
    elif isinstance(entries, (str, bytes)) or not isinstance(entries, Sequence) or len(entries) == 0:
        raise ValueError(f"stages must map each stage's name to its settings (or be a non-empty list), got {entries!r}")
    else:
        stages = tuple(_parse_one(i, entry) for i, entry in enumerate(entries))
    seen: dict[str, int] = {}
    for i, stage in enumerate(stages):
        if stage.name in seen:
            raise ValueError(
                f"stages[{i}].name={stage.name!r} duplicates stages[{seen[stage.name]}]; names must be unique"
            )
        seen[stage.name] = i
    return stages


def stage_entries(entries: Any) -> list[Any]:
    """The settings mapping of each stage, in order, from either form, unparsed (the same objects, so that scripts
    can edit a loaded config); stages set to null are left out."""
    if isinstance(entries, Mapping):
        return [entry for entry in entries.values() if entry is not None]
    return list(entries)


def stage_total(entries: Any) -> int:
    """The sum of the stages' ``steps`` from either form, unparsed (the ``${a124_total_steps:...}`` config resolver
    that sets ``trainer.max_steps``); values that are not positive integers count 0 (parse_stages names them)."""
    steps = [entry.get("steps") if isinstance(entry, Mapping) else None for entry in stage_entries(entries)]
    return sum(n for n in steps if isinstance(n, int) and not isinstance(n, bool) and n > 0)


def stage_starts(stages: Sequence[Stage]) -> list[int]:
    """Global step at which each stage starts: [0, steps_0, steps_0 + steps_1, ...]."""
    starts, start = [], 0
    for stage in stages:
        starts.append(start)
        start += stage.steps
    return starts


def total_steps(stages: Sequence[Stage]) -> int:
    """Sum of the stages' steps (the host's ``trainer.max_steps``)."""
    return sum(stage.steps for stage in stages)


def stage_at(stages: Sequence[Stage], global_step: int) -> StagePosition:
    """The stage that trains at ``global_step`` (0-based: the step about to run). Past the end: the last stage, done.

    Example: steps (10, 5): steps 0..9 -> stage 0, 10..14 -> stage 1, 15 (= total) -> stage 1 with done=True.
    """
    if not stages:
        raise ValueError("stage_at: stages is empty; build it with parse_stages")
    if global_step < 0:
        raise ValueError(f"stage_at: global_step={global_step} must be >= 0")
    start = 0
    for index, stage in enumerate(stages):
        if global_step < start + stage.steps:
            return StagePosition(index, stage, global_step - start, False)
        start += stage.steps
    last = len(stages) - 1
    return StagePosition(last, stages[last], global_step - (start - stages[last].steps), True)


def starts_later_stage(stages: Sequence[Stage], global_step: int) -> bool:
    """True when ``global_step`` is the first step of a stage other than the first (where the optimizer state is
    reset). Decided from the step alone, so a run resumed exactly at a boundary resets too and one resumed inside a
    stage keeps its state. Example: steps (10, 5): True only at step 10."""
    pos = stage_at(stages, global_step)
    return pos.index > 0 and pos.step_in_stage == 0 and not pos.done


# ----------------------------------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------------------------------


def _parse_keyed(entries: Mapping[Any, Any]) -> tuple[Stage, ...]:
    names = [str(k) for k, v in entries.items() if v is not None]
    if not names:
        raise ValueError(f"stages must name at least one stage (every stage is null or none is given), got {entries!r}")
    stages = []
    for key, entry in entries.items():
        if entry is None:
            continue  # dropped, e.g. system.stages.refine=null
        name, where = str(key), f"stages.{key}"
        if name.isdigit():  # system.stages.0.steps=1, written for the list form
            real = [n for n in names if not n.isdigit()]
            guess = real[int(name)] if int(name) < len(real) else (real[0] if real else "static")
            raise ValueError(f"{where}: stages are keyed by name, not by position: write "
                             f"system.stages.{guess}.<key>=... (its stages: {real})")
        if not isinstance(entry, Mapping):
            raise TypeError(f"{where} must be a mapping with keys {list(STAGE_KEYS[1:])}, got {type(entry).__name__}")
        if entry.get("name", name) != name:
            raise ValueError(f"{where}.name={entry.get('name')!r} differs from its key {name!r}: drop name (the key "
                             "names the stage)")
        if entry.get("guidances") is None and entry.get("loss_weights") is None:
            others = [n for n in names if n != name]
            close = difflib.get_close_matches(name, others, n=1, cutoff=0.6)
            hint = f"did you mean system.stages.{close[0]}? " if close else ""
            raise ValueError(f"{where} has no guidances and no loss_weights, so it would train nothing ({hint}an "
                             f"override with a stage name the config does not have adds such a stage; its stages: "
                             f"{others})")
        stages.append(_parse_one(where, {**dict(entry), "name": name}))
    return tuple(stages)


def _parse_one(i: int | str, entry: Any) -> Stage:
    label = f"stages[{i}]" if isinstance(i, int) else i
    if not isinstance(entry, Mapping):
        raise TypeError(f"{label} must be a mapping with keys {list(STAGE_KEYS)}, got {type(entry).__name__}")
    unknown = sorted(set(map(str, entry.keys())) - set(STAGE_KEYS))
    if unknown:
        raise ValueError(f"{label} has unknown keys {unknown}; allowed keys are {list(STAGE_KEYS)}")
    name = entry.get("name")
    if not isinstance(name, str) or not name:
        raise ValueError(f"{label}.name={name!r} must be a non-empty string")
    where = f"stages[{i}] ({name!r})" if isinstance(i, int) else label
    steps = entry.get("steps")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps <= 0:
        raise ValueError(f"{where}.steps={steps!r} must be a positive integer number of training steps")
    return Stage(
        name=name,
        steps=steps,
        guidances=_names(where, "guidances", entry.get("guidances", ())),
        loss_weights={k: _weight(where, k, v) for k, v in _mapping(where, "loss_weights", entry).items()},
        learning_rates={k: _lr(where, k, v) for k, v in _mapping(where, "learning_rates", entry).items()},
        trainable=None if entry.get("trainable") is None else _names(where, "trainable", entry["trainable"]),
    )


def _mapping(where: str, key: str, entry: Mapping[str, Any]) -> dict[str, Any]:
    value = entry.get(key)
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise TypeError(f"{where}.{key} must be a mapping, got {type(value).__name__} {value!r}")
    if not all(isinstance(k, str) for k in value):
        raise TypeError(f"{where}.{key} keys must be strings, got {list(value)}")
    return dict(value)


def _names(where: str, key: str, value: Any) -> tuple[str, ...]:
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise TypeError(f"{where}.{key} must be a list of names, got {value!r}")
    if not all(isinstance(v, str) and v for v in value) or len(set(value)) != len(value):
        raise ValueError(f"{where}.{key}={list(value)} must hold distinct non-empty strings")
    return tuple(value)


def _number(value: Any) -> Optional[float]:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def _weight(where: str, key: str, value: Any) -> float | tuple[int | float, ...]:
    if _number(value) is not None:
        return float(value)
    # a host C() schedule; ints stay ints (C() reads an integer end step as a global step, a float one as an epoch)
    if (
        isinstance(value, Sequence)
        and not isinstance(value, (str, bytes))
        and (len(value) in (3, 4) or len(value) >= 6)
    ):
        if all(_number(v) is not None for v in value):
            return tuple(value)
    raise ValueError(
        f"{where}.loss_weights.{key}={value!r} must be a finite number or a host C() schedule "
        "[start_value, end_value, end_step] / [start_step, start_value, end_value, end_step] (or longer)"
    )


def _lr(where: str, key: str, value: Any) -> float:
    number = _number(value)
    if number is None or number < 0:
        raise ValueError(f"{where}.learning_rates.{key}={value!r} must be a finite number >= 0")
    return number
