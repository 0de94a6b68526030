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


def test_all_exports_import():
    for name in stages_module.__all__:
        assert hasattr(stages_module, name), name


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
