"""Full-size random models: the real architectures' sizes, and the folder layout through the real loaders (written
here with the same code at a few channels: full size is 9 GB and needs a GPU to initialise quickly)."""
from __future__ import annotations

import os

import torch

from animate124.testing import full_size_models as fsm

SMALL_TEXT = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                  hidden_act="quick_gelu", projection_dim=32)
SMALL = {
    "sd_unet": dict(fsm.SD15_UNET, block_out_channels=(32, 64, 64, 64), cross_attention_dim=32, layers_per_block=1),
    "zero123_unet": dict(fsm.ZERO123_UNET, block_out_channels=(32, 64, 64, 64), cross_attention_dim=32,
                         layers_per_block=1),
    "vae": dict(fsm.SD_VAE, block_out_channels=(32, 32, 32, 32), layers_per_block=1),
    "unet3d": dict(fsm.MODELSCOPE_UNET3D, block_out_channels=(32, 64, 64, 64), cross_attention_dim=32,
                   attention_head_dim=8, layers_per_block=1),
    "sd_text_encoder": SMALL_TEXT,
    "video_text_encoder": dict(SMALL_TEXT, hidden_act="gelu", projection_dim=16),
    "zero123_image_encoder": dict(SMALL_TEXT, image_size=224, patch_size=14),
}


def test_full_size_parameter_counts_match_the_real_checkpoints():
    counts = fsm.count_parameters()
    # published sizes: SD 1.5 U-Net 859.52 M, its VAE 83.65 M, CLIP ViT-L/14 text tower 123.06 M
    assert counts["sd_unet"] == 859_520_964
    assert counts["vae"] == 83_653_863
    assert counts["sd_text_encoder"] == 123_060_480
    # Zero123: 4 more input channels into the first 3x3 conv of 320 channels
    assert counts["zero123_unet"] == counts["sd_unet"] + 4 * 320 * 3 * 3
    # CLIP ViT-L/14 vision tower 303,179,776 + its 1024 -> 768 projection (no bias)
    assert counts["zero123_image_encoder"] == 303_179_776 + 1024 * 768
    # ModelScope "1.7b": U-Net3D 1.41 B + OpenCLIP-H text tower (23 layers) 0.34 B
    assert counts["unet3d"] == 1_411_233_860 and counts["video_text_encoder"] == 340_387_840
    assert counts["controlnet"] == 361_279_120
    assert set(fsm.REPO_IDS.values()) == set(fsm.FULL_SIZE_KINDS)


def test_layout_loads_through_the_real_loaders(tmp_path):
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from safetensors import safe_open
    from transformers import CLIPVisionModelWithProjection

    from animate124.core.guidance.controlnet_sds import ControlNetTileSDS
    from animate124.core.guidance.video_sds import VideoSDS

    paths = fsm.make_full_size_models(tmp_path, device="cpu", configs=SMALL)
    assert list(paths) == list(fsm.FULL_SIZE_KINDS)
    assert all((p / fsm.COMPLETE).is_file() for p in paths.values())
    # safetensors (fp16, each with its fp16 variant name linked to it) where the hub has them; .bin pickles only
    # for ZeroScope (U-Net fp16, the rest fp32) and ControlNet-Tile (fp32), as published
    plain = sorted(w for w in tmp_path.rglob("*.safetensors") if ".fp16." not in w.name)
    assert [str(w.relative_to(tmp_path)).split("/")[0] for w in plain] == ["sd"] * 3 + ["text-to-video"] * 3 + \
        ["zero123"] * 4
    for w in plain:  # every weight fp16 (older transformers also save integer position ids), and an fp16 variant name
        with safe_open(str(w), "pt") as f:
            dtypes = {f.get_tensor(k).dtype for k in f.keys()}
        assert {d for d in dtypes if d.is_floating_point} == {torch.float16}, (w, dtypes)
        assert os.path.realpath(w.with_name(w.name.replace(".safetensors", ".fp16.safetensors"))) == \
            os.path.realpath(w)
    pickles = {str(p.relative_to(tmp_path)): p for p in tmp_path.rglob("*.bin")}
    assert sorted(pickles) == ["controlnet-tile/diffusion_pytorch_model.bin", "zeroscope/text_encoder/pytorch_model.bin",
                               "zeroscope/unet/diffusion_pytorch_model.bin", "zeroscope/vae/diffusion_pytorch_model.bin"]
    for name, dtype in [("controlnet-tile/diffusion_pytorch_model.bin", torch.float32),
                        ("zeroscope/unet/diffusion_pytorch_model.bin", torch.float16),
                        ("zeroscope/vae/diffusion_pytorch_model.bin", torch.float32)]:
        tensors = torch.load(pickles[name], weights_only=True)
        assert {t.dtype for t in tensors.values() if t.is_floating_point()} == {dtype}, name
    # the loaders the configs use
    pipe = StableDiffusionPipeline.from_pretrained(paths["sd"], torch_dtype=torch.float16, safety_checker=None,
                                                   requires_safety_checker=False)
    assert pipe.unet.config.cross_attention_dim == 32 and pipe.unet.dtype == torch.float16
    video = VideoSDS.from_pretrained(paths["zeroscope"], torch_dtype=torch.float32, load_text_encoder=True)
    assert video.model_size == (320, 576) and video.unet.config.cross_attention_dim == 32
    cn = ControlNetTileSDS.from_pretrained(paths["sd"], paths["controlnet-tile"], torch_dtype=torch.float32)
    assert tuple(cn.controlnet.config.conditioning_embedding_out_channels) == (16, 32, 96, 256)
    # Zero123 as the host loads it (variant="fp16"): 8-channel U-Net, image encoder, camera projection D + 4 -> D
    unet = UNet2DConditionModel.from_pretrained(paths["zero123"], subfolder="unet", variant="fp16")
    assert unet.config.in_channels == 8
    vision = CLIPVisionModelWithProjection.from_pretrained(paths["zero123"] / "image_encoder", variant="fp16")
    assert vision.config.projection_dim == 32
    with safe_open(str(paths["zero123"] / "clip_camera_projection" / "diffusion_pytorch_model.fp16.safetensors"),
                   "pt") as f:
        assert tuple(f.get_tensor("proj.weight").shape) == (32, 36)


def test_cli_full_size_flag_reaches_the_full_size_kinds(tmp_path, capsys):
    from animate124.tools.cli import main

    assert main(["make-tiny-models", str(tmp_path), "--full-size", "--kinds", "clip"]) == 1
    err = capsys.readouterr().err
    assert "unknown kinds ['clip']" in err and "'text-to-video'" in err and "make_full_size_models" in err
