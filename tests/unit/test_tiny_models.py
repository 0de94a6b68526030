"""Tiny random models: real tokenizer ids, real folder layouts, loadable with the real ``from_pretrained``."""

import json

import pytest
import torch

from animate124.testing import tiny_models
from animate124.testing.tiny_models import ALL_KINDS, make_clip_tokenizer, make_tiny_models


@pytest.fixture(scope="module")
def tiny(tiny_models):
    """The test run's tiny models (tests/conftest.py calls make_tiny_models once)."""
    return tiny_models


def test_clip_tokenizer_matches_openai_ids(tmp_path):
    from transformers import CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(make_clip_tokenizer(tmp_path))
    assert len(tok) == 49408
    assert tok.model_max_length == 77
    # ids of OpenAI CLIP's tokenizer: "panda" is one token, "giant panda bear" three
    assert tok("a panda is dancing").input_ids == [49406, 320, 12952, 533, 6226, 49407]
    assert len(tok("giant panda bear").input_ids) == 5
    padded = tok("a", padding="max_length", max_length=tok.model_max_length).input_ids
    assert len(padded) == 77 and padded[:3] == [49406, 320, 49407]


# Pinned from the hand-written byte table and vocabulary builder this module had before it used transformers' table
# (unchanged): the same 256 characters in the same order, the same 49,408 tokens in id order, the same 48,894 merges.
BYTE_TABLE_SHA256 = "6f4b22994511341556e0afed07c5c1642aff87bc6fdf4ff2a611f5c1f33f7865"
VOCAB_SHA256 = "7cccc44d334555d1ff3c0ac5f0246b428fab2918383e77ee745cf30d41010b78"
MERGES_SHA256 = "f61f2adf497e6f5357c347aeb4646fabe82f341e946de5bdec5d2858e41bef4a"


def _sha256(lines) -> str:
    import hashlib

    return hashlib.sha256("\n".join(lines).encode()).hexdigest()


def test_byte_table_and_vocabulary_are_pinned(tmp_path):
    from transformers import CLIPTokenizer

    table = tiny_models._bytes_to_unicode()
    assert len(table) == 256 and table[ord("!")] == "!" and table[0] == "\u0100" and table[32] == "\u0120"  # Ā, Ġ
    assert _sha256([table[b] for b in range(256)]) == BYTE_TABLE_SHA256
    merges = tiny_models._read_bpe_merges()
    assert len(merges) == 48894 and _sha256(merges) == MERGES_SHA256
    vocab = CLIPTokenizer.from_pretrained(make_clip_tokenizer(tmp_path)).get_vocab()
    assert len(vocab) == 49408 and _sha256(sorted(vocab, key=vocab.get)) == VOCAB_SHA256


def test_all_kinds_written_with_real_layouts(tiny):
    assert tuple(tiny) == ALL_KINDS
    for kind in ("text-to-video", "zeroscope"):
        index = json.loads((tiny[kind] / "model_index.json").read_text())
        assert index["_class_name"] == "TextToVideoSDPipeline"
        assert index["unet"] == ["diffusers", "UNet3DConditionModel"]
        for sub in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
            assert (tiny[kind] / sub).is_dir(), (kind, sub)
    index = json.loads((tiny["sd"] / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline"
    assert json.loads((tiny["controlnet-tile"] / "config.json").read_text())["_class_name"] == "ControlNetModel"
    index = json.loads((tiny["zero123"] / "model_index.json").read_text())
    assert index["_class_name"] == "Zero123Pipeline"
    assert index["clip_camera_projection"] == ["zero123", "CLIPCameraProjection"]
    assert (tiny["clip"] / "preprocessor_config.json").is_file()


def test_models_load_and_keep_the_real_vae_factor(tiny):
    from diffusers import AutoencoderKL, ControlNetModel, UNet2DConditionModel, UNet3DConditionModel

    vae = AutoencoderKL.from_pretrained(tiny["text-to-video"], subfolder="vae")
    assert 2 ** (len(vae.config.block_out_channels) - 1) == 8
    with torch.no_grad():
        assert vae.encode(torch.zeros(1, 3, 64, 64)).latent_dist.mean.shape == (1, 4, 8, 8)
    unet3d = UNet3DConditionModel.from_pretrained(tiny["zeroscope"], subfolder="unet")
    assert unet3d.config.cross_attention_dim == tiny_models.TINY_HIDDEN
    z123 = UNet2DConditionModel.from_pretrained(tiny["zero123"], subfolder="unet")
    assert z123.config.in_channels == 8
    unet = UNet2DConditionModel.from_pretrained(tiny["sd"], subfolder="unet")
    cn = ControlNetModel.from_pretrained(tiny["controlnet-tile"])
    assert list(cn.config.block_out_channels) == list(unet.config.block_out_channels)


def test_controlnet_condition_changes_residuals(tiny):
    """A fresh ControlNet has zero output convolutions (a no-op); the tiny one must react to its condition."""
    from diffusers import ControlNetModel

    cn = ControlNetModel.from_pretrained(tiny["controlnet-tile"])
    gen = torch.Generator().manual_seed(0)
    x, e = torch.randn(1, 4, 8, 8, generator=gen), torch.randn(1, 77, 32, generator=gen)
    with torch.no_grad():
        _, mid_a = cn(x, 10, e, controlnet_cond=torch.zeros(1, 3, 64, 64), return_dict=False)
        _, mid_b = cn(x, 10, e, controlnet_cond=torch.ones(1, 3, 64, 64), return_dict=False)
    assert (mid_a - mid_b).abs().max() > 1e-2


def test_same_call_writes_same_weights(tmp_path):
    a = make_tiny_models(tmp_path / "a", kinds=("controlnet-tile",))["controlnet-tile"]
    b = make_tiny_models(tmp_path / "b", kinds=("controlnet-tile",))["controlnet-tile"]
    wa = torch.load(a / "diffusion_pytorch_model.bin", weights_only=True)  # published as one fp32 pickle
    wb = torch.load(b / "diffusion_pytorch_model.bin", weights_only=True)
    assert wa.keys() == wb.keys()
    for key in wa:
        torch.testing.assert_close(wa[key], wb[key], rtol=0, atol=0)


def test_unknown_kind_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="unknown kinds"):
        make_tiny_models(tmp_path, kinds=("sdxl",))
