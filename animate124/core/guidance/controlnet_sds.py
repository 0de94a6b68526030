"""ControlNet-Tile score distillation for semantic refinement (Animate124 §3.3).

A few frames of the rendered clip are scored by Stable Diffusion 1.5 steered by ControlNet-Tile
(``lllyasviel/control_v11f1e_sd15_tile``), whose condition is a render of the same frames. The U-Net's text holds the
textual-inversion token (``"a <token> is dancing"``); the ControlNet gets its own short text ("best quality") on the
conditional half and the negative text on the unconditional half. See ``sds.py`` for the symbols.

Per call:

1. pick ``k`` frames (at random with the generator, or the caller's indices);
2. centre-crop each frame and its condition to a square and bilinearly resize both to ``fixed_size`` (1024 default);
3. VAE-encode the frames with gradient; one timestep *per frame*; i.i.d. noise;
4. ControlNet residuals for both CFG halves from the same condition image in [0, 1]; the U-Net adds them;
5. standard CFG ``ε̂ = ε_u + s(ε_c − ε_u)``, ``g = w(t)(ε̂ − ε)``, loss ``½‖z − sg(z − g)‖² / k``.

The condition (``cond_rgb``) is the caller's choice: ``None`` means the current render itself, detached (the
``threestudio`` branch: the refinement can then chase its own drift); upstream ``main`` instead feeds the render of a
frozen copy of the stage-2 model, which the caller renders and passes in. Defaults: scale 7.5 standard form (the
``threestudio`` branch; ``main`` used 7.5 in the ``ε_c + s(ε_c − ε_u)`` form, i.e. 8.5), weighting ``1 − ᾱ_t``,
t in [20, 980]. ``main``'s x̂₀-target loss is ``weighting="x0"``.
"""

from __future__ import annotations

from pathlib import Path

import torch
from jaxtyping import Float, Int
from torch import Tensor

from animate124.core.guidance import pretrained, published_models, sds, text_encoding, vae_encoding

SD15_ID = published_models.SD15.repo_id  # the runwayml/ repository was withdrawn
CONTROLNET_TILE_ID = published_models.CONTROLNET_TILE.repo_id


class ControlNetTileSDS(pretrained.FrozenPrior):
    """Frozen SD 1.5 U-Net + ControlNet-Tile + VAE (+ CLIP text encoder) used as an SDS prior on single frames.

    Args:
        unet: ``UNet2DConditionModel``; controlnet: ``ControlNetModel`` built for it; vae: ``AutoencoderKL``.
        alphas_cumprod: ``[N]`` ``ᾱ`` of the SD noise schedule.
        prompt_encoder: ``text_encoding.PromptEncoder`` for ``encode_prompt``; load a textual inversion into its
            tokenizer / text encoder (``textual_inversion.load_textual_inversion``) before encoding prompts that use
            the token (the cache is keyed by prompt string only).
    """

    def __init__(
        self, unet, controlnet, vae, alphas_cumprod: Float[Tensor, "N"],
        prompt_encoder: text_encoding.PromptEncoder | None = None,
    ):
        self.unet, self.controlnet, self.vae = unet, controlnet, vae
        self.prompt_encoder = prompt_encoder
        self.alphas_cumprod = alphas_cumprod.float()
        pretrained.freeze(unet, controlnet, vae)

    @classmethod
    def from_pretrained(
        cls,
        sd_name_or_path: str | Path = SD15_ID,
        controlnet_name_or_path: str | Path = CONTROLNET_TILE_ID,
        *,
        device: torch.device | str = "cpu",
        torch_dtype: torch.dtype | None = None,
        load_text_encoder: bool = True,
        local_files_only: bool | None = None,
    ) -> "ControlNetTileSDS":
        """Load SD 1.5 (``unet``, ``vae``, ``scheduler``, ``text_encoder``, ``tokenizer`` sub-folders) and a
        ControlNet folder / id. fp16 (``fp16`` variant when present) on CUDA, fp32 on CPU, unless ``torch_dtype``."""
        from diffusers import ControlNetModel, UNet2DConditionModel

        parts = pretrained.load_diffusion_parts(
            sd_name_or_path, UNet2DConditionModel, device=device, torch_dtype=torch_dtype,
            load_text_encoder=load_text_encoder, local_files_only=local_files_only,
        )
        controlnet = pretrained.load_pretrained_component(
            ControlNetModel, str(controlnet_name_or_path), None, torch_dtype=parts.dtype,
            prefer_fp16_variant=parts.dtype == torch.float16, local_files_only=local_files_only,
        ).to(parts.device)
        return cls(parts.unet, controlnet, parts.vae, parts.alphas_cumprod, parts.prompt_encoder)

    def __call__(
        self,
        frames: Float[Tensor, "T H W 3"],
        prompt: str | None = None,
        *,
        cond_rgb: Float[Tensor, "T H W 3"] | None = None,
        negative_prompt: str = "",
        controlnet_prompt: str = "best quality",
        cond_embeddings: Float[Tensor, "E 77 D"] | None = None,
        uncond_embeddings: Float[Tensor, "E 77 D"] | None = None,
        controlnet_embeddings: Float[Tensor, "E 77 D"] | None = None,
        num_frames: int = 2,
        frame_indices: Int[Tensor, "K"] | list[int] | None = None,
        fixed_size: int = 1024,
        guidance_scale: float = 7.5,
        conditioning_scale: float = 1.0,
        weighting: sds.Weighting = "sds",
        min_step: int = 20,
        max_step: int = 980,
        sample_posterior: bool = True,
        vae_checkpoint: bool = False,
        generator: torch.Generator | None = None,
        return_intermediates: bool = False,
    ) -> dict[str, Tensor]:
        """ControlNet-Tile SDS loss on ``k`` frames of one rendered clip.

        Args:
            frames: ``[T, H, W, 3]`` RGB in [0, 1]; receives the gradient.
            prompt: U-Net text (with the textual-inversion token already substituted), or ``cond_embeddings``.
            cond_rgb: ``[T, H, W, 3]`` condition frames (e.g. the frozen stage-2 render), same shape as ``frames``;
                ``None`` = ``frames`` detached. Never receives gradient.
            negative_prompt / uncond_embeddings: text of the unconditional half (U-Net and ControlNet).
            controlnet_prompt / controlnet_embeddings: ControlNet text of the conditional half.
            num_frames: ``k`` frames drawn without replacement when ``frame_indices`` is None.
            fixed_size: square side the frames are resized to before the VAE (latents ``fixed_size / 8``).
            guidance_scale: standard CFG scale; conditioning_scale: ControlNet residual scale.
            weighting, min_step, max_step, sample_posterior, generator: as in ``VideoSDS``.
            vae_checkpoint: encode the frames one at a time and run each one's encoder again in the backward (one
                frame's encoder activations held at a time instead of ``k``, for one more encoder forward).

        Returns:
            ``loss_sds_cn``, ``grad_norm``, ``timestep`` ``[k]`` (one per frame), ``frame_indices`` ``[k]``; with
            ``return_intermediates`` also ``latents``, ``noise``, ``eps_pred``, ``grad``, ``weight``, ``cond_image``.
        """
        # 1. inputs and frame choice
        idx = self._frame_indices(frames, cond_rgb, frame_indices, num_frames, generator)
        k = idx.shape[0]
        cond_src = frames.detach() if cond_rgb is None else cond_rgb.detach().to(frames.device)
        text = self._texts(
            prompt, negative_prompt, controlnet_prompt, cond_embeddings, uncond_embeddings, controlnet_embeddings, k
        )
        # 2. square crop + resize (frames with gradient, condition without)
        images = vae_encoding.resize_to_model(frames[idx.to(frames.device)].permute(0, 3, 1, 2), (fixed_size, fixed_size))
        cond_image = vae_encoding.resize_to_model(
            cond_src[idx.to(cond_src.device)].permute(0, 3, 1, 2), (fixed_size, fixed_size)
        )
        # 3.-5. latents with gradient; one timestep per frame, noise, ControlNet + U-Net, guidance, weighting, loss
        latents = vae_encoding.encode_latents(self.vae, images, sample_posterior=sample_posterior, generator=generator,
                                     chunk_size=1 if vae_checkpoint else None, checkpoint=vae_checkpoint)
        step = sds.sds_step(
            latents, lambda noisy, t: self._predict_noise(noisy, t, text, cond_image, conditioning_scale),
            self.alphas_cumprod, guidance_scale=guidance_scale, weighting=weighting, min_step=min_step,
            max_step=max_step, generator=generator,
        )
        out = {"loss_sds_cn": step.loss, "grad_norm": step.grad_norm, "timestep": step.timestep, "frame_indices": idx}
        if return_intermediates:
            out.update(latents=latents, noise=step.noise, eps_pred=step.eps_pred, grad=step.grad, weight=step.weight,
                       cond_image=cond_image)
        return out

    # ------------------------------------------------------------------------------------------------------------------

    def _predict_noise(self, noisy, t, text, cond_image, conditioning_scale):
        """Both CFG halves in one batch, the U-Net adding the ControlNet residuals: ``(ε_c, ε_u)``."""
        unet_text, cn_text = text
        dtype = self.unet.dtype
        x = torch.cat([noisy, noisy]).to(dtype)
        tt = torch.cat([t, t])
        with vae_encoding.own_precision(self.unet, noisy.device):
            down, mid = self.controlnet(
                x,
                tt,
                encoder_hidden_states=cn_text.to(dtype),
                controlnet_cond=torch.cat([cond_image, cond_image]).to(self.controlnet.dtype),
                conditioning_scale=conditioning_scale,
                return_dict=False,
            )
            eps = self.unet(
                x,
                tt,
                encoder_hidden_states=unet_text.to(dtype),
                down_block_additional_residuals=down,
                mid_block_additional_residual=mid,
            ).sample.float()
        return eps.chunk(2)

    def _frame_indices(self, frames, cond_rgb, frame_indices, num_frames, generator) -> Tensor:
        if frames.dim() != 4 or frames.shape[-1] != 3:
            raise ValueError(f"ControlNetTileSDS: frames must be [T, H, W, 3] RGB in [0, 1], got {tuple(frames.shape)}")
        if cond_rgb is not None and cond_rgb.shape != frames.shape:
            raise ValueError(
                f"ControlNetTileSDS: cond_rgb shape {tuple(cond_rgb.shape)} must equal frames shape "
                f"{tuple(frames.shape)}; render the condition with the same cameras and times"
            )
        n = frames.shape[0]
        if frame_indices is not None:
            idx = torch.as_tensor(frame_indices, dtype=torch.long).flatten().cpu()
            if idx.numel() == 0 or idx.min() < 0 or idx.max() >= n:
                raise ValueError(f"ControlNetTileSDS: frame_indices={idx.tolist()} must be non-empty and in [0, {n})")
            return idx
        if not 1 <= num_frames <= n:
            raise ValueError(f"ControlNetTileSDS: num_frames={num_frames} must be in [1, T={n}]")
        return torch.randperm(n, generator=sds.cpu_generator(generator))[:num_frames]

    def _texts(self, prompt, negative_prompt, controlnet_prompt, cond, uncond, cn_cond, k):
        if cond is None:
            if prompt is None:
                raise ValueError("ControlNetTileSDS: pass prompt='...' or cond_embeddings=[1, 77, D]")
            cond = self.encode_prompt(prompt)
        uncond = self.encode_prompt(negative_prompt) if uncond is None else uncond
        cn_cond = self.encode_prompt(controlnet_prompt) if cn_cond is None else cn_cond
        device = self.device
        cond, uncond, cn_cond = (e.to(device).expand(k, -1, -1) for e in (cond, uncond, cn_cond))
        return torch.cat([cond, uncond]), torch.cat([cn_cond, uncond])
