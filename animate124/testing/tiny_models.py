"""Tiny random diffusion models saved in the folder layouts of the real checkpoints.

The tests and the smoke config need every model the method loads (ModelScope / ZeroScope text-to-video, Stable
Diffusion 1.5, ControlNet-Tile, Zero-1-to-3, CLIP for evaluation) without downloading weights. This module builds
the real classes at a few channels, seeds their random weights, writes them with ``save_pretrained`` and then in
the weight formats their repositories publish (:func:`publish_layout`, from ``core/guidance/published_models.py``:
fp32 safetensors plus an ``fp16`` variant for SD 1.5, ModelScope and Zero-1-to-3; ``.bin`` pickles only, no
variant, for ZeroScope and ControlNet-Tile), so the ordinary ``from_pretrained`` code paths (ours and threestudio's)
load them exactly as they load the real repos.

The tokenizer is real: CLIP's byte-pair vocabulary ships inside the ``open_clip_torch`` wheel
(``open_clip/bpe_simple_vocab_16e6.txt.gz``) and gives the same token ids as OpenAI CLIP, which SD 1.5, ModelScope
and ZeroScope all use. Only the weights are random. ``open_clip_torch`` is therefore a runtime dependency of this
module (the ``testing`` extra: ``pip install open_clip_torch``); only that file is read, the package is not imported.

Sizes: every VAE keeps four resolution levels, so its spatial factor is ``2 ** (4 - 1) = 8`` like the real one
(a 256² frame gives 32² latents). Text encoders and cross-attention are 32-d.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
from pathlib import Path

from animate124.core.guidance import published_models

ALL_KINDS: tuple[str, ...] = ("text-to-video", "zeroscope", "sd", "controlnet-tile", "zero123", "clip")
"""Every kind ``make_tiny_models`` can write, in the order it writes them."""

CLIP_VOCAB_SIZE = 49408
CLIP_MAX_LENGTH = 77
TINY_HIDDEN = 32
"""Text hidden size and U-Net cross-attention size of every tiny model."""

_SEED = 0
_KINDS_WITH_TOKENIZER = ("text-to-video", "zeroscope", "sd", "clip")


def make_clip_tokenizer(out_dir: str | Path) -> Path:
    """Write a Hugging Face ``CLIPTokenizer`` with OpenAI CLIP's real vocabulary to ``out_dir``.

    Built offline from ``open_clip/bpe_simple_vocab_16e6.txt.gz``: 48,894 merges (the file's lines after its header)
    and 49,408 vocabulary entries (256 byte characters, the same with ``</w>``, one per merge, then
    ``<|startoftext|>`` and ``<|endoftext|>``). ``model_max_length`` is 77 (padding to max length needs it). The
    folder holds ``special_tokens_map.json`` as the hub's tokenizer folders do.

    Returns:
        ``out_dir`` as a ``Path``; ``CLIPTokenizer.from_pretrained(out_dir)`` loads it.
    """
    from transformers import CLIPTokenizer

    merges = _read_bpe_merges()  # before mkdir: a missing open_clip_torch leaves no folder behind
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    byte_chars = list(_bytes_to_unicode().values())
    vocab_list = byte_chars + [c + "</w>" for c in byte_chars] + ["".join(m.split()) for m in merges]
    vocab_list += ["<|startoftext|>", "<|endoftext|>"]
    assert len(vocab_list) == CLIP_VOCAB_SIZE, len(vocab_list)
    vocab = {tok: i for i, tok in enumerate(vocab_list)}
    (out / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    tokenizer = CLIPTokenizer(
        str(out / "vocab.json"),
        str(out / "merges.txt"),
        model_max_length=CLIP_MAX_LENGTH,
        pad_token="<|endoftext|>",
    )
    tokenizer.save_pretrained(out)
    # the hub's tokenizer folders carry this file; transformers 5 no longer writes it
    special = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>",
               "unk_token": "<|endoftext|>"}
    (out / "special_tokens_map.json").write_text(json.dumps(special, indent=2))
    return out


def make_tiny_models(out_dir: str | Path, kinds: tuple[str, ...] | list[str] = ALL_KINDS) -> dict[str, Path]:
    """Write tiny random models of the requested kinds under ``out_dir/<kind>`` and return their folders.

    Kinds and the real repository each one imitates (folder layout and classes):

    - ``text-to-video``: ``ali-vilab/text-to-video-ms-1.7b`` (``TextToVideoSDPipeline``: ``unet``
      = ``UNet3DConditionModel``, ``vae`` = ``AutoencoderKL``, ``text_encoder`` = ``CLIPTextModel``, ``tokenizer``,
      ``scheduler`` = ``DDIMScheduler``).
    - ``zeroscope``: ``cerspense/zeroscope_v2_576w`` (same layout; the real model runs at 320×576).
    - ``sd``: ``stable-diffusion-v1-5/stable-diffusion-v1-5`` (``StableDiffusionPipeline``, no safety checker /
      feature extractor);
      loads with threestudio's ``stable-diffusion-guidance`` and ``stable-diffusion-prompt-processor``.
    - ``controlnet-tile``: ``lllyasviel/control_v11f1e_sd15_tile`` (a ``ControlNetModel`` matching the ``sd`` U-Net).
    - ``zero123``: ``bennyguo/zero123-xl-diffusers`` (``Zero123Pipeline`` of threestudio's ``extern/zero123.py``: U-Net
      with 8 input channels, ``vae``, ``image_encoder`` = ``CLIPVisionModelWithProjection``, ``feature_extractor``,
      ``clip_camera_projection``, ``scheduler``).
    - ``clip``: ``openai/clip-vit-large-patch14`` (``CLIPModel`` + ``CLIPProcessor`` files in one folder).

    Weights are random but seeded: the same call writes the same tensors. Each folder holds the weight files its
    repository publishes (:func:`publish_layout`).

    Raises:
        ValueError: an unknown kind.
        ImportError: ``open_clip_torch`` (the vocabulary file) is missing; raised before anything is written.
    """
    unknown = [k for k in kinds if k not in ALL_KINDS]
    if unknown:
        raise ValueError(f"make_tiny_models: unknown kinds {unknown}; allowed {list(ALL_KINDS)}")
    if any(k in _KINDS_WITH_TOKENIZER for k in kinds):
        _bpe_vocab_file()  # fail before anything is written when open_clip_torch is missing
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    builders = {
        "text-to-video": lambda p: _write_text_to_video(p, sample_size=32),
        "zeroscope": lambda p: _write_text_to_video(p, sample_size=(40, 72)),
        "sd": _write_sd,
        "controlnet-tile": _write_controlnet_tile,
        "zero123": _write_zero123,
        "clip": _write_clip,
    }
    paths = {}
    for kind in ALL_KINDS:
        if kind in kinds:
            paths[kind] = out / kind
            builders[kind](paths[kind])
            if kind in published_models.KINDS:
                publish_layout(paths[kind], published_models.KINDS[kind])
    return paths


def publish_layout(folder: Path, model: published_models.PublishedModel, link_variants: bool = False) -> None:
    """Rewrite the safetensors ``save_pretrained`` wrote under ``folder`` in the formats ``model``'s repository
    publishes: beside each file its ``fp16`` variant (``name.fp16.safetensors``; a link to it with
    ``link_variants``, when the file already holds fp16 weights), or, for a ``.bin``-only repository, one pickle per
    component in the dtype the repository stores (``diffusion_pytorch_model.bin`` / ``pytorch_model.bin``) and no
    safetensors."""
    import torch
    from safetensors.torch import load_file, save_file

    for part in model.parts:
        if part.library not in published_models.WEIGHT_NAMES:
            continue
        st_stem, bin_stem = published_models.WEIGHT_NAMES[part.library]
        source = folder / part.folder / f"{st_stem}.safetensors"
        tensors = load_file(str(source))
        if model.safetensors and model.fp16_variant:
            variant = source.with_name(f"{st_stem}.fp16.safetensors")
            variant.unlink(missing_ok=True)
            if link_variants:
                variant.symlink_to(source.name)
            else:  # transformers reads only safetensors files whose metadata names the "pt" format
                save_file(_cast(tensors, torch.float16), str(variant), metadata={"format": "pt"})
        elif not model.safetensors:
            dtype = torch.float16 if part.default_bytes == published_models.FP16 else torch.float32
            torch.save(_cast(tensors, dtype), str(source.with_name(f"{bin_stem}.bin")))
            source.unlink()


def _cast(tensors: dict, dtype) -> dict:
    return {k: (v.to(dtype) if v.is_floating_point() else v).contiguous() for k, v in tensors.items()}


# ----------------------------------------------------------------------------------------------------------------------
# helpers


def _bpe_vocab_file() -> Path:
    """open_clip's copy of OpenAI CLIP's merges file, found without importing open_clip (it pulls in timm)."""
    spec = importlib.util.find_spec("open_clip")
    path = Path(spec.origin).parent / "bpe_simple_vocab_16e6.txt.gz" if spec and spec.origin else None
    if path is None or not path.is_file():
        raise ImportError(
            "tiny models need CLIP's vocabulary file from open_clip_torch: pip install open_clip_torch "
            "(or pip install 'threestudio-animate124[testing]')"
        )
    return path


def _read_bpe_merges() -> list[str]:
    lines = gzip.open(_bpe_vocab_file()).read().decode("utf-8").split("\n")
    return lines[1 : 49152 - 256 - 2 + 1]


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable unicode table (the order defines CLIP's first 256 ids)."""
    try:  # transformers < 5 keeps it in the CLIP tokenizer module, 5.x in convert_slow_tokenizer
        from transformers.models.clip.tokenization_clip import bytes_to_unicode
    except ImportError:
        from transformers.convert_slow_tokenizer import bytes_to_unicode
    return bytes_to_unicode()


def _seeded():
    import torch

    torch.manual_seed(_SEED)


def _tiny_text_encoder():
    from transformers import CLIPTextConfig, CLIPTextModel

    _seeded()
    config = CLIPTextConfig(**_tiny_clip_text_kwargs(), projection_dim=TINY_HIDDEN)
    return CLIPTextModel(config).eval()


def _tiny_clip_text_kwargs() -> dict:
    """The tiny CLIP text transformer shared by every text encoder here (real vocabulary and special-token ids)."""
    return dict(vocab_size=CLIP_VOCAB_SIZE, hidden_size=TINY_HIDDEN, intermediate_size=37, num_hidden_layers=2,
                num_attention_heads=4, max_position_embeddings=CLIP_MAX_LENGTH, bos_token_id=49406,
                eos_token_id=49407, pad_token_id=49407)


def _tiny_clip_vision_kwargs() -> dict:
    """The tiny CLIP image transformer of Zero-1-to-3's image encoder and of the CLIP model (32 px, 8 px patches)."""
    return dict(hidden_size=TINY_HIDDEN, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                image_size=32, patch_size=8)


def _tiny_vae():
    """Four levels (factor 8 like SD's VAE), 8-16-32-32 channels, GroupNorm of 8 groups."""
    from diffusers import AutoencoderKL

    _seeded()
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 16, 32, 32),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=64,
        scaling_factor=0.18215,
    ).eval()


def _tiny_unet2d(in_channels: int = 4):
    from diffusers import UNet2DConditionModel

    _seeded()
    return UNet2DConditionModel(
        sample_size=64,
        in_channels=in_channels,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(32, 64),
        layers_per_block=1,
        cross_attention_dim=TINY_HIDDEN,
        attention_head_dim=8,
        norm_num_groups=32,
    ).eval()


def _sd_scheduler_kwargs() -> dict:
    return dict(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        set_alpha_to_one=False,
        steps_offset=1,
    )


def _write_text_to_video(path: Path, sample_size):
    from diffusers import DDIMScheduler, TextToVideoSDPipeline, UNet3DConditionModel
    from transformers import CLIPTokenizer

    _seeded()
    unet = UNet3DConditionModel(
        sample_size=sample_size,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock3D", "DownBlock3D"),
        up_block_types=("UpBlock3D", "CrossAttnUpBlock3D"),
        block_out_channels=(32, 32),  # the first must be a multiple of 32: older diffusers hard-code 32 groups there
        layers_per_block=1,
        norm_num_groups=8,
        cross_attention_dim=TINY_HIDDEN,
        attention_head_dim=4,
    ).eval()
    tokenizer = CLIPTokenizer.from_pretrained(make_clip_tokenizer(path / "tokenizer"))
    pipe = TextToVideoSDPipeline(
        vae=_tiny_vae(),
        text_encoder=_tiny_text_encoder(),
        tokenizer=tokenizer,
        unet=unet,
        scheduler=DDIMScheduler(**_sd_scheduler_kwargs(), clip_sample=False),
    )
    pipe.save_pretrained(path, safe_serialization=True)


def _write_sd(path: Path):
    from diffusers import PNDMScheduler, StableDiffusionPipeline
    from transformers import CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(make_clip_tokenizer(path / "tokenizer"))
    pipe = StableDiffusionPipeline(
        vae=_tiny_vae(),
        text_encoder=_tiny_text_encoder(),
        tokenizer=tokenizer,
        unet=_tiny_unet2d(),
        scheduler=PNDMScheduler(**_sd_scheduler_kwargs(), skip_prk_steps=True),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(path, safe_serialization=True)


def _write_controlnet_tile(path: Path):
    """A ControlNet built from the tiny SD U-Net; its zero convolutions get small random weights so the condition
    image changes the output (a freshly initialised ControlNet is a no-op)."""
    import torch
    from diffusers import ControlNetModel

    controlnet = ControlNetModel.from_unet(_tiny_unet2d(), conditioning_embedding_out_channels=(8, 16, 16, 16))
    _seeded()
    for conv in list(controlnet.controlnet_down_blocks) + [controlnet.controlnet_mid_block]:
        conv.reset_parameters()  # PyTorch's default init instead of zeros
    with torch.no_grad():  # He init keeps the condition's signal alive through the small embedding network
        for conv in controlnet.controlnet_cond_embedding.modules():
            if isinstance(conv, torch.nn.Conv2d):
                torch.nn.init.kaiming_normal_(conv.weight, nonlinearity="relu")
    controlnet.save_pretrained(path, safe_serialization=True)


def _write_zero123(path: Path):
    """Written component by component: the pipeline class lives in threestudio's ``extern/zero123.py``, which this
    module must not import. ``clip_camera_projection`` is a single ``Linear(D + 4 -> D)`` named ``proj``."""
    import torch
    from diffusers import DDIMScheduler
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    _tiny_unet2d(in_channels=8).save_pretrained(path / "unet", safe_serialization=True)
    _tiny_vae().save_pretrained(path / "vae", safe_serialization=True)
    DDIMScheduler(**_sd_scheduler_kwargs(), clip_sample=False).save_pretrained(path / "scheduler")
    _seeded()
    vision = CLIPVisionModelWithProjection(
        CLIPVisionConfig(**_tiny_clip_vision_kwargs(), projection_dim=TINY_HIDDEN)
    ).eval()
    vision.save_pretrained(path / "image_encoder", safe_serialization=True)
    _tiny_image_processor().save_pretrained(path / "feature_extractor")
    _seeded()
    write_zero123_extras(path, torch.nn.Linear(TINY_HIDDEN + 4, TINY_HIDDEN))


def _write_clip(path: Path):
    from transformers import CLIPConfig, CLIPModel, CLIPProcessor, CLIPTokenizer

    _seeded()
    config = CLIPConfig(
        text_config=_tiny_clip_text_kwargs(),
        vision_config=_tiny_clip_vision_kwargs(),
        projection_dim=TINY_HIDDEN,
    )
    CLIPModel(config).eval().save_pretrained(path, safe_serialization=True)
    tokenizer = CLIPTokenizer.from_pretrained(make_clip_tokenizer(path))
    image_processor = _tiny_image_processor()
    image_processor.save_pretrained(path)  # preprocessor_config.json, as in the real repo
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(path)


def _tiny_image_processor():
    """CLIP's preprocessing (resize shortest side, centre crop, CLIP mean/std) at 32 px instead of 224."""
    from transformers import CLIPImageProcessor

    return CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})


def write_zero123_extras(path: Path, proj) -> None:
    """The parts of a Zero123 folder beyond the diffusers models, as the host's ``zero123-unified-guidance`` loads
    it: the camera projection ``proj`` (a ``Linear(dim + 4, dim)``) and a ``model_index.json`` naming the host's
    ``zero123`` library for it."""
    from safetensors.torch import save_file

    proj_dir = path / "clip_camera_projection"
    proj_dir.mkdir(parents=True, exist_ok=True)
    save_file({"proj.weight": proj.weight.detach().contiguous(), "proj.bias": proj.bias.detach().contiguous()},
              str(proj_dir / "diffusion_pytorch_model.safetensors"))
    config = {"_class_name": "CLIPCameraProjection", "embedding_dim": proj.out_features, "additional_embeddings": 4}
    (proj_dir / "config.json").write_text(json.dumps(config, indent=2))
    model_index = {
        "_class_name": "Zero123Pipeline",
        "_diffusers_version": _diffusers_version(),
        "clip_camera_projection": ["zero123", "CLIPCameraProjection"],
        "feature_extractor": ["transformers", "CLIPImageProcessor"],
        "image_encoder": ["transformers", "CLIPVisionModelWithProjection"],
        "requires_safety_checker": False,
        "safety_checker": [None, None],
        "scheduler": ["diffusers", "DDIMScheduler"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }
    (path / "model_index.json").write_text(json.dumps(model_index, indent=2))


def _diffusers_version() -> str:
    import diffusers

    return diffusers.__version__
