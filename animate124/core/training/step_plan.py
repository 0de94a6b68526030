"""What one training step computes: (stage, step, clip) -> renders, guidance slots and weighted loss terms.

The system only executes a :class:`StepPlan`; every rule about which loss runs when lives here, with no framework.

Views (the keys of a training batch): ``video`` (the clip, one camera and time per frame), ``random`` (random
cameras at t = 0) and ``ref`` (the reference view at t = 0).

* **Video stages** (a ``video`` or ``controlnet`` slot is active): the clip is rendered every step and feeds those
  slots. *Anchoring* steps add the image slots on the random view and the reference-view terms. Anchoring = the clip
  starts at t = 0 (upstream threestudio, about 10 % of steps) or, with ``anchor_interval`` k > 0, also every k-th step.
* **Image stages** (only ``image`` slots): the random view is rendered every step and feeds the image slots; the
  reference-view terms run every ``static_ref_interval`` steps.

Where each own loss term is computed (reference view, the stage's main render, the random view of image-only stages,
or no render) is its entry in :data:`animate124.core.training.losses.LOSSES`.

Loss weights: a slot's ``loss_<key>`` output weighs ``<slot>_<key>`` if given, else ``<slot>``. A term or slot whose
weight is 0 (or absent) is not computed. :func:`check_weights` rejects at configure time every weight a stage can
never compute.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Optional

from torch import Tensor

from animate124.core.training.losses import LOSSES, OwnLoss
from animate124.core.training.stages import PARAM_GROUPS, Stage

__all__ = [
    "GuidanceSlot",
    "StepPlan",
    "StepRecord",
    "parse_slots",
    "check_weights",
    "plan_step",
    "slot_weight",
]

SLOT_KEYS = ("guidance_type", "guidance", "prompt_processor_type", "prompt_processor", "input")
SLOT_INPUTS = ("image", "video", "controlnet")


@dataclass(frozen=True)
class GuidanceSlot:
    """One entry of ``system.guidances``: a guidance (and optional prompt processor) fed by one view."""

    name: str
    guidance_type: str
    guidance: dict
    prompt_processor_type: str
    prompt_processor: dict
    input: str

    @property
    def view(self) -> str:
        """The batch view whose render feeds the slot (image slots: random views at t = 0)."""
        return "random" if self.input == "image" else "video"


@dataclass(frozen=True)
class StepPlan:
    """What a step computes.

    ``renders``: view -> whether that render needs normals, in render order. ``slots``: (slot, view) pairs.
    ``terms``: own term -> (the batch view it is computed on, or None for a ``field`` term, and its weight), in the
    order of :data:`~animate124.core.training.losses.LOSSES`.
    ``anchor``: the reference view ran (logged; the image slots of video stages run exactly then).
    """

    stage: str
    renders: dict[str, bool] = field(default_factory=dict)
    slots: tuple[tuple[str, str], ...] = ()
    terms: dict[str, tuple[Optional[str], float]] = field(default_factory=dict)
    anchor: bool = False


@dataclass(frozen=True)
class StepRecord:
    """What a training step computed: the system's ``last_step``, read by the non-finite guard.

    ``guidances``: the slots that ran. ``losses``: term -> its unweighted value (detached 0-d tensor; slot outputs are
    named ``<slot>:<key>``, own terms by their name); ``weights``: term -> the weight it was summed with; ``loss``:
    the total sum_i weights[i] * losses[i] (detached). Tensors, not floats: reading a value waits for the GPU.
    """

    stage: str
    guidances: tuple[str, ...]
    anchor: bool
    loss: Tensor
    losses: dict[str, Tensor]
    weights: dict[str, float]


def parse_slots(raw: Mapping[str, Any]) -> dict[str, GuidanceSlot]:
    """Validate the ``guidances:`` mapping: unknown keys, a missing type or a wrong input each get one line."""
    slots = {}
    for name, entry in dict(raw).items():
        if not isinstance(entry, Mapping):
            raise TypeError(f"system.guidances.{name} must be a mapping with keys {list(SLOT_KEYS)}")
        entry = dict(entry)
        unknown = sorted(set(entry) - set(SLOT_KEYS))
        if unknown:
            raise ValueError(f"system.guidances.{name}: unknown keys {unknown}; allowed: {list(SLOT_KEYS)}")
        if not entry.get("guidance_type"):
            raise ValueError(f"system.guidances.{name}.guidance_type is missing: name a registered guidance")
        slot_input = entry.get("input", "image")
        if slot_input not in SLOT_INPUTS:
            raise ValueError(f"system.guidances.{name}.input={slot_input!r}; allowed: {list(SLOT_INPUTS)}")
        slots[name] = GuidanceSlot(
            name, entry["guidance_type"], dict(entry.get("guidance") or {}), entry.get("prompt_processor_type") or "",
            dict(entry.get("prompt_processor") or {}), slot_input,
        )
    return slots


def _is_video_stage(stage: Stage, slots: Mapping[str, GuidanceSlot]) -> bool:
    return any(slots[g].input != "image" for g in stage.guidances)


def _slot_of(key: str, slots: Mapping[str, GuidanceSlot]) -> Optional[str]:
    """The slot a weight key belongs to (``<slot>`` or ``<slot>_<key>``, the longest slot name wins), else None."""
    owners = [s for s in slots if key == s or key.startswith(f"{s}_")]
    return max(owners, key=len) if owners else None


def check_weights(
    stages: tuple[Stage, ...],
    slots: Mapping[str, GuidanceSlot],
    static_ref_interval: int = 1,
    has_ref_depth: Optional[bool] = None,
) -> None:
    """Reject, with one line naming the stage and the key, every weight or setting a stage can never use.

    ``has_ref_depth``: whether the data has a reference depth (None = not known yet, not checked).
    """
    for stage in stages:
        where = f"stage {stage.name!r}"
        missing = [g for g in stage.guidances if g not in slots]
        if missing:
            raise ValueError(f"{where} uses guidances {missing} not declared under system.guidances ({list(slots)})")
        groups = [g for g in list(stage.learning_rates) + list(stage.trainable or ()) if g not in PARAM_GROUPS]
        if groups:
            raise ValueError(f"{where}: unknown parameter groups {groups}; allowed: {list(PARAM_GROUPS)}")
        video = _is_video_stage(stage, slots)
        for key in stage.loss_weights:
            slot = _slot_of(key, slots)
            if key in LOSSES:
                reason = _unusable(LOSSES[key], stage, video, static_ref_interval, has_ref_depth)
                if reason:
                    raise ValueError(f"{where}: loss weight {key!r} cannot be used: {reason}; remove the weight")
            elif slot is None:
                raise ValueError(f"{where}: loss weight {key!r} names neither a slot ({list(slots)}) nor a system "
                                 f"term ({list(LOSSES)})")
            elif slot not in stage.guidances:
                raise ValueError(f"{where}: loss weight {key!r} is for slot {slot!r}, which is not in this stage's "
                                 f"guidances {list(stage.guidances)}; add the slot or remove the weight")


def _unusable(loss: OwnLoss, stage: Stage, video: bool, static_ref_interval: int,
              has_ref_depth: Optional[bool]) -> Optional[str]:
    """Why ``stage`` can never compute ``loss`` (None: it can)."""
    if loss.view == "image_stage" and video:
        return "it is computed on the random view of image-only stages; this stage renders video"
    if loss.view == "reference" and not video and static_ref_interval <= 0:
        return "system.static_ref_interval <= 0 never renders the reference view in image stages"
    if loss.needs_ref_depth and has_ref_depth is False:
        return "there is no reference depth: set data.depth_path (animate124 preprocess writes depth.png)"
    if loss.trains is not None and not stage.trains(loss.trains):
        return (f"it only reaches {PARAM_GROUPS[loss.trains].description} ({loss.trains}), which this stage does not "
                "train")
    return None


def is_anchor_step(video_stage: bool, step: int, start_from_zero: bool, anchor_interval: int,
                   static_ref_interval: int) -> bool:
    """Whether the reference view (and, in video stages, the image slots) runs at this step."""
    if video_stage:
        return start_from_zero or (anchor_interval > 0 and step % anchor_interval == 0)
    return static_ref_interval > 0 and step % static_ref_interval == 0


def plan_step(
    stage: Stage,
    slots: Mapping[str, GuidanceSlot],
    weights: Mapping[str, float],
    step: int,
    start_from_zero: bool,
    anchor_interval: int = 0,
    static_ref_interval: int = 1,
) -> StepPlan:
    """The plan of one step.

    Args:
        stage / slots: validated by :func:`check_weights`.
        weights: the stage's loss weights evaluated at this step (schedules resolved); absent keys weigh 0.
        step: the global step; start_from_zero: the clip of this batch starts at t = 0.
    """
    video_stage = _is_video_stage(stage, slots)
    anchor = is_anchor_step(video_stage, step, start_from_zero, anchor_interval, static_ref_interval)
    main_view = "video" if video_stage else "random"

    def on(key: str) -> bool:
        return float(weights.get(key, 0.0)) > 0

    active = [g for g in stage.guidances if any(on(k) and _slot_of(k, slots) == g for k in weights)]
    run = [(g, slots[g].view) for g in active if slots[g].view == main_view or anchor]
    # term view -> (whether it runs at this step, the batch view it is computed on)
    where = {"main": (True, main_view), "image_stage": (not video_stage, "random"), "reference": (anchor, "ref"),
             "field": (True, None)}
    terms: dict[str, tuple[Optional[str], float]] = {}
    normals: set[str] = set()
    for name, loss in LOSSES.items():
        runs, view = where[loss.view]
        if runs and on(name):
            terms[name] = (view, float(weights[name]))
            if loss.normals:
                normals.add(view)
    views = {v for _, v in run} | {v for v, _ in terms.values() if v is not None}
    renders = {v: v in normals for v in ("video", "random", "ref") if v in views}
    return StepPlan(stage.name, renders, tuple(run), terms, anchor)


def slot_weight(weights: Mapping[str, float], slot: str, key: str) -> float:
    """Weight of a slot's ``loss_<key>`` output: ``<slot>_<key>`` if given, else ``<slot>``, else 0."""
    return float(weights.get(f"{slot}_{key}", weights.get(slot, 0.0)))
