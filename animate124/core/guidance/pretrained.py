"""Loading the frozen parts of a diffusion model (U-Net, VAE, scheduler, text encoder) from a hub id or a local
folder in the same layout, and what every frozen SDS prior shares."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from jaxtyping import Float
from torch import Tensor

from animate124.core.guidance import published_models, text_encoding
from animate124.core.io.safe_files import weights_only_pickles


def load_pretrained_component(
    cls,
    name_or_path: str,
    subfolder: str | None = None,
    *,
    torch_dtype: torch.dtype = torch.float32,
    prefer_fp16_variant: bool = False,
    local_files_only: bool | None = None,
):
    """``cls.from_pretrained(name_or_path, subfolder=...)``, trying ``variant="fp16"`` first when asked (smaller
    download) and falling back to the default weights when the repo or folder has no fp16 files (ZeroScope and
    ControlNet-Tile publish one fp32 set of ``.bin`` pickles, cast to ``torch_dtype`` after loading). Pickles load
    with ``weights_only=True`` (a pickle that would run code is refused); safetensors are preferred when both exist.
    A renamed repository is found in the cache under either name (``published_models.resolve_repo_id``).

    Raises:
        OSError: one line naming the id and how to use a local folder when neither the hub nor a folder has it, or
            naming the refused pickle.
    """
    name_or_path = published_models.resolve_repo_id(str(name_or_path))
    kwargs = {"subfolder": subfolder} if subfolder else {}
    if local_files_only is not None:
        kwargs["local_files_only"] = local_files_only
    folder = Path(name_or_path) / (subfolder or "")
    if folder.is_dir() and not any(folder.glob("*.fp16.*")):
        prefer_fp16_variant = False  # a local folder without fp16 files: skip the failing (and noisy) first try
    attempts = [{"variant": "fp16"}, {}] if prefer_fp16_variant else [{}]
    errors = []
    for extra in attempts:
        with weights_only_pickles() as refused:
            try:
                return cls.from_pretrained(name_or_path, torch_dtype=torch_dtype, **kwargs, **extra)
            except (OSError, ValueError, EnvironmentError) as err:  # a missing variant raises one of these
                errors.append(err)
            except Exception as err:  # noqa: BLE001 - a refused pickle surfaces as the library's own error type
                if not refused:
                    raise
                errors.append(err)
        if refused:
            raise OSError(f"could not load {cls.__name__}: {refused[0]}")
    where = f"{name_or_path}/{subfolder}" if subfolder else name_or_path
    raise OSError(
        f"could not load {cls.__name__} from {where!r} (offline or not downloaded?): download it once "
        f"(`{published_models.hub_cli()} download {name_or_path}`; `animate124 models CONFIG` lists every file a config "
        f"needs) or set the id to a local folder in the same layout (`animate124 make-tiny-models DIR` writes tiny "
        f"test ones); last error: {str(errors[-1]).splitlines()[0]}"
    )


@dataclass
class DiffusionParts:
    """The frozen parts every SDS prior loads from a diffusers folder (see ``load_diffusion_parts``)."""

    unet: object
    vae: object
    alphas_cumprod: Float[Tensor, "N"]
    prompt_encoder: text_encoding.PromptEncoder | None
    dtype: torch.dtype
    device: torch.device


def load_diffusion_parts(
    name_or_path: str | Path,
    unet_class,
    *,
    device: torch.device | str = "cpu",
    torch_dtype: torch.dtype | None = None,
    load_text_encoder: bool = True,
    local_files_only: bool | None = None,
) -> DiffusionParts:
    """``unet`` (of ``unet_class``), ``vae``, the DDIM ``scheduler``'s ``ᾱ`` and (optionally) the cached CLIP text
    encoder from the sub-folders of a hub id or local folder, frozen. ``torch_dtype`` defaults to fp16 on CUDA (the
    ``fp16`` weight variant when present) and fp32 on CPU."""
    from diffusers import AutoencoderKL, DDIMScheduler

    device = torch.device(device)
    dtype = torch_dtype or (torch.float16 if device.type == "cuda" else torch.float32)
    path = str(name_or_path)
    kw = dict(torch_dtype=dtype, prefer_fp16_variant=dtype == torch.float16, local_files_only=local_files_only)
    unet = load_pretrained_component(unet_class, path, "unet", **kw).to(device)
    vae = load_pretrained_component(AutoencoderKL, path, "vae", **kw).to(device)
    scheduler = load_pretrained_component(DDIMScheduler, path, "scheduler", local_files_only=local_files_only)
    prompt_encoder = None
    if load_text_encoder:
        prompt_encoder = text_encoding.PromptEncoder.from_pretrained(
            path, dtype=dtype, device=device, local_files_only=local_files_only
        )
    return DiffusionParts(unet, vae, scheduler.alphas_cumprod.float(), prompt_encoder, dtype, device)


class FrozenPrior:
    """What the video and ControlNet SDS priors share: a frozen ``unet``, ``alphas_cumprod`` and an optional cached
    text encoder (``prompt_encoder``). Not an ``nn.Module`` on purpose: frozen weights stay out of trainable
    parameters and checkpoints."""

    unet: object
    alphas_cumprod: Tensor
    prompt_encoder: text_encoding.PromptEncoder | None

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    def encode_prompt(self, prompts: str | list[str]) -> Float[Tensor, "B 77 D"]:
        """Cached CLIP embeddings ``[len(prompts), 77, D]`` (see ``text_encoding.PromptEncoder``)."""
        return text_encoding.encode_cached(self.prompt_encoder, prompts, type(self).__name__)


def freeze(*modules) -> None:
    """Eval mode and no gradients for the frozen prior's modules (anything that is not an ``nn.Module`` is skipped)."""
    for module in modules:
        if isinstance(module, torch.nn.Module):
            module.eval().requires_grad_(False)
