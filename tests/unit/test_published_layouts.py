"""The tiny models in the formats their repositories publish, loaded through the real loading code
(``core/guidance/pretrained.py`` ``load_pretrained_component``, ``core/guidance/text_encoding.py``).

Layouts (``core/guidance/published_models.py``): SD 1.5, ModelScope and Zero-1-to-3 XL as fp32 safetensors with an
fp16 variant; ZeroScope and ControlNet-Tile as ``.bin`` pickles only (ZeroScope's U-Net fp16, the rest fp32).
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from animate124.core.guidance import published_models as pm
from animate124.core.guidance import text_encoding
from animate124.core.guidance.pretrained import load_pretrained_component

WEIGHT_ROLES = ("unet", "vae", "controlnet", "image_encoder", "text_encoder")


def _class(kind: str, role: str):
    from diffusers import AutoencoderKL, ControlNetModel, UNet2DConditionModel, UNet3DConditionModel
    from transformers import CLIPVisionModelWithProjection

    if role == "unet":
        return UNet3DConditionModel if kind in ("text-to-video", "zeroscope") else UNet2DConditionModel
    return {"vae": AutoencoderKL, "controlnet": ControlNetModel, "image_encoder": CLIPVisionModelWithProjection}[role]


def _file_tensors(path: Path) -> dict:
    return load_file(str(path)) if path.suffix == ".safetensors" else torch.load(path, weights_only=True)


def _expected_files(model: pm.PublishedModel) -> set[str]:
    """What the repository publishes for its weights, derived from the table's two flags."""
    out = set()
    for part in model.parts:
        if part.library not in pm.WEIGHT_NAMES:
            continue
        st, pk = pm.WEIGHT_NAMES[part.library]
        prefix = f"{part.folder}/" if part.folder else ""
        if model.safetensors:
            out |= {f"{prefix}{st}.safetensors", f"{prefix}{st}.fp16.safetensors"}
        else:
            out.add(f"{prefix}{pk}.bin")
    return out


@pytest.mark.parametrize("kind", sorted(pm.KINDS))
def test_tiny_folders_hold_exactly_the_published_weight_files(tiny_models, kind):
    model, folder = pm.KINDS[kind], tiny_models[kind]
    found = {str(p.relative_to(folder)) for p in folder.rglob("*") if p.suffix in (".safetensors", ".bin")}
    assert found == _expected_files(model)
    for rel in found:
        dtypes = {t.dtype for t in _file_tensors(folder / rel).values() if t.is_floating_point()}
        part = next(p for p in model.parts if rel.startswith(p.folder))
        fp16 = ".fp16." in rel or part.default_bytes == pm.FP16
        assert dtypes == {torch.float16 if fp16 else torch.float32}, rel
    # the layouts the issue names: ZeroScope and ControlNet-Tile pickles only, the ControlNet one fp32 file
    assert (kind in ("zeroscope", "controlnet-tile")) == (not model.safetensors and not model.fp16_variant)


CASES = [(kind, role, dtype) for kind, model in sorted(pm.KINDS.items()) for role in WEIGHT_ROLES
         if role != "text_encoder" and any(p.role == role for p in model.parts)
         for dtype in (torch.float32, torch.float16)]


@pytest.mark.parametrize("kind,role,dtype", CASES, ids=[f"{k}-{r}-{str(d)[6:]}" for k, r, d in CASES])
def test_every_layout_loads_through_load_pretrained_component(tiny_models, kind, role, dtype):
    """fp32 reads the default file; fp16 reads the fp16 variant where the repository has one, else the default file
    cast to fp16 (ZeroScope's fp16 U-Net pickle is read as it is, or cast up for fp32)."""
    model, folder = pm.KINDS[kind], tiny_models[kind]
    part = model.part(role)
    net = load_pretrained_component(_class(kind, role), str(folder), part.folder or None, torch_dtype=dtype,
                                    prefer_fp16_variant=dtype == torch.float16)
    st, pk = pm.WEIGHT_NAMES[part.library]
    variant = dtype == torch.float16 and model.fp16_variant
    name = f"{st}.fp16.safetensors" if variant else f"{st}.safetensors" if model.safetensors else f"{pk}.bin"
    source = _file_tensors(folder / part.folder / name)
    state = net.state_dict()
    assert {t.dtype for t in state.values() if t.is_floating_point()} == {dtype}
    for key, tensor in source.items():
        expected = tensor.to(dtype) if tensor.is_floating_point() else tensor  # transformers 4.x pickles position ids
        torch.testing.assert_close(state[key], expected, rtol=0, atol=0, msg=key)


@pytest.mark.parametrize("kind", ["sd", "text-to-video", "zeroscope"])
def test_text_encoders_load_through_the_text_encoding_loader(tiny_models, kind):
    model, folder = pm.KINDS[kind], tiny_models[kind]
    tokenizer, encoder = text_encoding.load_text_encoder(folder)
    source = _file_tensors(folder / "text_encoder" / ("model.safetensors" if model.safetensors else "pytorch_model.bin"))
    state = encoder.state_dict()
    for key, tensor in source.items():
        torch.testing.assert_close(state[key], tensor, rtol=0, atol=0, msg=key)
    assert tokenizer("a panda is dancing").input_ids == [49406, 320, 12952, 533, 6226, 49407]


def test_fp16_variant_alone_is_enough_and_a_pickle_only_repo_is_cast(tiny_models, tmp_path):
    from diffusers import ControlNetModel, UNet2DConditionModel

    unet = tmp_path / "sd" / "unet"
    shutil.copytree(tiny_models["sd"] / "unet", unet)
    (unet / "diffusion_pytorch_model.safetensors").unlink()  # only the fp16 variant is left
    net = load_pretrained_component(UNet2DConditionModel, str(tmp_path / "sd"), "unet", torch_dtype=torch.float16,
                                    prefer_fp16_variant=True)
    variant = load_file(str(unet / "diffusion_pytorch_model.fp16.safetensors"))
    torch.testing.assert_close(net.state_dict()["conv_in.weight"], variant["conv_in.weight"], rtol=0, atol=0)
    cn = load_pretrained_component(ControlNetModel, str(tiny_models["controlnet-tile"]), None,
                                   torch_dtype=torch.float16, prefer_fp16_variant=True)
    pickled = torch.load(tiny_models["controlnet-tile"] / "diffusion_pytorch_model.bin", weights_only=True)
    assert pickled["conv_in.weight"].dtype == torch.float32 and cn.dtype == torch.float16
    torch.testing.assert_close(cn.state_dict()["conv_in.weight"], pickled["conv_in.weight"].half(), rtol=0, atol=0)


class _RunsCode:
    """Unpickling it writes a marker file: proof that loading ran the file's code."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').close()",))


@pytest.mark.parametrize("target", ["unet", "text_encoder"])
def test_pickles_that_run_code_are_refused_even_when_torch_is_told_to_allow_them(tiny_models, tmp_path, monkeypatch,
                                                                                 target):
    """torch's TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD turns weights_only off for callers that do not pass it (diffusers
    0.19, transformers 4.28); the loaders pass it themselves."""
    from diffusers import UNet3DConditionModel

    folder = tmp_path / "zeroscope"
    shutil.copytree(tiny_models["zeroscope"], folder)
    marker = tmp_path / "ran"
    name = "diffusion_pytorch_model.bin" if target == "unet" else "pytorch_model.bin"
    evil = folder / target / name
    tensors = torch.load(evil, weights_only=True)
    torch.save({**tensors, "payload": _RunsCode(marker)}, evil)
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    with pytest.raises(OSError, match=r"is a pickle that calls (builtins\.)?exec when loaded, so it was refused") as info:
        if target == "unet":
            load_pretrained_component(UNet3DConditionModel, str(folder), "unet")
        else:
            text_encoding.load_text_encoder(folder)
    assert str(evil) in str(info.value) and len(str(info.value).splitlines()) == 1
    assert not marker.exists()
    torch.load(evil, weights_only=False)  # the payload works: without the loaders' guard it would have run
    assert marker.exists()


RENAME_SCRIPT = """
import sys, torch
from animate124.core.guidance import published_models as pm
from animate124.core.guidance.video_sds import VideoSDS
asked = sys.argv[1]
print(pm.resolve_repo_id(asked))
video = VideoSDS.from_pretrained(asked, torch_dtype=torch.float32, load_text_encoder=True)
print(tuple(video.encode_prompt("a panda is dancing").shape))
"""


@pytest.mark.parametrize("cached,asked", [("damo-vilab/text-to-video-ms-1.7b", "ali-vilab/text-to-video-ms-1.7b"),
                                          ("ali-vilab/text-to-video-ms-1.7b", "damo-vilab/text-to-video-ms-1.7b")])
def test_a_renamed_repository_loads_offline_from_a_cache_under_either_name(tiny_models, tmp_path, cached, asked):
    from animate124.testing.hub_cache import fill_hub_cache

    fill_hub_cache(tmp_path / "hub", cached, tiny_models["text-to-video"])
    # HF_HOME, not HF_HUB_CACHE: diffusers 0.19 reads only the older variable names
    env = {**os.environ, "HF_HOME": str(tmp_path), "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}
    env.pop("HF_HUB_CACHE", None)
    out = subprocess.run([sys.executable, "-c", RENAME_SCRIPT, asked], env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == [cached, "(1,", "77,", "32)"]


def test_the_table_names_the_published_ids_and_the_old_ones():
    assert pm.MODELSCOPE.repo_id == "ali-vilab/text-to-video-ms-1.7b"
    assert pm.published("damo-vilab/text-to-video-ms-1.7b") is pm.MODELSCOPE
    assert pm.published("runwayml/stable-diffusion-v1-5") is pm.SD15
    assert pm.published("someone/else") is None
    assert pm.resolve_repo_id("/some/folder") == "/some/folder"
    # sizes: parameters x bytes (ControlNet-Tile: 361,279,120 fp32 parameters = the hub's 1.45 GB pickle)
    (control,) = [f for f in pm.files_needed(pm.CONTROLNET_TILE, ("controlnet",), ("controlnet",)) if f.size > 1e6]
    assert (control.path, control.size) == ("diffusion_pytorch_model.bin", 361_279_120 * 4)
    unet = [f for f in pm.files_needed(pm.ZEROSCOPE, ("unet",), ("unet",)) if f.size > 1e6]
    assert [(f.path, f.size) for f in unet] == [("unet/diffusion_pytorch_model.bin", 1_411_233_860 * 2)]
