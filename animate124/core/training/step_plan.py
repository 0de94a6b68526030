"""What one training step computes: (stage, step, clip) -> renders, guidance slots and weighted loss terms.

The system only executes a :class:`StepPlan`; every rule about which loss runs when lives here, with no framework.

Views (the keys of a training batch): ``video`` (the clip, one camera and time per frame), ``random`` (random
cameras at t = 0) and ``ref`` (the reference view at t = 0).

* **Video stages** (a ``video`` or ``controlnet`` slot is active): the clip is rendered every step and feeds those
  slots and the normal smoothness. *Anchoring* steps add the image slots on the random view and the reference terms
  (``rgb``, ``mask``, ``depth``) on the reference view. Anchoring = the clip starts at t = 0 (upstream threestudio,
  about 10 % of steps) or, with ``anchor_interval`` k > 0, also every k-th step.
* **Image stages** (only ``image`` slots): the random view is rendered every step and feeds the image slots, the
  normal smoothness, ``sparsity`` and ``opaque``; the reference terms run every ``static_ref_interval`` steps.
* ``time_smoothness`` samples the 4-D field directly (no render).

Loss weights: a slot's ``loss_<key>`` output weighs ``<slot>_<key>`` if given, else ``<slot>``. A term or slot whose
weight is 0 (or absent) is not computed. :func:`check_weights` rejects at configure time every weight a stage can
never compute.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Optional

from animate124.core.training.stages import Stage

__all__ = [
    "GuidanceSlot",
    "StepPlan",
    "OWN_TERMS",
    "PARAM_GROUPS",
    "parse_slots",
    "check_weights",
    "plan_step",
    "slot_weight",
]

SLOT_KEYS = ("guidance_type", "guidance", "prompt_processor_type", "prompt_processor", "input")
SLOT_INPUTS = ("image", "video", "controlnet")
REFERENCE_TERMS = ("rgb", "mask", "depth")
IMAGE_STAGE_TERMS = ("sparsity", "opaque")
OWN_TERMS = REFERENCE_TERMS + ("normal_smoothness_2d",) + IMAGE_STAGE_TERMS + ("time_smoothness",)
PARAM_GROUPS = ("field_3d", "field_4d", "density_mlp", "feature_mlp", "background")


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
    ``terms``: own term -> (view it is computed on, or None for ``time_smoothness``, and its weight).
    ``anchor``: the reference view ran (logged; the image slots of video stages run exactly then).
    """

    stage: str
    renders: dict[str, bool] = field(default_factory=dict)
    slots: tuple[tuple[str, str], ...] = ()
    terms: dict[str, tuple[Optional[str], float]] = field(default_factory=dict)
    anchor: bool = False


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
            if key in OWN_TERMS:
                reason = None
                if key in IMAGE_STAGE_TERMS and video:
                    reason = "it is computed on the random view of image-only stages; this stage renders video"
                elif key in REFERENCE_TERMS and not video and static_ref_interval <= 0:
                    reason = "system.static_ref_interval <= 0 never renders the reference view in image stages"
                elif key == "depth" and has_ref_depth is False:
                    reason = "there is no reference depth: set data.depth_path (animate124 preprocess writes depth.png)"
                elif key == "time_smoothness" and not stage.trains("field_4d"):
                    reason = "it only reaches the 4-D grid (field_4d), which this stage does not train"
                if reason:
                    raise ValueError(f"{where}: loss weight {key!r} cannot be used: {reason}; remove the weight")
            elif slot is None:
                raise ValueError(f"{where}: loss weight {key!r} names neither a slot ({list(slots)}) nor a system "
                                 f"term ({list(OWN_TERMS)})")
            elif slot not in stage.guidances:
                raise ValueError(f"{where}: loss weight {key!r} is for slot {slot!r}, which is not in this stage's "
                                 f"guidances {list(stage.guidances)}; add the slot or remove the weight")


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
    terms: dict[str, tuple[Optional[str], float]] = {}
    if on("normal_smoothness_2d"):
        terms["normal_smoothness_2d"] = (main_view, float(weights["normal_smoothness_2d"]))
    if not video_stage:
        terms.update({k: ("random", float(weights[k])) for k in IMAGE_STAGE_TERMS if on(k)})
    if anchor:
        terms.update({k: ("ref", float(weights[k])) for k in REFERENCE_TERMS if on(k)})
    if on("time_smoothness"):
        terms["time_smoothness"] = (None, float(weights["time_smoothness"]))
    views = {v for _, v in run} | {v for v, _ in terms.values() if v is not None}
    renders = {v: v == main_view and "normal_smoothness_2d" in terms for v in ("video", "random", "ref") if v in views}
    return StepPlan(stage.name, renders, tuple(run), terms, anchor)


def slot_weight(weights: Mapping[str, float], slot: str, key: str) -> float:
    """Weight of a slot's ``loss_<key>`` output: ``<slot>_<key>`` if given, else ``<slot>``, else 0."""
    return float(weights.get(f"{slot}_{key}", weights.get(slot, 0.0)))
