"""The step plan: which renders, slots and weighted terms each stage of the shipped recipe runs; every own term and
every slot input the schema allows, in video and image stages, anchoring on and off, each with its weight; and the
configure-time rejection of weights a stage cannot compute."""
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from animate124.core.training.losses import LOSSES
from animate124.core.training.stages import parse_stages
from animate124.core.training.step_plan import check_weights, is_anchor_step, parse_slots, plan_step, slot_weight

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


# ---- every term, every slot input, both stage kinds, anchoring on and off ------------------------------------------

# Written from the method, not read from losses.LOSSES: per own term and stage kind, the batch view it is computed on
# (None: the field, no render) and whether it runs every step or only on anchoring steps; "rejected": check_weights
# refuses the weight in that kind of stage.
WHERE = {
    "rgb": {"video": ("ref", "anchor"), "image": ("ref", "anchor")},
    "mask": {"video": ("ref", "anchor"), "image": ("ref", "anchor")},
    "depth": {"video": ("ref", "anchor"), "image": ("ref", "anchor")},
    "normal_smoothness_2d": {"video": ("video", "every"), "image": ("random", "every")},
    "sparsity": {"video": "rejected", "image": ("random", "every")},
    "opaque": {"video": "rejected", "image": ("random", "every")},
    "time_smoothness": {"video": (None, "every"), "image": (None, "every")},
}
WITH_NORMALS = {"normal_smoothness_2d"}  # the render it reads must carry normals
ALL_SLOTS = {"sd": {"guidance_type": "x", "input": "image"}, "zero123": {"guidance_type": "x", "input": "image"},
             "video": {"guidance_type": "y", "input": "video"}, "cn": {"guidance_type": "z", "input": "controlnet"}}
MAIN_SLOT = {"image": "sd", "video": "video", "controlnet": "cn"}  # stage kind -> its main slot
MAIN_VIEW = {"image": "random", "video": "video", "controlnet": "video"}


def _stage(kind, weights, **extra):
    return parse_stages([{"name": kind, "steps": 10, "guidances": [MAIN_SLOT[kind]], "loss_weights": weights,
                          **extra}])


def _anchor_args(kind, anchor):
    """(step, start_from_zero, static_ref_interval) making the step anchor or not, for that kind of stage."""
    if kind == "image":
        return (4 if anchor else 5), False, 2  # the reference view every 2nd step
    return 5, anchor, 1  # video stages: the clip starts at t = 0


def test_the_table_below_covers_every_own_term():
    """Catches a new own term added without its row here (and so without a test of where it runs)."""
    assert set(WHERE) == set(LOSSES)


@pytest.mark.parametrize("anchor", [True, False], ids=["anchor", "plain"])
@pytest.mark.parametrize("kind", ["image", "video", "controlnet"])
@pytest.mark.parametrize("term", sorted(WHERE))
def test_each_own_term_in_each_stage_kind(term, kind, anchor):
    """Catches an own term computed on the wrong view, at the wrong steps (a reference term on every step of a video
    stage, an image-stage term in a video stage), with the wrong weight, rendered without the normals it reads, or
    normals rendered for nothing; and a term accepted where it can never run."""
    weight = 0.375
    weights = {MAIN_SLOT[kind]: 1.0, term: weight}
    step, start_from_zero, interval = _anchor_args(kind, anchor)
    stage = _stage(kind, weights)
    rule = WHERE[term]["image" if kind == "image" else "video"]
    if rule == "rejected":
        with pytest.raises(ValueError, match=rf"stage '{kind}': loss weight '{term}' cannot be used: it is computed "
                                             "on the random view of image-only stages; this stage renders video"):
            check_weights(stage, parse_slots(ALL_SLOTS), interval)
        return
    check_weights(stage, parse_slots(ALL_SLOTS), interval, has_ref_depth=True)
    plan = plan_step(stage[0], parse_slots(ALL_SLOTS), weights, step, start_from_zero, 0, interval)
    view, when = rule
    runs = when == "every" or anchor
    assert plan.anchor == anchor
    assert plan.terms == ({term: (view, weight)} if runs else {})
    main = MAIN_VIEW[kind]
    rendered = {main} | ({view} if runs and view is not None else set())
    assert set(plan.renders) == rendered
    assert plan.renders == {v: v == view and runs and term in WITH_NORMALS for v in rendered}
    assert plan.slots == ((MAIN_SLOT[kind], main),)


@pytest.mark.parametrize("kind", ["image", "video"])
def test_every_allowed_term_at_once_each_with_its_own_weight(kind):
    """Catches one term's weight given to another (every weight here differs) and a term lost when many run."""
    allowed = [t for t in sorted(WHERE) if WHERE[t][kind] != "rejected"]
    weights = {MAIN_SLOT[kind]: 1.0, **{t: 2.0 ** -(i + 1) for i, t in enumerate(allowed)}}
    step, start_from_zero, interval = _anchor_args(kind, True)
    stage = _stage(kind, weights)
    check_weights(stage, parse_slots(ALL_SLOTS), interval, has_ref_depth=True)
    plan = plan_step(stage[0], parse_slots(ALL_SLOTS), weights, step, start_from_zero, 0, interval)
    assert plan.terms == {t: (WHERE[t][kind][0], weights[t]) for t in allowed}
    main = MAIN_VIEW[kind]
    assert plan.renders == {main: True, "ref": False} if kind == "image" else {"video": True, "ref": False}
    absent = {t: 0.0 for t in allowed}  # weight 0: not computed, nothing rendered for it
    plan = plan_step(stage[0], parse_slots(ALL_SLOTS), {MAIN_SLOT[kind]: 1.0, **absent}, step, start_from_zero, 0,
                     interval)
    assert plan.terms == {} and plan.renders == {main: False}


# slot input -> (stage kind it is tested in, the view it runs on, whether it runs on steps that do not anchor)
SLOT_RULES = [("image", "image", "random", True), ("image", "video", "random", False),
              ("video", "video", "video", True), ("controlnet", "video", "video", True)]


@pytest.mark.parametrize("anchor", [True, False], ids=["anchor", "plain"])
@pytest.mark.parametrize("slot_input, kind, view, every_step", SLOT_RULES,
                         ids=[f"{r[0]}-slot-in-{r[1]}-stage" for r in SLOT_RULES])
def test_each_slot_input_runs_on_its_view_when_it_should(slot_input, kind, view, every_step, anchor):
    """Catches an image slot fed the clip (or a video slot the random view), an image slot of a video stage run on
    every step (upstream runs it with the reference terms only), and a slot with a weight that never runs."""
    slots = {"main": {"guidance_type": "x", "input": "video" if kind == "video" else "image"},
             "probe": {"guidance_type": "y", "input": slot_input}}
    weights = {"main": 1.0, "probe_sds": 0.5}  # a <slot>_<key> weight alone activates the slot
    stage = parse_stages([{"name": "s", "steps": 10, "guidances": ["main", "probe"], "loss_weights": weights}])
    check_weights(stage, parse_slots(slots))
    step, start_from_zero, interval = _anchor_args("image" if kind == "image" else "video", anchor)
    plan = plan_step(stage[0], parse_slots(slots), weights, step, start_from_zero, 0, interval)
    main_view = "random" if kind == "image" else "video"
    expected = (("main", main_view),) + ((("probe", view),) if every_step or anchor else ())
    assert plan.slots == expected
    assert plan.renders == {v: False for v in dict.fromkeys(v for _, v in expected)}
    assert slot_weight(weights, "probe", "sds") == 0.5 and slot_weight(weights, "probe", "aux") == 0.0


def test_a_slot_without_a_positive_weight_does_not_run_and_the_longest_slot_name_owns_a_key():
    """Catches a slot run (and its model called) at weight 0, and a weight ``video_hq`` given to slot ``video``
    (as its ``hq`` output) instead of to slot ``video_hq``."""
    slots = parse_slots({"video": {"guidance_type": "x", "input": "video"},
                         "video_hq": {"guidance_type": "x", "input": "video"}})
    stage = parse_stages([{"name": "s", "steps": 1, "guidances": ["video", "video_hq"],
                           "loss_weights": {"video": 0.0, "video_hq": 2.0}}])
    check_weights(stage, slots)
    plan = plan_step(stage[0], slots, {"video": 0.0, "video_hq": 2.0}, 3, False)
    assert plan.slots == (("video_hq", "video"),)
    plan = plan_step(stage[0], slots, {"video": 1.0, "video_hq": 0.0}, 3, False)
    assert plan.slots == (("video", "video"),)


def test_anchoring_steps_against_their_enumeration():
    """Catches a wrong anchoring rule: a video stage anchors on clips from t = 0 and, with anchor_interval k > 0,
    on every k-th step; an image stage on every static_ref_interval-th step, never with 0."""
    steps = range(13)
    video = {k: [s for s in steps if is_anchor_step(True, s, False, k, 1)] for k in range(5)}
    assert video == {0: [], 1: list(steps), 2: [0, 2, 4, 6, 8, 10, 12], 3: [0, 3, 6, 9, 12], 4: [0, 4, 8, 12]}
    assert all(is_anchor_step(True, s, True, k, 0) for s in steps for k in range(5))  # a clip from t = 0: always
    image = {n: [s for s in steps if is_anchor_step(False, s, True, 2, n)] for n in range(5)}
    assert image == {0: [], 1: list(steps), 2: [0, 2, 4, 6, 8, 10, 12], 3: [0, 3, 6, 9, 12], 4: [0, 4, 8, 12]}


# setting -> (check_weights arguments, stage keys)
SETTINGS = {"defaults": ({}, {}), "static_ref_interval 0": ({"static_ref_interval": 0}, {}),
            "no reference depth": ({"has_ref_depth": False}, {}), "depth not known yet": ({"has_ref_depth": None}, {}),
            "4-D grid frozen": ({}, {"trainable": ["field_3d"]})}
NO_REF = "system.static_ref_interval <= 0 never renders the reference view in image stages"
NO_DEPTH = r"there is no reference depth: set data.depth_path \(animate124 preprocess writes depth.png\)"
NOT_VIDEO = "it is computed on the random view of image-only stages; this stage renders video"
NO_4D = r"it only reaches the 4-D grid \(field_4d\), which this stage does not train"
# own term -> {(setting, stage kind): why check_weights refuses it}; every other combination is accepted
REFUSALS = {
    "rgb": {("static_ref_interval 0", "image"): NO_REF},
    "mask": {("static_ref_interval 0", "image"): NO_REF},
    "depth": {("static_ref_interval 0", "image"): NO_REF, ("no reference depth", "image"): NO_DEPTH,
              ("no reference depth", "video"): NO_DEPTH},
    "normal_smoothness_2d": {},
    "sparsity": {(setting, "video"): NOT_VIDEO for setting in SETTINGS},
    "opaque": {(setting, "video"): NOT_VIDEO for setting in SETTINGS},
    "time_smoothness": {("4-D grid frozen", "image"): NO_4D, ("4-D grid frozen", "video"): NO_4D},
}


@pytest.mark.parametrize("term", sorted(REFUSALS))
def test_check_weights_refuses_each_term_exactly_where_it_cannot_run(term):
    """Catches a term refused where it can run (depth with a reference depth or one not known yet; the reference
    terms in a video stage with static_ref_interval 0, which anchors on clips instead) or accepted where it cannot."""
    assert set(REFUSALS) == set(LOSSES)
    for kind in ("image", "video"):
        for setting, (kwargs, stage_keys) in SETTINGS.items():
            stage = _stage(kind, {MAIN_SLOT[kind]: 1.0, term: 1.0}, **stage_keys)
            args = {"static_ref_interval": 1, "has_ref_depth": True, **kwargs}
            why = REFUSALS[term].get((setting, kind))
            if why is None:
                assert check_weights(stage, parse_slots(ALL_SLOTS), **args) is None, (kind, setting)
            else:
                with pytest.raises(ValueError, match=rf"^stage '{kind}': loss weight '{term}' cannot be used: "
                                                     rf"{why}; remove the weight$"):
                    check_weights(stage, parse_slots(ALL_SLOTS), **args)
