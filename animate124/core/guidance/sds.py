"""Score distillation sampling (SDS): the math shared by the video and the ControlNet-Tile guidance.

Symbols (DDPM, Ho et al. 2020; SDS, Poole et al. 2022 "DreamFusion", eq. 3):

- ``z``: clean latents of the rendered images (they carry the gradient back to the renderer);
- ``t``: integer diffusion timestep in ``[0, num_train_timesteps)``; ``ᾱ_t``: ``alphas_cumprod[t]``;
- ``z_t = √ᾱ_t · z + √(1 − ᾱ_t) · ε`` with ``ε ~ N(0, I)``;
- ``ε̂``: the guided noise prediction of the frozen diffusion model;
- ``g = w(t) · (ε̂ − ε)``: the SDS gradient with respect to ``z``;
- loss ``½‖z − sg(z − g)‖² / B`` (``sg`` = stop-gradient), whose gradient with respect to ``z`` is exactly ``g / B``.
  Its *value* is ``½‖g‖² / B`` and means nothing by itself; only its gradient matters.

Classifier-free guidance (CFG) here is always the standard form ``ε̂ = ε_u + s · (ε_c − ε_u)``. Upstream Animate124
(``main`` SD / video / ControlNet, and the ``threestudio`` branch's video guidance) writes ``ε_c + s · (ε_c − ε_u)``,
which is the standard form with scale ``s + 1``: upstream's ``100`` is our ``101``, its ``7.5`` is our ``8.5``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor

Weighting = Literal["sds", "sqrt", "one-minus-sqrt-alpha", "x0", "uniform"]
WEIGHTINGS: tuple[str, ...] = ("sds", "sqrt", "one-minus-sqrt-alpha", "x0", "uniform")
"""Allowed ``weighting`` names, see ``sds_weight``."""


def timestep_range(
    global_step: int,
    num_train_timesteps: int = 1000,
    min_step_percent: float = 0.02,
    max_step_percent: float = 0.98,
    max_step_percent_annealed: float | None = None,
    anneal_start_step: int | None = None,
    anneal_end_step: int | None = None,
) -> tuple[int, int]:
    """The inclusive timestep range ``[min_step, max_step]`` to sample from at ``global_step``.

    ``min_step = int(N · min_step_percent)``, ``max_step = int(N · max_step_percent)`` (``N = num_train_timesteps``),
    as upstream (0.02 / 0.98 give 20 / 980). Annealing lowers ``max_step`` towards ``int(N · max_step_percent_annealed)``:

    - ``anneal_start_step`` set, ``anneal_end_step`` None: a hard switch once ``global_step > anneal_start_step``
      (upstream's ProlificDreamer-style schedule);
    - both set: linear interpolation of the percentage from ``anneal_start_step`` to ``anneal_end_step``.

    ``max_step`` never falls below ``min_step``.
    """
    _check_percent("min_step_percent", min_step_percent)
    _check_percent("max_step_percent", max_step_percent)
    if min_step_percent > max_step_percent:
        raise ValueError(
            f"timestep_range: min_step_percent={min_step_percent} > max_step_percent={max_step_percent}; swap them"
        )
    max_percent = max_step_percent
    if anneal_start_step is not None and max_step_percent_annealed is not None:
        _check_percent("max_step_percent_annealed", max_step_percent_annealed)
        if anneal_end_step is None:
            if global_step > anneal_start_step:
                max_percent = max_step_percent_annealed
        else:
            if anneal_end_step <= anneal_start_step:
                raise ValueError(
                    f"timestep_range: anneal_end_step={anneal_end_step} must be > anneal_start_step="
                    f"{anneal_start_step}; or set anneal_end_step=None for a hard switch"
                )
            frac = min(max((global_step - anneal_start_step) / (anneal_end_step - anneal_start_step), 0.0), 1.0)
            max_percent = max_step_percent + frac * (max_step_percent_annealed - max_step_percent)
    min_step = int(num_train_timesteps * min_step_percent)
    max_step = max(int(num_train_timesteps * max_percent), min_step)
    return min_step, max_step


def sample_timesteps(
    batch: int,
    min_step: int,
    max_step: int,
    *,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> Int[Tensor, "B"]:
    """``batch`` integer timesteps drawn uniformly from ``{min_step, …, max_step}`` (both inclusive, as upstream)."""
    if not 0 <= min_step <= max_step:
        raise ValueError(
            f"sample_timesteps: need 0 <= min_step <= max_step, got min_step={min_step}, max_step={max_step}"
        )
    gen_device = generator.device if generator is not None else "cpu"
    t = torch.randint(min_step, max_step + 1, (batch,), generator=generator, device=gen_device)
    return t.to(device if device is not None else gen_device)


def randn(
    shape: tuple[int, ...] | torch.Size,
    *,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Standard normal noise drawn on the generator's device and moved to ``device``, so a CPU generator gives the
    same numbers whichever device the models run on."""
    gen_device = generator.device if generator is not None else (device or "cpu")
    return torch.randn(tuple(shape), generator=generator, device=gen_device, dtype=dtype).to(device or gen_device)


def cpu_generator(generator: torch.Generator | None) -> torch.Generator | None:
    """A CPU generator for CPU-only draws (``randperm`` of frame indices): the generator itself, or one seeded
    deterministically from a CUDA generator's next draw."""
    if generator is None or generator.device.type == "cpu":
        return generator
    seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device).item())
    return torch.Generator().manual_seed(seed)


def add_noise(
    latents: Float[Tensor, "B ..."],
    noise: Float[Tensor, "B ..."],
    alphas_cumprod: Float[Tensor, "N"],
    t: Int[Tensor, "B"],
) -> Float[Tensor, "B ..."]:
    """Forward diffusion ``z_t = √ᾱ_t z + √(1 − ᾱ_t) ε`` (DDPM eq. 4), one ``t`` per leading index."""
    a = _per_sample(alphas_cumprod.to(latents.device, torch.float32)[t], latents)
    return a.sqrt() * latents + (1 - a).sqrt() * noise


def cfg_combine(
    eps_uncond: Float[Tensor, "B ..."], eps_cond: Float[Tensor, "B ..."], guidance_scale: float
) -> Float[Tensor, "B ..."]:
    """Standard classifier-free guidance ``ε̂ = ε_u + s · (ε_c − ε_u)``.

    Upstream's ``ε_c + s · (ε_c − ε_u)`` equals this with ``s + 1``; pass ``upstream_scale + 1`` to reproduce it.
    """
    return eps_uncond + guidance_scale * (eps_cond - eps_uncond)


def sds_weight(alphas_cumprod: Float[Tensor, "N"], t: Int[Tensor, "B"], weighting: Weighting) -> Float[Tensor, "B"]:
    """Per-sample weight ``w(t)`` of the SDS gradient.

    - ``"sds"``: ``1 − ᾱ_t`` (DreamFusion; upstream video and ControlNet guidance);
    - ``"sqrt"``: ``√(1 − ᾱ_t)`` = σ_t, the noise standard deviation;
    - ``"one-minus-sqrt-alpha"``: ``1 − √ᾱ_t`` (threestudio's unified guidances call this ``dreamfusion``;
      the static stage's SD and Zero123 terms use it);
    - ``"x0"``: ``√((1 − ᾱ_t) / ᾱ_t)``, the gradient implied by upstream ``main``'s ControlNet loss
      ``½‖z − sg(x̂₀)‖²`` with ``x̂₀ = (z_t − √(1−ᾱ) ε̂)/√ᾱ`` (≈ 0.57 at t = 200, 5.1 at t = 800);
    - ``"uniform"``: 1.
    """
    a = alphas_cumprod.to(t.device, torch.float32)[t]
    if weighting == "sds":
        return 1 - a
    if weighting == "sqrt":
        return (1 - a).sqrt()
    if weighting == "one-minus-sqrt-alpha":
        return 1 - a.sqrt()
    if weighting == "x0":
        return ((1 - a) / a).sqrt()
    if weighting == "uniform":
        return torch.ones_like(a)
    raise ValueError(f"sds_weight: weighting={weighting!r} is not one of {list(WEIGHTINGS)}")


def sds_gradient(
    eps_pred: Float[Tensor, "B ..."], noise: Float[Tensor, "B ..."], weight: Float[Tensor, "B"]
) -> Float[Tensor, "B ..."]:
    """``g = w(t) · (ε̂ − ε)`` in fp32 with NaN / ±inf replaced by 0 / ±max-float (an fp16 U-Net can overflow)."""
    grad = _per_sample(weight.float(), eps_pred) * (eps_pred.float() - noise.float())
    return torch.nan_to_num(grad)


def sds_loss(latents: Float[Tensor, "B ..."], grad: Float[Tensor, "B ..."], batch_size: int | None = None) -> Tensor:
    """Reparameterised SDS loss ``½ Σ (z − sg(z − g))² / B`` (a sum over all latent entries, divided by ``B``).

    ``∂loss/∂z = g / B`` exactly, so automatic mixed precision and optimisers see SDS like any other loss.
    ``grad`` receives no gradient. ``B`` defaults to ``latents.shape[0]`` (clips for video, frames for images).
    """
    b = latents.shape[0] if batch_size is None else batch_size
    z = latents.float()
    target = (z - grad.float()).detach()
    return 0.5 * F.mse_loss(z, target, reduction="sum") / b


NoisePredictor = Callable[[Tensor, Tensor], tuple[Tensor, Tensor]]
"""``(z_t, t) -> (ε_c, ε_u)``: the frozen model's noise predictions for the conditional and unconditional text."""


@dataclass
class SDSStep:
    """What one ``sds_step`` computed. ``loss`` carries the gradient ``g / B`` to the latents; the rest is detached."""

    loss: Tensor
    """``½‖z − sg(z − g)‖² / B``, a scalar."""
    grad_norm: Tensor
    """``‖g‖`` over the whole batch."""
    timestep: Int[Tensor, "B"]
    noise: Tensor
    """``ε``, like the latents."""
    eps_pred: Tensor
    """``ε̂`` after classifier-free guidance."""
    weight: Float[Tensor, "B"]
    """``w(t)``."""
    grad: Tensor
    """``g = w(t) · (ε̂ − ε)``."""


def sds_step(
    latents: Float[Tensor, "B ..."],
    predict_noise: NoisePredictor,
    alphas_cumprod: Float[Tensor, "N"],
    *,
    guidance_scale: float,
    weighting: Weighting,
    min_step: int,
    max_step: int,
    generator: torch.Generator | None = None,
) -> SDSStep:
    """The SDS step shared by every guidance: one ``t ~ U{min_step, …, max_step}`` per sample, then ``ε ~ N(0, I)``
    (both from ``generator``, in that order), ``z_t``, the frozen model's ``(ε_c, ε_u)`` without gradient, standard
    CFG, ``w(t)``, ``g`` and the reparameterised loss (see the module docstring).

    Args:
        latents: ``[B, ...]`` clean latents carrying the gradient (fp32).
        predict_noise: ``(z_t, t) -> (ε_c, ε_u)``, each like ``z_t`` (see ``NoisePredictor``).
    """
    b = latents.shape[0]
    t = sample_timesteps(b, min_step, max_step, generator=generator, device=latents.device)
    noise = randn(latents.shape, generator=generator, device=latents.device)
    noisy = add_noise(latents.detach().float(), noise, alphas_cumprod, t)
    with torch.no_grad():
        eps_cond, eps_uncond = predict_noise(noisy, t)
    eps_pred = cfg_combine(eps_uncond.float(), eps_cond.float(), guidance_scale)
    weight = sds_weight(alphas_cumprod, t, weighting)
    grad = sds_gradient(eps_pred, noise, weight)
    return SDSStep(sds_loss(latents, grad, b), grad.norm(), t, noise, eps_pred, weight, grad)


# ----------------------------------------------------------------------------------------------------------------------
# helpers


def _per_sample(values: Tensor, like: Tensor) -> Tensor:
    """Reshape ``[B]`` to ``[B, 1, …, 1]`` to broadcast against ``like``."""
    return values.reshape(-1, *([1] * (like.dim() - 1))).to(like.device)


def _check_percent(name: str, value: float):
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"timestep_range: {name}={value} must be in [0, 1] (a fraction of the training timesteps)")
