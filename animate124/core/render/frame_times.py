"""Frame times of a training clip and of evaluation renders.

A training clip is F frames equally spaced on a lattice of P = ``precision`` steps over t in [0, 1]. The sampler is
the upstream Animate124 algorithm (identical in both upstream branches' clip collate):

1. ``start_from_zero`` = (U < ``zero_rate``).
2. span = floor(randint(F, P) / F) * F, randint inclusive at both ends; stride k = span / F.
   For F = 16, P = 256: k = 1..15 each with probability 16/241 and k = 16 with probability 1/241.
3. start = 0 if ``start_from_zero`` else randint(0, P - span) (inclusive).
4. times = (start + k * [0, 1, ..., F-1]) / P.
5. With probability ``mirror_prob``: t <- 1 - t, order reversed (times still increase), ``start_from_zero`` cleared.

So P(a clip flagged ``start_from_zero``) = zero_rate * (1 - mirror_prob) = 0.1 with the defaults; the system uses the
flag to add the reference-view and Zero123 losses at t = 0.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from jaxtyping import Float
from torch import Tensor

__all__ = ["FrameTimes", "sample_frame_times", "eval_times", "stride_probabilities"]


@dataclass(frozen=True)
class FrameTimes:
    """One sampled clip.

    Attributes:
        times: [T] increasing frame times in [0, 1], spaced ``stride / precision``.
        start_from_zero: True when the clip starts exactly at t = 0 and was not mirrored (upstream's anchoring flag).
        stride: k, the frame spacing in lattice steps (1 .. precision // num_frames).
        start: lattice index of the first frame before mirroring (0 .. precision - span).
        mirrored: whether step 5 (t <- 1 - t) was applied.
    """

    times: Float[Tensor, "T"]
    start_from_zero: bool
    stride: int
    start: int
    mirrored: bool


def sample_frame_times(
    num_frames: int = 16,
    precision: int = 256,
    zero_rate: float = 0.2,
    mirror_prob: float = 0.5,
    generator: Optional[torch.Generator] = None,
    device: Optional[torch.device | str] = None,
    dtype: torch.dtype = torch.float32,
) -> FrameTimes:
    """Draw the frame times of one training clip with the upstream algorithm (module docstring, steps 1-5).

    Args:
        num_frames: F >= 1, frames per clip (16 for ModelScope / ZeroScope).
        precision: P >= F, lattice steps over [0, 1] (upstream 256).
        zero_rate: probability in [0, 1] of forcing start = 0 (upstream 0.2).
        mirror_prob: probability in [0, 1] of the mirror t <- 1 - t (upstream 0.5).
        generator: CPU ``torch.Generator`` for every draw (the draws are scalars, so they always run on CPU).
        device, dtype: of the returned ``times`` (default CPU float32).

    Returns:
        ``FrameTimes`` with ``times`` [num_frames].
    """
    _check_sampler_args(num_frames, precision, zero_rate, mirror_prob)
    # 1. start-at-zero coin
    start_from_zero = _uniform(generator) < zero_rate
    # 2. span = floor(randint(F, P) / F) * F, both ends inclusive -> stride k = span / F
    draw = _randint(num_frames, precision + 1, generator)
    stride = draw // num_frames
    span = stride * num_frames
    # 3. start on the lattice so that start + span <= P
    start = 0 if start_from_zero else _randint(0, precision - span + 1, generator)
    # 4. lattice indices -> times (integers first, one division: exact k/P spacing)
    index = start + stride * torch.arange(num_frames, dtype=torch.float64)
    # 5. mirror: t <- 1 - t, reversed so times increase; upstream then clears the anchoring flag
    mirrored = _uniform(generator) < mirror_prob
    if mirrored:
        index = torch.flip(precision - index, dims=(0,))
        start_from_zero = False
    times = (index / precision).to(device=device, dtype=dtype)
    return FrameTimes(times=times, start_from_zero=start_from_zero, stride=stride, start=start, mirrored=mirrored)


def eval_times(
    num: int,
    t_start: float = 0.0,
    t_end: float = 1.0,
    endpoint: bool = True,
    device: Optional[torch.device | str] = None,
    dtype: torch.dtype = torch.float32,
) -> Float[Tensor, "T"]:
    """Evenly spaced evaluation times, like ``numpy.linspace``.

    ``endpoint=True`` gives linspace(t_start, t_end, num) (the 64-frame validation video uses linspace(0, 1, 64));
    ``endpoint=False`` drops t_end, i.e. t_start + (t_end - t_start) * k / num for k < num (upstream main's k / 64).
    """
    if num < 1:
        raise ValueError(f"eval_times: num={num} must be >= 1; pass the number of frames to render")
    if not 0.0 <= t_start <= 1.0 or not 0.0 <= t_end <= 1.0:
        raise ValueError(f"eval_times: t_start={t_start}, t_end={t_end} must lie in [0, 1]")
    if num == 1:
        return torch.full((1,), t_start, device=device, dtype=dtype)
    steps = num - 1 if endpoint else num
    k = torch.arange(num, dtype=torch.float64)
    return (t_start + (t_end - t_start) * k / steps).to(device=device, dtype=dtype)


def stride_probabilities(num_frames: int = 16, precision: int = 256) -> dict[int, float]:
    """Exact distribution of the stride k drawn in step 2: {k: P(k)} (for tests and documentation)."""
    _check_sampler_args(num_frames, precision, 0.0, 0.0)
    n_draws = precision - num_frames + 1
    counts: dict[int, int] = {}
    for draw in range(num_frames, precision + 1):
        counts[draw // num_frames] = counts.get(draw // num_frames, 0) + 1
    return {k: c / n_draws for k, c in sorted(counts.items())}


# every draw of the sampler goes through these two (a test replaces them to enumerate every outcome)
def _uniform(generator: Optional[torch.Generator]) -> float:
    """U in [0, 1)."""
    return float(torch.rand((1,), generator=generator, dtype=torch.float64).item())


def _randint(low: int, high: int, generator: Optional[torch.Generator]) -> int:
    """An integer in [low, high), uniform."""
    return int(torch.randint(low, high, (1,), generator=generator).item())


def _check_sampler_args(num_frames: int, precision: int, zero_rate: float, mirror_prob: float) -> None:
    if num_frames < 1:
        raise ValueError(f"num_frames={num_frames} must be >= 1")
    if precision < num_frames:
        raise ValueError(f"precision={precision} must be >= num_frames={num_frames}; upstream uses 256")
    for name, p in (("zero_rate", zero_rate), ("mirror_prob", mirror_prob)):
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"{name}={p} must be a probability in [0, 1]")
