"""The step plan: which renders, slots and weighted terms each stage of the shipped recipe runs, and the
configure-time rejection of weights a stage cannot compute."""
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from animate124.core.training.stages import parse_stages
from animate124.core.training.step_plan import check_weights, parse_slots, plan_step, slot_weight

CONFIG = Path(__file__).resolve().parents[2] / "configs" / "animate124.yaml"


@pytest.fixture(scope="module")
def recipe():
    system = OmegaConf.load(CONFIG).system
    stages = parse_stages(OmegaConf.to_container(system.stages, resolve=False))
    slots = parse_slots(OmegaConf.to_container(system.guidances, resolve=False))
    check_weights(stages, slots, has_ref_depth=False)  # the shipped recipe passes its own check
    return {s.name: s for s in stages}, slots, system.anchor_interval


def _plan(recipe, name, step, start_from_zero):
    stages, slots, anchor_interval = recipe
    stage = stages[name]
    weights = {k: float(v) for k, v in stage.loss_weights.items()}
    return plan_step(stage, slots, weights, step, start_from_zero, anchor_interval)


def test_static_stage_every_step(recipe):
    plan = _plan(recipe, "static", 3, False)
    assert plan.renders == {"random": True, "ref": False}  # normals only where normal smoothness reads them
    assert plan.slots == (("sd", "random"), ("zero123", "random"))
    assert plan.terms == {"normal_smoothness_2d": ("random", 1000.0), "rgb": ("ref", 1000.0), "mask": ("ref", 100.0)}
    assert plan.anchor


def test_dynamic_stage_anchors_only_on_clips_from_zero_as_upstream(recipe):
    assert recipe[2] == 0  # the shipped recipe anchors as upstream threestudio
    plain = _plan(recipe, "dynamic", 12, False)
    assert plain.renders == {"video": True}
    assert plain.slots == (("video", "video"),)
    assert plain.terms == {"normal_smoothness_2d": ("video", 1000.0), "time_smoothness": (None, 5e-5)}
    assert not plain.anchor
    assert not _plan(recipe, "dynamic", 16, False).anchor  # no fixed interval
    anchored = _plan(recipe, "dynamic", 13, True)
    assert anchored.renders == {"video": True, "random": False, "ref": False}
    assert anchored.slots == (("video", "video"), ("zero123", "random"))
    assert anchored.terms == {"normal_smoothness_2d": ("video", 1000.0), "rgb": ("ref", 1000.0),
                              "mask": ("ref", 100.0), "time_smoothness": (None, 5e-5)}


def test_refine_stage_and_the_interval_option(recipe):
    stages, slots, _ = recipe
    refine = stages["refine"]
    weights = {k: float(v) for k, v in refine.loss_weights.items()}
    plan = plan_step(refine, slots, weights, 20, False, anchor_interval=4)  # our earlier option: every 4th step too
    assert plan.anchor and [s for s, _ in plan.slots] == ["video", "zero123", "cn"]
    assert not plan_step(refine, slots, weights, 21, False, anchor_interval=4).anchor


def test_zero_weight_is_not_computed(recipe):
    stages, slots, _ = recipe
    weights = {"video": 1.0, "zero123": 0.0, "rgb": 0.0, "mask": 100.0}
    plan = plan_step(stages["dynamic"], slots, weights, 0, True)
    assert plan.slots == (("video", "video"),) and plan.terms == {"mask": ("ref", 100.0)}
    assert plan.renders == {"video": False, "ref": False}


def test_slot_weight_specific_key_first():
    assert slot_weight({"sd": 0.5, "sd_img": 2.0}, "sd", "img") == 2.0
    assert slot_weight({"sd": 0.5}, "sd", "sds") == 0.5
    assert slot_weight({}, "sd", "sds") == 0.0


SLOTS = {"sd": {"guidance_type": "x", "input": "image"}, "video": {"guidance_type": "y", "input": "video"}}


@pytest.mark.parametrize("stage, kwargs, match", [
    ({"name": "a", "steps": 1, "guidances": ["video"], "loss_weights": {"sd": 1.0}}, {},
     r"stage 'a': loss weight 'sd' is for slot 'sd', which is not in this stage's guidances \['video'\]"),
    ({"name": "a", "steps": 1, "guidances": ["video"], "loss_weights": {"sd_img": 1.0}}, {}, "'sd_img' is for slot 'sd'"),
    ({"name": "a", "steps": 1, "guidances": ["video"], "loss_weights": {"sparsity": 1.0}}, {},
     "'sparsity' cannot be used: it is computed on the random view of image-only stages"),
    ({"name": "a", "steps": 1, "guidances": ["sd"], "loss_weights": {"rgb": 1.0}}, {"static_ref_interval": 0},
     "'rgb' cannot be used: system.static_ref_interval"),
    ({"name": "a", "steps": 1, "guidances": ["sd"], "loss_weights": {"depth": 1.0}}, {"has_ref_depth": False},
     "'depth' cannot be used: there is no reference depth: set data.depth_path"),
    ({"name": "a", "steps": 1, "guidances": ["sd"], "trainable": ["field_3d"], "loss_weights": {"time_smoothness": 1.0}},
     {}, "'time_smoothness' cannot be used: it only reaches the 4-D grid"),
    ({"name": "a", "steps": 1, "guidances": ["sd"], "loss_weights": {"rbg": 1.0}}, {}, "'rbg' names neither a slot"),
    ({"name": "a", "steps": 1, "guidances": ["cn"]}, {}, r"uses guidances \['cn'\] not declared"),
    ({"name": "a", "steps": 1, "learning_rates": {"field3d": 0.1}}, {}, r"unknown parameter groups \['field3d'\]"),
])
def test_check_weights_rejects_what_a_stage_cannot_compute(stage, kwargs, match):
    with pytest.raises(ValueError, match=match) as info:
        check_weights(parse_stages([stage]), parse_slots(SLOTS), **kwargs)
    assert "\n" not in str(info.value)


def test_check_weights_accepts_depth_when_unknown_or_present():
    stage = parse_stages([{"name": "a", "steps": 1, "guidances": ["sd"], "loss_weights": {"depth": 1.0}}])
    check_weights(stage, parse_slots(SLOTS), has_ref_depth=None)
    check_weights(stage, parse_slots(SLOTS), has_ref_depth=True)


@pytest.mark.parametrize("raw, match", [
    ({"sd": {"guidance_type": "x", "prompt": "a"}}, r"system.guidances.sd: unknown keys \['prompt'\]"),
    ({"sd": {"input": "image"}}, "guidance_type is missing"),
    ({"sd": {"guidance_type": "x", "input": "clip"}}, "input='clip'"),
])
def test_parse_slots_names_the_problem(raw, match):
    with pytest.raises(ValueError, match=match):
        parse_slots(raw)


@pytest.mark.parametrize("path", sorted(CONFIG.parent.glob("animate124*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_passes_the_weight_check(path):
    system = OmegaConf.load(path).system
    stages = parse_stages(OmegaConf.to_container(system.stages, resolve=False))
    check_weights(stages, parse_slots(OmegaConf.to_container(system.guidances, resolve=False)),
                  system.get("static_ref_interval", 1))
    if path.name != "animate124-oracle.yaml":  # a test tool, not a recipe: it anchors every 4th step by design
        assert system.get("anchor_interval", 0) == 0  # every recipe anchors as upstream


def test_all_exports_import():
    from animate124.core.training import step_plan

    assert all(hasattr(step_plan, name) for name in step_plan.__all__)
