"""The preflight's model check through real threestudio: with HF_HUB_OFFLINE=1 every model missing from the Hugging
Face cache is named at once, before step 0 and before any model loads, with the one command that fetches them; a
local folder that lacks a file its loaders read is named too. A cache of the tiny models (in the published layouts)
under the real ids passes."""
from __future__ import annotations

import shutil

import pytest
from test_reliability_integration import _build, _snapshot, _write_embeds
from test_system_integration import _config

from animate124.core.guidance import published_models as pm
from animate124.testing.hub_cache import fill_hub_cache

IDS = {"sd": pm.SD15.repo_id, "zero123": pm.ZERO123_XL.repo_id, "text-to-video": pm.MODELSCOPE.repo_id,
       "controlnet-tile": pm.CONTROLNET_TILE.repo_id}


@pytest.fixture()
def run_dir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the host's prompt cache is relative to the working directory
    return tmp_path


@pytest.fixture()
def hub(tmp_path, monkeypatch):
    import huggingface_hub.constants

    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return cache


def _hub_config(tiny, rgba, root) -> str:
    text = _config(tiny, rgba, root, with_cn=True)
    for kind, repo in IDS.items():
        text = text.replace(str(tiny[kind]), repo)
    return text


def test_offline_every_missing_model_is_named_at_once_with_the_fetch_command(threestudio, tiny_models, example_rgba,
                                                                              run_dir, hub):
    from animate124.components.preflight import PreflightError

    _write_embeds(run_dir / "embeds.safetensors")
    fill_hub_cache(hub, IDS["zero123"], tiny_models["zero123"])  # this one is there: not named
    before = _snapshot(run_dir)
    with pytest.raises(PreflightError) as info:
        _build(threestudio, _hub_config(tiny_models, example_rgba, run_dir))
    problems = info.value.problems
    assert [p.split(" ")[0] for p in problems] == [IDS["sd"], IDS["text-to-video"], IDS["controlnet-tile"], "fetch"]
    assert problems[0].startswith(
        f"{IDS['sd']} (Stable Diffusion 1.5; sd.guidance (static), sd.prompt_processor (static), cn.guidance (refine), "
        "cn.prompt_processor (refine)) is not fully in the Hugging Face cache and HF_HUB_OFFLINE is set: 12 of 12 "
        "files missing (")
    # the host's SD guidance (CPU, fp32) and ours read the default files: one pickle for ControlNet-Tile
    assert problems[2].endswith("2 of 2 files missing (1.4 GB): config.json, diffusion_pytorch_model.bin")
    assert problems[3].startswith("fetch every missing file where the network allows, with one command")
    assert problems[3].count(" download ") == 3 and IDS["zero123"] not in problems[3]
    assert _snapshot(run_dir) == before


def test_a_cache_of_the_tiny_models_under_the_real_ids_passes_offline(threestudio, tiny_models, example_rgba, run_dir,
                                                                       hub):
    _write_embeds(run_dir / "embeds.safetensors")
    for kind, repo in IDS.items():
        fill_hub_cache(hub, "damo-vilab/text-to-video-ms-1.7b" if kind == "text-to-video" else repo, tiny_models[kind])
    _build(threestudio, _hub_config(tiny_models, example_rgba, run_dir))  # ModelScope found under its old name


def test_a_local_folder_that_lacks_weights_is_named(threestudio, tiny_models, example_rgba, run_dir, monkeypatch):
    from animate124.components.preflight import PreflightError

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)  # folders are checked whether or not the hub is offline
    _write_embeds(run_dir / "embeds.safetensors")
    broken = run_dir / "t2v"
    shutil.copytree(tiny_models["text-to-video"], broken)
    for weights in (broken / "unet").glob("diffusion_pytorch_model*"):
        weights.unlink()
    text = _config(tiny_models, example_rgba, run_dir, with_cn=True).replace(str(tiny_models["text-to-video"]),
                                                                            str(broken))
    with pytest.raises(PreflightError) as info:
        _build(threestudio, text)
    assert info.value.problems == [
        f"the folder '{broken}' (video.guidance (dynamic, refine), video.prompt_processor (dynamic, refine)) lacks 1 of the 9 files "
        "its loaders read: unet/diffusion_pytorch_model.safetensors (or .bin); fix the path, or write the folder again "
        "(`animate124 make-tiny-models DIR` for test models)"]
