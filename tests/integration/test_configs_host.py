"""Every a124-* Config builds through the host's own parsing, on the omegaconf this environment has
(threestudio pins omegaconf==2.3.0, which rejects typing.Literal in structured configs; CI runs this on 2.3 and 2.4)."""
from __future__ import annotations

from pathlib import Path

import omegaconf
import pytest

REPO = Path(__file__).resolve().parents[2]
CONFIGS = sorted((REPO / "configs").glob("animate124*.yaml"))
# where each component's section sits in an experiment config
SECTIONS = {"geometry": "geometry_type", "renderer": "renderer_type", "exporter": "exporter_type"}


def _component_classes(threestudio):
    """Every a124-* kind the host has registered: the components and the test-only oracle guidances."""
    return {name: threestudio.find(name) for name in threestudio.__modules__ if name.startswith("a124-")}


def test_every_registered_config_parses_with_defaults(threestudio):
    from threestudio.utils.config import parse_structured

    from animate124.components import REGISTERED_NAMES

    parsed = {}
    for name, cls in _component_classes(threestudio).items():
        if name == "a124-image-video-datamodule":
            from animate124.components.data import ImageVideoDataModuleConfig as config_cls
        else:
            config_cls = cls.Config
        cfg = parse_structured(config_cls, {})
        parsed[name] = type(cfg).__name__
    assert set(REGISTERED_NAMES) <= set(parsed) and len(parsed) == len(REGISTERED_NAMES) + 2, parsed  # + 2 oracles
    print(f"omegaconf {omegaconf.__version__}: {len(parsed)} a124 configs parsed")


@pytest.mark.parametrize("config", CONFIGS, ids=[c.name for c in CONFIGS])
def test_shipped_config_sections_parse(threestudio, config, tmp_path, monkeypatch):
    """Each shipped YAML, loaded by the host's load_config, gives sections that our Configs accept."""
    monkeypatch.chdir(tmp_path)  # config paths are relative to the threestudio root (the smoke config makes models)
    from threestudio.utils.config import load_config, parse_structured

    cfg = load_config(str(config), cli_args=[f"exp_root_dir={tmp_path}", "data.image_path=x.png", "system.weights=w.ckpt",
                                            "system.learned_embeds_path=e.safetensors"], n_gpus=1)
    system_cls = threestudio.find(cfg.system_type)
    system_cfg = parse_structured(system_cls.Config, cfg.system)
    assert system_cfg.stages, f"{config.name}: no stages"
    for section, type_key in SECTIONS.items():
        type_name = cfg.system.get(type_key) or ""
        if type_name.startswith("a124-"):
            parse_structured(threestudio.find(type_name).Config, getattr(cfg.system, section))
    for slot, entry in cfg.system.guidances.items():
        if str(entry.guidance_type).startswith("a124-"):
            parse_structured(threestudio.find(entry.guidance_type).Config, entry.get("guidance") or {})


@pytest.mark.parametrize("name, key, value, allowed", [
    ("a124-4d-volume", "density_activation", "relu", "softplus, exp, trunc_exp"),
    ("a124-time-volume-renderer", "estimator", "proposal", "occgrid, none"),
    ("a124-time-volume-renderer", "implementation", "cuda", "auto, torch, nerfacc"),
    ("a124-mesh-sequence-exporter", "fmt", "stl", "obj, ply"),
    ("a124-mesh-sequence-exporter", "interpolation", "CUBIC", "LINEAR, STEP"),
    ("a124-system", "controlnet_condition", "live", "frozen, current"),
    ("a124-video-sds-guidance", "weighting_strategy", "dreamfusion", "sds, sqrt"),
])
def test_bad_choice_is_one_line_naming_key_value_and_allowed(threestudio, name, key, value, allowed):
    from threestudio.utils.config import parse_structured

    with pytest.raises(ValueError) as err:
        parse_structured(threestudio.find(name).Config, {key: value})
    message = str(err.value)
    assert "\n" not in message
    assert name in message or "Guidance" in message
    assert f"{key}={value!r}" in message and allowed in message


def test_bad_datamodule_choice_names_the_key(threestudio):
    with pytest.raises(ValueError, match=r"video\.delta_mode='sideways'.*per_frame, total"):
        threestudio.find("a124-image-video-datamodule")({"image_path": "x.png", "video": {"delta_mode": "sideways"}})
