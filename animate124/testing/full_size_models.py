"""Full-size random diffusion models in the folder layouts of the real checkpoints, for timing and memory.

``animate124 make-tiny-models DIR --full-size`` writes, under ``DIR/<kind>``, the real architectures (the real
configs are written out below) with randomly initialised weights, in the weight formats their repositories publish
(``core/guidance/published_models.py``), so the ordinary ``from_pretrained`` code paths (ours and threestudio's)
load them exactly as they load the downloaded repositories: ZeroScope and ControlNet-Tile as ``.bin`` pickles only
(in the dtypes the hub stores), the others as safetensors with ``fp16`` variants. To keep the folder near 13 GB the
safetensors hold fp16 weights and each ``fp16`` variant name is a link to its default file (the hub's default files
are fp32: loading them costs a cast, not another code path).

Random weights make step time and memory honest (they depend on shapes, dtypes and the code path, not on the
values) and quality meaningless: never read an image, a loss or a metric from these models.

Building 4.3 B parameters with PyTorch's default initialisation takes minutes on a CPU; the models are therefore
built directly on the GPU when CUDA is available (seconds), one at a time, and moved to the CPU only to be saved.
"""

from __future__ import annotations

import json
from pathlib import Path

from animate124.core.guidance import published_models
from animate124.testing.tiny_models import publish_layout

FULL_SIZE_KINDS: tuple[str, ...] = ("sd", "controlnet-tile", "zero123", "text-to-video", "zeroscope")
"""Every kind ``make_full_size_models`` can write, in the order it writes them."""

REPO_IDS: dict[str, str] = {i: m.kind for m in published_models.MODELS for i in m.ids}
"""Hub id (and earlier names) -> the kind (folder under DIR) that imitates it; ``animate124 benchmark`` points
configs at them."""

COMPLETE = ".complete"
"""Marker file written into a kind's folder once it is fully written (an interrupted write is redone)."""

# --------------------------------------------------------------------------------------------------------------------
# The real configs (config.json of each repository's component; only arguments our diffusers/transformers read)

SD15_UNET = dict(
    sample_size=64,
    in_channels=4,
    out_channels=4,
    layers_per_block=2,
    norm_num_groups=32,
    norm_eps=1e-5,
    block_out_channels=(320, 640, 1280, 1280),
    cross_attention_dim=768,
    attention_head_dim=8,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
)
"""stable-diffusion-v1-5 ``unet/config.json`` (859.5 M parameters)."""

ZERO123_UNET = dict(SD15_UNET, sample_size=32, in_channels=8)
"""zero123-xl-diffusers ``unet/config.json``: the SD 1.x U-Net with the condition latents concatenated (8 channels)."""

SD_VAE = dict(
    in_channels=3,
    out_channels=3,
    latent_channels=4,
    layers_per_block=2,
    norm_num_groups=32,
    sample_size=512,
    block_out_channels=(128, 256, 512, 512),
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    scaling_factor=0.18215,
)
"""SD 1.5 ``vae/config.json`` (83.7 M); ModelScope, ZeroScope and Zero123 ship the same VAE."""

MODELSCOPE_UNET3D = dict(
    sample_size=32,
    in_channels=4,
    out_channels=4,
    layers_per_block=2,
    norm_num_groups=32,
    norm_eps=1e-5,
    block_out_channels=(320, 640, 1280, 1280),
    cross_attention_dim=1024,
    attention_head_dim=64,
    down_block_types=("CrossAttnDownBlock3D", "CrossAttnDownBlock3D", "CrossAttnDownBlock3D", "DownBlock3D"),
    up_block_types=("UpBlock3D", "CrossAttnUpBlock3D", "CrossAttnUpBlock3D", "CrossAttnUpBlock3D"),
)
"""text-to-video-ms-1.7b ``unet/config.json`` (also zeroscope_v2_576w's)."""

SD15_TEXT_ENCODER = dict(
    hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12, hidden_act="quick_gelu",
    projection_dim=768,
)
"""SD 1.5 ``text_encoder/config.json``: OpenAI CLIP ViT-L/14's text tower (123.1 M)."""

MODELSCOPE_TEXT_ENCODER = dict(
    hidden_size=1024, intermediate_size=4096, num_hidden_layers=23, num_attention_heads=16, hidden_act="gelu",
    projection_dim=512,
)
"""text-to-video-ms-1.7b ``text_encoder/config.json``: OpenCLIP ViT-H/14's text tower without its last layer."""

ZERO123_IMAGE_ENCODER = dict(
    hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16, image_size=224,
    patch_size=14, hidden_act="quick_gelu", projection_dim=768,
)
"""zero123-xl-diffusers ``image_encoder/config.json``: CLIP ViT-L/14's vision tower with its projection."""

CONTROLNET_CONDITIONING = (16, 32, 96, 256)
"""control_v11f1e_sd15_tile ``config.json``: the SD 1.5 U-Net's encoder half plus this conditioning embedding."""

FULL_SIZE_CONFIGS: dict[str, dict] = {
    "sd_unet": SD15_UNET,
    "zero123_unet": ZERO123_UNET,
    "vae": SD_VAE,
    "unet3d": MODELSCOPE_UNET3D,
    "sd_text_encoder": SD15_TEXT_ENCODER,
    "video_text_encoder": MODELSCOPE_TEXT_ENCODER,
    "zero123_image_encoder": ZERO123_IMAGE_ENCODER,
    "controlnet_conditioning": CONTROLNET_CONDITIONING,
}
"""Every architecture ``make_full_size_models`` builds; tests pass a shrunken copy through ``configs``."""

_SEED = 0


def make_full_size_models(
    out_dir: str | Path,
    kinds: tuple[str, ...] | list[str] = FULL_SIZE_KINDS,
    *,
    device: str | None = None,
    configs: dict[str, dict] | None = None,
) -> dict[str, Path]:
    """Write full-size random models of ``kinds`` under ``out_dir/<kind>`` and return their folders.

    Kinds and the repository each imitates (layout, classes, configs):

    - ``sd``: ``stable-diffusion-v1-5/stable-diffusion-v1-5`` (``StableDiffusionPipeline`` without safety checker);
    - ``controlnet-tile``: ``lllyasviel/control_v11f1e_sd15_tile`` (``ControlNetModel`` of the SD 1.5 U-Net);
    - ``zero123``: ``bennyguo/zero123-xl-diffusers`` as threestudio's ``zero123-unified-guidance`` loads it (the
      ``Zero123Pipeline`` of its ``extern/zero123.py``: 8-channel U-Net, VAE, CLIP ViT-L/14 image encoder, camera
      projection ``Linear(768 + 4 -> 768)``, feature extractor, DDIM scheduler);
    - ``text-to-video``: ``ali-vilab/text-to-video-ms-1.7b`` (``UNet3DConditionModel``, VAE, OpenCLIP-H text
      encoder, tokenizer, DDIM scheduler);
    - ``zeroscope``: ``cerspense/zeroscope_v2_576w``: the same architecture, as ``.bin`` pickles.

    Args:
        device: where to initialise (``"cuda"`` when available, else ``"cpu"``).
        configs: architectures to use instead of ``FULL_SIZE_CONFIGS`` (tests shrink them; same code path).

    Raises:
        ValueError: an unknown kind.
    """
    import torch

    unknown = [k for k in kinds if k not in FULL_SIZE_KINDS]
    if unknown:
        raise ValueError(f"make_full_size_models: unknown kinds {unknown}; allowed {list(FULL_SIZE_KINDS)}")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    cfg = dict(FULL_SIZE_CONFIGS, **(configs or {}))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    writers = {
        "sd": lambda p: _write_sd(p, cfg, device),
        "controlnet-tile": lambda p: _write_controlnet(p, cfg, device),
        "zero123": lambda p: _write_zero123(p, cfg, device),
        "text-to-video": lambda p: _write_text_to_video(p, cfg, device),
        "zeroscope": lambda p: _write_text_to_video(p, cfg, device),
    }
    from diffusers.utils import logging as diffusers_logging

    verbosity = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()  # casting random models with .to(fp16) warns once per model
    paths = {}
    try:
        for kind in FULL_SIZE_KINDS:
            if kind in kinds:
                paths[kind] = out / kind
                (paths[kind] / COMPLETE).unlink(missing_ok=True)
                writers[kind](paths[kind])
                publish_layout(paths[kind], published_models.KINDS[kind], link_variants=True)
                (paths[kind] / COMPLETE).touch()
    finally:
        diffusers_logging.set_verbosity(verbosity)
    return paths


def count_parameters(configs: dict[str, dict] | None = None) -> dict[str, int]:
    """Parameter count of every full-size network, built on the ``meta`` device (no memory, no initialisation)."""
    import torch

    cfg = dict(FULL_SIZE_CONFIGS, **(configs or {}))
    with torch.device("meta"):
        nets = _networks(cfg)
    return {name: sum(p.numel() for p in net.parameters()) for name, net in nets.items()}


# --------------------------------------------------------------------------------------------------------------------
# builders


def _networks(cfg: dict) -> dict:
    """Each network once, by name (what ``count_parameters`` reports)."""
    from diffusers import AutoencoderKL, ControlNetModel, UNet2DConditionModel, UNet3DConditionModel

    sd_unet = UNet2DConditionModel(**cfg["sd_unet"])
    return {
        "sd_unet": sd_unet,
        "vae": AutoencoderKL(**cfg["vae"]),
        "sd_text_encoder": _text_encoder(cfg["sd_text_encoder"]),
        "controlnet": ControlNetModel.from_unet(
            sd_unet, conditioning_embedding_out_channels=tuple(cfg["controlnet_conditioning"])
        ),
        "zero123_unet": UNet2DConditionModel(**cfg["zero123_unet"]),
        "zero123_image_encoder": _image_encoder(cfg["zero123_image_encoder"]),
        "unet3d": UNet3DConditionModel(**cfg["unet3d"]),
        "video_text_encoder": _text_encoder(cfg["video_text_encoder"]),
    }


def _built(factory, device: str):
    """``factory()`` initialised on ``device`` (seeded), as fp16 on the CPU, ready to save."""
    import torch

    torch.manual_seed(_SEED)
    with torch.device(device):
        module = factory()
    return module.to(device="cpu", dtype=torch.float16).eval()


def _text_encoder(arch: dict):
    from transformers import CLIPTextConfig, CLIPTextModel

    from animate124.testing import tiny_models as tm
    config = CLIPTextConfig(
        vocab_size=tm.CLIP_VOCAB_SIZE, max_position_embeddings=tm.CLIP_MAX_LENGTH, bos_token_id=49406,
        eos_token_id=49407, pad_token_id=49407, **arch,
    )
    return CLIPTextModel(config)


def _image_encoder(arch: dict):
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    return CLIPVisionModelWithProjection(CLIPVisionConfig(**arch))


def _tokenizer(path: Path):
    """CLIP's real tokenizer (built offline from open_clip's vocabulary); without open_clip, a character-level one
    with CLIP's special-token ids: prompts still pad to 77 tokens, so every tensor shape (and time) is the same."""
    from transformers import CLIPTokenizer

    from animate124.testing import tiny_models as tm
    try:
        return CLIPTokenizer.from_pretrained(tm.make_clip_tokenizer(path))
    except ImportError as error:
        print(f"make_full_size_models: {error}; writing a character-level CLIP tokenizer (same shapes; "
              "pip install open_clip_torch for the real vocabulary)")
    path.mkdir(parents=True, exist_ok=True)
    chars = list(tm._bytes_to_unicode().values())
    vocab = {tok: i for i, tok in enumerate(chars + [c + "</w>" for c in chars])}
    vocab.update({"<|startoftext|>": 49406, "<|endoftext|>": 49407})
    (path / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (path / "merges.txt").write_text("#version: 0.2\n", encoding="utf-8")
    tokenizer = CLIPTokenizer(str(path / "vocab.json"), str(path / "merges.txt"),
                              model_max_length=tm.CLIP_MAX_LENGTH, pad_token="<|endoftext|>")
    tokenizer.save_pretrained(path)
    return tokenizer


def _sd_scheduler_kwargs() -> dict:
    """SD 1.5's noise schedule (also ModelScope's and Zero123's)."""
    return dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                set_alpha_to_one=False, steps_offset=1)


def _write_sd(path: Path, cfg: dict, device: str) -> None:
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel

    pipe = StableDiffusionPipeline(
        vae=_built(lambda: AutoencoderKL(**cfg["vae"]), device),
        text_encoder=_built(lambda: _text_encoder(cfg["sd_text_encoder"]), device),
        tokenizer=_tokenizer(path / "tokenizer"),
        unet=_built(lambda: UNet2DConditionModel(**cfg["sd_unet"]), device),
        scheduler=PNDMScheduler(**_sd_scheduler_kwargs(), skip_prk_steps=True),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(path, safe_serialization=True)


def _write_controlnet(path: Path, cfg: dict, device: str) -> None:
    from diffusers import ControlNetModel, UNet2DConditionModel

    def build():
        unet = UNet2DConditionModel(**cfg["sd_unet"])
        return ControlNetModel.from_unet(
            unet, conditioning_embedding_out_channels=tuple(cfg["controlnet_conditioning"])
        )

    _built(build, device).save_pretrained(path, safe_serialization=True)


def _write_zero123(path: Path, cfg: dict, device: str) -> None:
    """Component by component: the pipeline class lives in threestudio's ``extern/zero123.py``, which this package
    must not import. ``clip_camera_projection`` is one ``Linear(D + 4 -> D)`` named ``proj``."""
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPImageProcessor

    from animate124.testing.tiny_models import write_zero123_extras

    _built(lambda: UNet2DConditionModel(**cfg["zero123_unet"]), device).save_pretrained(
        path / "unet", safe_serialization=True)
    _built(lambda: AutoencoderKL(**cfg["vae"]), device).save_pretrained(path / "vae", safe_serialization=True)
    DDIMScheduler(**_sd_scheduler_kwargs(), clip_sample=False).save_pretrained(path / "scheduler")
    _built(lambda: _image_encoder(cfg["zero123_image_encoder"]), device).save_pretrained(
        path / "image_encoder", safe_serialization=True)
    CLIPImageProcessor().save_pretrained(path / "feature_extractor")  # CLIP's 224 px preprocessing
    dim = int(cfg["zero123_image_encoder"]["projection_dim"])
    write_zero123_extras(path, _built(lambda: torch.nn.Linear(dim + 4, dim), device))


def _write_text_to_video(path: Path, cfg: dict, device: str) -> None:
    from diffusers import AutoencoderKL, DDIMScheduler, TextToVideoSDPipeline, UNet3DConditionModel

    pipe = TextToVideoSDPipeline(
        vae=_built(lambda: AutoencoderKL(**cfg["vae"]), device),
        text_encoder=_built(lambda: _text_encoder(cfg["video_text_encoder"]), device),
        tokenizer=_tokenizer(path / "tokenizer"),
        unet=_built(lambda: UNet3DConditionModel(**cfg["unet3d"]), device),
        scheduler=DDIMScheduler(**_sd_scheduler_kwargs(), clip_sample=False),
    )
    pipe.save_pretrained(path, safe_serialization=True)
