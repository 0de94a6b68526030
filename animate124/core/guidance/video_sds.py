"""Text-to-video score distillation (Animate124 §3.2, "video SDS") with a ModelScope / ZeroScope U-Net3D.

One call turns a rendered clip into a loss whose gradient is the SDS gradient of a frozen text-to-video diffusion
model (see ``sds.py`` for the symbols):

1. resize every frame to the model size (centre crop to the model aspect, bilinear resize: ``vae_encoding.resize_to_model``);
2. VAE-encode every frame independently with gradient (``× vae scaling factor``): latents ``[B, 4, T, h, w]``;
3. one timestep per clip, ``t ~ U{min_step, …, max_step}``; i.i.d. noise over all frames;
4. the frozen U-Net predicts the noise for the text and the negative text (no gradient);
5. standard CFG ``ε̂ = ε_u + s(ε_c − ε_u)``; ``g = w(t)(ε̂ − ε)``; loss ``½‖z − sg(z − g)‖² / B``.

Defaults reproduce upstream: guidance scale 101 (upstream writes 100 in the ``ε_c + s(ε_c − ε_u)`` form), weighting
``1 − ᾱ_t``, t in [20, 980], posterior *sampled* (not its mean), no annealing.
"""

from __future__ import annotations

from pathlib import Path

import torch
from jaxtyping import Float
from torch import Tensor

from animate124.core.guidance import pretrained, published_models, sds, text_encoding, vae_encoding

MODELSCOPE_ID = published_models.MODELSCOPE.repo_id


class VideoSDS(pretrained.FrozenPrior):
    """Frozen text-to-video diffusion model (U-Net3D, VAE, DDIM schedule, CLIP text encoder) used as an SDS prior.

    Models and dtype are whatever was passed in; losses are computed in fp32 (see ``pretrained.FrozenPrior``).

    Args:
        unet: ``UNet3DConditionModel`` (input ``[B, 4, T, h, w]``).
        vae: ``AutoencoderKL`` (or anything with ``encode(x).latent_dist.{mean,std}``, ``config.scaling_factor``).
        alphas_cumprod: ``[N]`` ``ᾱ`` of the training noise schedule (``scheduler.alphas_cumprod``).
        prompt_encoder: ``text_encoding.PromptEncoder`` for ``encode_prompt``; optional when embeddings are always
            passed in.
        model_size: ``(H, W)`` pixel size the model was trained at (256×256 ModelScope, 320×576 ZeroScope).
    """

    def __init__(
        self,
        unet,
        vae,
        alphas_cumprod: Float[Tensor, "N"],
        prompt_encoder: text_encoding.PromptEncoder | None = None,
        model_size: tuple[int, int] = (256, 256),
    ):
        self.unet, self.vae = unet, vae
        self.prompt_encoder = prompt_encoder
        self.alphas_cumprod = alphas_cumprod.float()
        self.num_train_timesteps = int(alphas_cumprod.shape[0])
        self.model_size = tuple(model_size)
        pretrained.freeze(unet, vae)

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | Path = MODELSCOPE_ID,
        *,
        device: torch.device | str = "cpu",
        torch_dtype: torch.dtype | None = None,
        model_size: tuple[int, int] | None = None,
        load_text_encoder: bool = True,
        local_files_only: bool | None = None,
    ) -> "VideoSDS":
        """Load from a hub id or a local folder in the text-to-video pipeline layout (``unet``, ``vae``,
        ``text_encoder``, ``tokenizer``, ``scheduler``).

        ``torch_dtype`` defaults to fp16 on CUDA (the ``fp16`` weight variant is used when present) and fp32 on CPU.
        ``model_size`` defaults to 320×576 for ZeroScope ids, else ``unet.config.sample_size × 8`` when the U-Net
        config gives a ``(h, w)`` pair, else 256×256.
        """
        from diffusers import UNet3DConditionModel

        parts = pretrained.load_diffusion_parts(
            name_or_path, UNet3DConditionModel, device=device, torch_dtype=torch_dtype,
            load_text_encoder=load_text_encoder, local_files_only=local_files_only,
        )
        if model_size is None:
            model_size = _default_model_size(str(name_or_path), parts.unet, parts.vae)
        return cls(parts.unet, parts.vae, parts.alphas_cumprod, parts.prompt_encoder, model_size)

    def encode_frames(
        self,
        frames: Float[Tensor, "B T 3 H W"],
        *,
        low_ram_vae: int = 0,
        vae_chunk_size: int | None = None,
        vae_checkpoint: bool = False,
        sample_posterior: bool = True,
        generator: torch.Generator | None = None,
    ) -> Float[Tensor, "B 4 T h w"]:
        """VAE latents (fp32, ``× scaling_factor``) of frames in [0, 1] already at the model size.

        ``low_ram_vae = n > 0``: in each clip exactly ``n`` random frames are encoded with gradient, the others under
        ``no_grad`` (they get no gradient). ``vae_chunk_size``: encode at most this many images per VAE call (lower
        peak memory in the forward pass; the backward still keeps every graded frame's activations, unless
        ``vae_checkpoint``: then the backward runs each chunk's encoder again and holds one chunk's activations at a
        time; see ``vae_encoding.encode_moments``).
        ``sample_posterior``: ``mean + std · ε'`` (upstream) or the mean.
        """
        b, t = frames.shape[:2]
        if not 0 <= low_ram_vae <= t:
            raise ValueError(f"encode_frames: low_ram_vae={low_ram_vae} must be in [0, T={t}] (0 = all frames graded)")
        graded = None
        if low_ram_vae > 0:
            order = [torch.randperm(t, generator=sds.cpu_generator(generator)) for _ in range(b)]
            graded = torch.stack([o < low_ram_vae for o in order]).reshape(-1)  # n True per clip
        latents = vae_encoding.encode_latents(
            self.vae, frames.reshape(b * t, *frames.shape[2:]), sample_posterior=sample_posterior,
            generator=generator, graded=graded, chunk_size=vae_chunk_size, checkpoint=vae_checkpoint,
        )
        return latents.reshape(b, t, *latents.shape[1:]).permute(0, 2, 1, 3, 4)

    def __call__(
        self,
        frames: Float[Tensor, "*B T H W 3"],
        prompt: str | None = None,
        *,
        negative_prompt: str = "",
        cond_embeddings: Float[Tensor, "E 77 D"] | None = None,
        uncond_embeddings: Float[Tensor, "E 77 D"] | None = None,
        guidance_scale: float = 101.0,
        weighting: sds.Weighting = "sds",
        min_step: int = 20,
        max_step: int = 980,
        low_ram_vae: int = 0,
        vae_chunk_size: int | None = None,
        vae_checkpoint: bool = False,
        sample_posterior: bool = True,
        generator: torch.Generator | None = None,
        return_intermediates: bool = False,
    ) -> dict[str, Tensor]:
        """Video SDS loss of a rendered clip.

        Args:
            frames: ``[T, H, W, 3]`` (one clip) or ``[B, T, H, W, 3]``, RGB in [0, 1]; receives the gradient.
            prompt / negative_prompt: text, encoded with the cache; or pass ``cond_embeddings`` and
                ``uncond_embeddings`` (``[E, 77, D]``, ``E`` = 1 or B, e.g. from a prompt processor) instead.
            guidance_scale: standard CFG scale (101 = upstream's 100 in its ``ε_c + s(ε_c − ε_u)`` form).
            weighting: ``w(t)``, see ``sds.sds_weight``.
            min_step, max_step: inclusive timestep range (see ``sds.timestep_range`` for annealing).
            low_ram_vae, vae_chunk_size, vae_checkpoint, sample_posterior: see ``encode_frames``.
            generator: drives timesteps, noise, posterior samples and the low-RAM frame choice.
            return_intermediates: also return ``latents``, ``noise``, ``eps_pred``, ``grad``, ``weight``.

        Returns:
            ``loss_sds_video`` (scalar, gradient ``g / B`` on the latents), ``grad_norm`` (‖g‖), ``timestep`` ``[B]``,
            ``min_step``, ``max_step``.
        """
        # 1. inputs
        clips = _check_frames(frames)
        b = clips.shape[0]
        cond, uncond = self._embeddings(prompt, negative_prompt, cond_embeddings, uncond_embeddings, b)
        images = clips.permute(0, 1, 4, 2, 3).reshape(-1, 3, *clips.shape[2:4])  # [B*T, 3, H, W]
        images = vae_encoding.resize_to_model(images, self.model_size).reshape(b, clips.shape[1], 3, *self.model_size)
        # 2. latents with gradient
        latents = self.encode_frames(
            images,
            low_ram_vae=low_ram_vae,
            vae_chunk_size=vae_chunk_size,
            vae_checkpoint=vae_checkpoint,
            sample_posterior=sample_posterior,
            generator=generator,
        )
        # 3.-5. noise, frozen U-Net, guidance, loss
        return self.sds_from_latents(
            latents,
            cond_embeddings=cond,
            uncond_embeddings=uncond,
            guidance_scale=guidance_scale,
            weighting=weighting,
            min_step=min_step,
            max_step=max_step,
            generator=generator,
            return_intermediates=return_intermediates,
        )

    def sds_from_latents(
        self,
        latents: Float[Tensor, "B 4 T h w"],
        *,
        cond_embeddings: Float[Tensor, "E 77 D"],
        uncond_embeddings: Float[Tensor, "E 77 D"],
        guidance_scale: float = 101.0,
        weighting: sds.Weighting = "sds",
        min_step: int = 20,
        max_step: int = 980,
        generator: torch.Generator | None = None,
        return_intermediates: bool = False,
    ) -> dict[str, Tensor]:
        """Steps 3-5 of the call on latents that already carry the gradient (``[B, 4, T, h, w]``, scaled by the VAE
        factor); same arguments and results as ``__call__``. Embeddings are ``[E, 77, D]`` with ``E`` = 1 or B."""
        b = latents.shape[0]
        cond = cond_embeddings.to(self.device).expand(b, -1, -1)
        uncond = uncond_embeddings.to(self.device).expand(b, -1, -1)
        step = sds.sds_step(
            latents, lambda noisy, t: self._predict_noise(noisy, t, cond, uncond), self.alphas_cumprod,
            guidance_scale=guidance_scale, weighting=weighting, min_step=min_step, max_step=max_step,
            generator=generator,
        )
        out = {
            "loss_sds_video": step.loss,
            "grad_norm": step.grad_norm,
            "timestep": step.timestep,
            "min_step": torch.tensor(min_step),
            "max_step": torch.tensor(max_step),
        }
        if return_intermediates:
            out.update(latents=latents, noise=step.noise, eps_pred=step.eps_pred, grad=step.grad, weight=step.weight)
        return out

    # ------------------------------------------------------------------------------------------------------------------

    def _predict_noise(self, noisy, t, cond, uncond):
        """Both CFG halves in one U-Net batch: ``(ε_c, ε_u)``."""
        dtype = self.unet.dtype
        with vae_encoding.own_precision(self.unet, noisy.device):
            out = self.unet(
                torch.cat([noisy, noisy]).to(dtype),
                torch.cat([t, t]),
                encoder_hidden_states=torch.cat([cond, uncond]).to(dtype),
            ).sample.float()
        return out.chunk(2)

    def _embeddings(self, prompt, negative_prompt, cond, uncond, b):
        if cond is None:
            if prompt is None:
                raise ValueError("VideoSDS: pass prompt='...' or cond_embeddings=[B, 77, D]")
            cond = self.encode_prompt(prompt)
        if uncond is None:
            uncond = self.encode_prompt(negative_prompt)
        device = self.device
        return cond.to(device).expand(b, -1, -1), uncond.to(device).expand(b, -1, -1)


# ----------------------------------------------------------------------------------------------------------------------
# helpers


def _check_frames(frames: Tensor) -> Tensor:
    if frames.dim() not in (4, 5) or frames.shape[-1] != 3:
        raise ValueError(
            f"VideoSDS: frames must be [T, H, W, 3] or [B, T, H, W, 3] RGB in [0, 1], got shape "
            f"{tuple(frames.shape)}; permute channels last"
        )
    return frames[None] if frames.dim() == 4 else frames


def _default_model_size(path: str, unet, vae) -> tuple[int, int]:
    if "zeroscope" in path.lower():
        return (320, 576)
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    size = unet.config.sample_size
    if isinstance(size, (list, tuple)) and len(size) == 2:
        return (int(size[0]) * factor, int(size[1]) * factor)
    return (256, 256)
