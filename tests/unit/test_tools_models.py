"""``animate124 models CONFIG``: every model a config's stages load, its files and sizes, what the Hugging Face cache
(or the local folder) holds, and the one command that fetches the rest. No network: caches are made here."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from animate124.core.guidance import published_models as pm
from animate124.testing.hub_cache import fill_hub_cache
from animate124.tools.cli import main

REPO = Path(__file__).resolve().parents[2]
CONFIG = REPO / "configs" / "animate124.yaml"
SD, ZERO123, MODELSCOPE, CONTROLNET = (pm.SD15.repo_id, pm.ZERO123_XL.repo_id, pm.MODELSCOPE.repo_id,
                                       pm.CONTROLNET_TILE.repo_id)


@pytest.fixture()
def hub(tmp_path, monkeypatch):
    """An empty Hugging Face cache for this test (the function looks it up at call time)."""
    import huggingface_hub.constants

    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    return cache


def _needs(config=CONFIG, overrides=()):
    from animate124.tools.models import config_needs

    return {n.name: n for n in config_needs(config, overrides)}


def test_the_default_config_needs_four_models_with_the_published_files_and_sizes(hub):
    needs = _needs()
    assert list(needs) == [SD, ZERO123, MODELSCOPE, CONTROLNET]
    assert needs[SD].users == ["sd.guidance (static)", "sd.prompt_processor (static)", "cn.guidance (refine)",
                               "cn.prompt_processor (refine)"]
    # every stage that uses a slot is named (the model loads at the first and stays through the rest)
    assert needs[ZERO123].users == ["zero123.guidance (static, dynamic, refine)"]
    assert needs[MODELSCOPE].users == ["video.guidance (dynamic, refine)", "video.prompt_processor (dynamic, refine)"]
    weights = {name: {f.path: f.size for f in n.files if f.size > 2_000_000} for name, n in needs.items()}
    # the host's SD guidance reads the fp32 files (no variant); our ControlNet guidance the fp16 U-Net and VAE
    assert weights[SD] == {"unet/diffusion_pytorch_model.safetensors": 859_520_964 * 4,
                           "unet/diffusion_pytorch_model.fp16.safetensors": 859_520_964 * 2,
                           "vae/diffusion_pytorch_model.safetensors": 83_653_863 * 4,
                           "vae/diffusion_pytorch_model.fp16.safetensors": 83_653_863 * 2,
                           "text_encoder/model.safetensors": 123_060_480 * 4}
    # the host's Zero123 asks for variant="fp16" for every component
    assert weights[ZERO123] == {"unet/diffusion_pytorch_model.fp16.safetensors": (859_520_964 + 11_520) * 2,
                                "vae/diffusion_pytorch_model.fp16.safetensors": 83_653_863 * 2,
                                "image_encoder/model.fp16.safetensors": 303_966_208 * 2}
    # our video guidance: fp16 U-Net and VAE; its prompt processor the published fp32 text encoder
    assert weights[MODELSCOPE] == {"unet/diffusion_pytorch_model.fp16.safetensors": 1_411_233_860 * 2,
                                   "vae/diffusion_pytorch_model.fp16.safetensors": 83_653_863 * 2,
                                   "text_encoder/model.safetensors": 340_387_840 * 4}
    assert weights[CONTROLNET] == {"diffusion_pytorch_model.bin": 361_279_120 * 4}  # the one fp32 pickle
    assert all(f.found is None for n in needs.values() for f in n.files)
    assert [len(n.files) for n in needs.values()] == [14, 11, 11, 2]


def test_report_with_nothing_cached_lists_every_file_and_one_fetch_command(hub, capsys):
    assert main(["models", str(CONFIG)]) == 1
    out = capsys.readouterr().out
    assert out.count("\n  MISSING ") == 38 and "\n  cached " not in out
    assert "missing: 14.4 GB in 38 files of 4 models" in out
    command = pm.fetch_command(list(_needs().values()))
    assert command.count(" download ") == 4 and command in out.replace(" && \\\n  ", " && ")
    assert f"download {CONTROLNET} config.json diffusion_pytorch_model.bin --revision main" in command
    assert f"download {MODELSCOPE} " in command  # the published name, even where a config names the old one


def _tiny_cache(cache: Path, tiny: dict, modelscope_as: str = MODELSCOPE) -> None:
    for kind, model in pm.KINDS.items():
        if kind != "zeroscope":
            fill_hub_cache(cache, modelscope_as if kind == "text-to-video" else model.repo_id, tiny[kind])


def test_a_cache_of_the_tiny_models_holds_every_file_the_table_lists(hub, tiny_models, capsys):
    """The tiny folders are written in the published layouts: a cache made of them lacks nothing the table names;
    one filled under ModelScope's old name is found and said so."""
    _tiny_cache(hub, tiny_models, modelscope_as="damo-vilab/text-to-video-ms-1.7b")
    assert main(["models", str(CONFIG)]) == 0
    out = capsys.readouterr().out
    assert "MISSING" not in out and out.count("\n  cached ") == 38
    assert "cached as damo-vilab/text-to-video-ms-1.7b (the repository's other name)" in out
    assert out.rstrip().endswith("every file is here: the run can start offline (HF_HUB_OFFLINE=1)")
    zeroscope = [f"system.guidances.video.{s}.pretrained_model_name_or_path={pm.ZEROSCOPE.repo_id}"
                 for s in ("guidance", "prompt_processor")]
    fill_hub_cache(hub, pm.ZEROSCOPE.repo_id, tiny_models["zeroscope"])
    need = _needs(overrides=zeroscope)[pm.ZEROSCOPE.repo_id]
    assert {f.path for f in need.files if f.size > 2_000_000} == {
        "unet/diffusion_pytorch_model.bin", "vae/diffusion_pytorch_model.bin", "text_encoder/pytorch_model.bin"}
    assert not need.missing


def test_partly_cached_repository_names_only_the_missing_files(hub, tiny_models):
    snapshot = fill_hub_cache(hub, SD, tiny_models["sd"])
    (snapshot / "unet" / "diffusion_pytorch_model.fp16.safetensors").unlink()
    need = _needs()[SD]
    assert [f.path for f in need.missing] == ["unet/diffusion_pytorch_model.fp16.safetensors"]
    assert pm.fetch_command([need]).endswith(f"download {SD} unet/diffusion_pytorch_model.fp16.safetensors "
                                             "--revision main")


def test_the_smoke_config_reads_local_folders_and_says_what_a_folder_lacks(tmp_path, tiny_models, monkeypatch):
    smoke = REPO / "configs" / "animate124-smoke.yaml"
    monkeypatch.setenv("A124_TINY_MODELS", str(tiny_models["sd"].parent))
    needs = _needs(smoke)
    assert list(needs) == [str(tiny_models[k]) for k in ("sd", "zero123", "text-to-video", "controlnet-tile")]
    assert all(n.local and not n.missing for n in needs.values())
    # the smoke config keeps every model fp32 (half_precision_weights: false): the default files
    assert "unet/diffusion_pytorch_model.safetensors" in {f.path for f in needs[str(tiny_models["sd"])].files}
    broken = tmp_path / "t2v"
    shutil_copy(tiny_models["text-to-video"], broken)
    (broken / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    (broken / "unet" / "diffusion_pytorch_model.fp16.safetensors").unlink()
    need = _needs(smoke, [f"system.guidances.video.guidance.pretrained_model_name_or_path={broken}"])[str(broken)]
    assert [f.path for f in need.missing] == ["unet/diffusion_pytorch_model.safetensors (or .bin)"]


def shutil_copy(src: Path, dst: Path) -> None:
    import shutil

    shutil.copytree(src, dst)


def test_fetch_downloads_exactly_the_missing_files(hub, tiny_models, monkeypatch, capsys):
    import huggingface_hub

    _tiny_cache(hub, tiny_models)
    (hub / f"models--{CONTROLNET.replace('/', '--')}").rename(hub / "gone")
    calls = []
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", lambda repo, path, revision: calls.append(
        (repo, path, revision)))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    assert main(["models", str(CONFIG), "--fetch"]) == 1  # the stand-in downloads nothing
    assert calls == [(CONTROLNET, "config.json", "main"), (CONTROLNET, "diffusion_pytorch_model.bin", "main")]
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main(["models", str(CONFIG), "--fetch"]) == 1
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "animate124 models: error: HF_HUB_OFFLINE is set: unset it to download (or run the command above where the "
        "network allows)")


def test_not_a_config_is_one_line(tmp_path, capsys):
    bad = tmp_path / "x.yaml"
    bad.write_text("name: x\n")
    assert main(["models", str(bad)]) == 1
    assert main(["models", str(tmp_path / "none.yaml")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[0].startswith(f"animate124 models: error: {bad}: ") and "system.guidances" in err[0]
    assert err[1] == f"animate124 models: error: '{tmp_path / 'none.yaml'}' is not a file: give a config, e.g. " \
                     "configs/animate124.yaml"


def test_the_command_runs_offline_by_default_and_quickly(tmp_path):
    """A fresh process, network variables untouched: it only reads the cache (an empty one here)."""
    env = {**os.environ, "HF_HOME": str(tmp_path), "PYTHONWARNINGS": "ignore"}
    env.pop("HF_HUB_CACHE", None)
    out = subprocess.run([sys.executable, "-m", "animate124.tools.cli", "models", str(CONFIG)], env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 1, out.stderr
    assert out.stdout.startswith(f"{CONFIG}: 4 models, 14.4 GB read by its stages (sizes as published); Hugging Face cache "
                                 f"{tmp_path / 'hub'} (looked up offline)")
