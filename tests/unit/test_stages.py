"""Stage schedule: validation and exact step -> stage resolution at the boundaries."""

import pytest

from animate124.core.training import stages as stages_module
from animate124.core.training.stages import Stage, parse_stages, stage_at, stage_starts, starts_later_stage, total_steps

RECIPE = [
    {
        "name": "static",
        "steps": 10,
        "guidances": ["image", "zero123"],
        "loss_weights": {"sds_image": 1.0, "rgb": [0, 1000, 500, 5]},
        "learning_rates": {"field_static": 0.01},
        "trainable": ["field_static", "background"],
    },
    {
        "name": "dynamic",
        "steps": 5,
        "guidances": ["video"],
        "loss_weights": {"sds_video": 1},
        "trainable": ["field_4d"],
    },
    {"name": "refine", "steps": 3, "guidances": ["controlnet"]},
]


@pytest.fixture()
def recipe():
    return parse_stages(RECIPE)


def test_parse_fills_defaults_and_keeps_values(recipe):
    static, dynamic, refine = recipe
    assert static.guidances == ("image", "zero123") and static.loss_weights == {
        "sds_image": 1.0,
        "rgb": (0, 1000, 500, 5),
    }
    assert isinstance(static.loss_weights["rgb"][3], int)  # C() reads an int end step as a global step
    assert static.learning_rates == {"field_static": 0.01} and static.trains("background") and not static.trains("x")
    assert dynamic.loss_weights == {"sds_video": 1.0} and dynamic.learning_rates == {}
    assert refine.trainable is None and refine.trains("anything")
    assert parse_stages([{"name": "a", "steps": 1, "trainable": []}])[0].trains("x") is False


def test_omegaconf_input():
    from omegaconf import OmegaConf

    parsed = parse_stages(OmegaConf.create({"stages": RECIPE}).stages)
    assert parsed == parse_stages(RECIPE)


def test_starts_and_total(recipe):
    assert stage_starts(recipe) == [0, 10, 15]
    assert total_steps(recipe) == 18


@pytest.mark.parametrize(
    "step, index, in_stage, done",
    [
        (0, 0, 0, False),
        (9, 0, 9, False),  # last step of a stage belongs to it
        (10, 1, 0, False),  # first step of the next
        (14, 1, 4, False),
        (15, 2, 0, False),
        (17, 2, 2, False),
        (18, 2, 3, True),  # == total: validation / test / export after training use the last stage
        (25, 2, 10, True),
    ],
)
def test_stage_at_boundaries(recipe, step, index, in_stage, done):
    pos = stage_at(recipe, step)
    assert (pos.index, pos.step_in_stage, pos.done) == (index, in_stage, done)
    assert pos.stage is recipe[index]
    i, stage, k, d = pos  # a plain tuple as well
    assert stage.name == RECIPE[index]["name"]


def test_stage_at_covers_every_step_exactly_once(recipe):
    names = [stage_at(recipe, s).stage.name for s in range(total_steps(recipe))]
    assert names == ["static"] * 10 + ["dynamic"] * 5 + ["refine"] * 3


def test_starts_later_stage(recipe):
    # the optimizer state is reset exactly at the first step of stages 2 and 3 (never at 0, never past the end)
    assert [s for s in range(20) if starts_later_stage(recipe, s)] == [10, 15]


def test_removed_keys_are_named():
    with pytest.raises(ValueError, match=r"unknown keys \['overrides'\]"):
        parse_stages([{"name": "a", "steps": 1, "overrides": {}}])


@pytest.mark.parametrize(
    "entries, error, match",
    [
        ([], ValueError, "non-empty list"),
        ("static", ValueError, "non-empty list"),
        ([{"name": "a", "steps": 3, "lr": {}}], ValueError, r"unknown keys \['lr'\]"),
        ([{"steps": 3}], ValueError, r"stages\[0\].name=None"),
        ([{"name": "a", "steps": 0}], ValueError, r"stages\[0\] \('a'\).steps=0 must be a positive integer"),
        ([{"name": "a", "steps": -5}], ValueError, "steps=-5"),
        ([{"name": "a", "steps": 2.5}], ValueError, "steps=2.5"),
        ([{"name": "a", "steps": True}], ValueError, "steps=True"),
        (
            [{"name": "a", "steps": 1}, {"name": "a", "steps": 2}],
            ValueError,
            r"stages\[1\].name='a' duplicates stages\[0\]",
        ),
        ([{"name": "a", "steps": 1, "learning_rates": {"g": -1.0}}], ValueError, "learning_rates.g=-1.0"),
        ([{"name": "a", "steps": 1, "loss_weights": {"rgb": "high"}}], ValueError, "loss_weights.rgb='high'"),
        ([{"name": "a", "steps": 1, "loss_weights": {"rgb": [1, 2]}}], ValueError, r"loss_weights.rgb=\[1, 2\]"),
        ([{"name": "a", "steps": 1, "guidances": "video"}], TypeError, "guidances must be a list"),
        ([{"name": "a", "steps": 1, "trainable": ["x", "x"]}], ValueError, "distinct"),
        ([{"name": "a", "steps": 1, "learning_rates": [1]}], TypeError, "learning_rates must be a mapping"),
        ([["name", "a"]], TypeError, r"stages\[0\] must be a mapping"),
    ],
)
def test_invalid_entries_raise_one_line(entries, error, match):
    with pytest.raises(error, match=match) as info:
        parse_stages(entries)
    assert "\n" not in str(info.value)


def test_stage_at_rejects_bad_input(recipe):
    with pytest.raises(ValueError, match="global_step=-1"):
        stage_at(recipe, -1)
    with pytest.raises(ValueError, match="empty"):
        stage_at((), 0)


def test_stage_is_frozen():
    stage = Stage("a", 1)
    with pytest.raises(AttributeError):
        stage.steps = 2  # type: ignore[misc]


# ---- the keyed form: stages addressable from the command line --------------------------------------------------------

CONFIGS = __import__("pathlib").Path(__file__).resolve().parents[2] / "configs"


def _shipped_with(overrides: list[str]):
    """configs/animate124.yaml merged with launch.py-style overrides, as threestudio's load_config does (merge, then
    resolve), with the resolver the configs' trainer.max_steps uses."""
    from omegaconf import OmegaConf

    OmegaConf.register_new_resolver("a124_total_steps", stages_module.stage_total, replace=True)
    cfg = OmegaConf.merge(OmegaConf.load(CONFIGS / "animate124.yaml"), OmegaConf.from_cli(overrides))
    return cfg.system.stages, OmegaConf.select(cfg, "trainer.max_steps")


def test_keyed_form_equals_the_list_form():
    keyed = {entry["name"]: {k: v for k, v in entry.items() if k != "name"} for entry in RECIPE}
    assert parse_stages(keyed) == parse_stages(RECIPE)
    assert stages_module.stage_total(keyed) == stages_module.stage_total(RECIPE) == 18


def test_command_line_reaches_a_stage_by_name_and_max_steps_follows():
    """The brief's overrides, through OmegaConf's own merge (run on 2.3.0 pinned and the current release)."""
    stages, max_steps = _shipped_with([])
    assert [s.name for s in parse_stages(stages)] == ["static", "dynamic", "refine"] and max_steps == 25000
    stages, max_steps = _shipped_with(["system.stages.dynamic.steps=2000", "system.stages.refine.loss_weights.cn=3"])
    static, dynamic, refine = parse_stages(stages)  # the order of the YAML is kept
    assert (static.name, dynamic.name, refine.name) == ("static", "dynamic", "refine")
    assert dynamic.steps == 2000 and refine.loss_weights["cn"] == 3.0 and refine.loss_weights["video"] == 1.0
    assert max_steps == 10000 + 2000 + 5000
    stages, max_steps = _shipped_with(["system.stages.refine=null"])  # a stage dropped
    assert [s.name for s in parse_stages(stages)] == ["static", "dynamic"] and max_steps == 20000


@pytest.mark.parametrize("override, message", [
    ("system.stages.dynamc.steps=2000",
     "stages.dynamc has no guidances and no loss_weights, so it would train nothing (did you mean "
     "system.stages.dynamic? an override with a stage name the config does not have adds such a stage; its stages: "
     "['static', 'dynamic', 'refine'])"),
    ("system.stages.0.steps=1",
     "stages.0: stages are keyed by name, not by position: write system.stages.static.<key>=... (its stages: "
     "['static', 'dynamic', 'refine'])"),
    ("system.stages.static.name=first", "stages.static.name='first' differs from its key 'static': drop name (the key "
                                        "names the stage)"),
])
def test_overrides_that_miss_a_stage_are_refused_naming_the_spelling(override, message):
    stages, _ = _shipped_with([override])
    with pytest.raises(ValueError) as info:
        parse_stages(stages)
    assert str(info.value) == message


def test_every_shipped_config_is_keyed_and_sums_to_max_steps():
    from omegaconf import OmegaConf

    OmegaConf.register_new_resolver("a124_total_steps", stages_module.stage_total, replace=True)
    for path in sorted(CONFIGS.glob("*.yaml")):
        cfg = OmegaConf.load(path)
        assert OmegaConf.is_dict(cfg.system.stages), path.name
        assert cfg.trainer.max_steps == sum(s.steps for s in parse_stages(cfg.system.stages)), path.name
