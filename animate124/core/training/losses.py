"""The system's own loss terms: plain tensor functions, and :data:`LOSSES`, the one table of them.

Shapes follow the renderer's outputs: images ``[B, H, W, C]``, opacity / depth / masks ``[B, H, W, 1]``. Every
function returns a 0-d tensor that keeps the gradient of its inputs. The guidance (SDS) terms are not here: they come
from the guidance slots.

The table
---------
Each :class:`OwnLoss` entry of :data:`LOSSES` is read by the step plan (which render the term needs, when it runs,
which stages may weigh it: :mod:`animate124.core.training.step_plan`), the system (it computes the planned entries and
logs each as ``train/loss_<name>``) and the preflight (the names a ``loss_weights`` key may take). An entry holds:

* ``name``: its key in ``stages[i].loss_weights`` (a weight of 0, or none: the term is not computed);
* ``view``: where the term is computed, one of :data:`VIEWS`:

  - ``reference``: the reference view at t = 0, on anchoring steps (video stages: clips from t = 0; image-only
    stages: every ``system.static_ref_interval`` steps);
  - ``main``: the stage's main render, every step (the clip in video stages, the random view in image-only stages);
  - ``image_stage``: the random view of image-only stages, every step (a stage that renders video rejects the weight);
  - ``field``: no render; the term reads the field itself (``inputs.geometry``), every step;

* ``normals``: the render must carry normals (``comp_normal``), which cost a second pass through the field;
* ``needs_ref_depth``: the data must have a reference depth (``data.depth_path``); without one the weight is rejected;
* ``trains``: the one parameter group (:data:`animate124.core.training.stages.PARAM_GROUPS`) the term reaches, if
  it reaches only one; a stage that does not train that group rejects the weight;
* ``compute``: :class:`LossInputs` -> the 0-d term.

The planned terms add up after the guidance slots' terms, in table order: loss = sum_i w_i * L_i.

Adding a loss
-------------
1. Write the function (tensors in, 0-d tensor out) here, with a test in ``tests/unit/test_losses.py`` against values
   worked out by hand.
2. Add one :class:`OwnLoss` entry to :data:`LOSSES`. Nothing else changes: ``stages[i].loss_weights`` accepts the
   name (and rejects it, at configure time, in stages where it can never run), the step plan renders its view (with
   normals if asked), the system computes it and logs ``train/loss_<name>`` and ``train_params/lambda_<name>``.
3. If it has a setting, add a field to the system's Config (``components/system.py``) and read it as
   ``inputs.settings.<field>``.

For example, an L1 alternative to ``mask`` on the reference view::

    def mask_l1(opacity: Float[Tensor, "B H W 1"], mask: Mask) -> Float[Tensor, ""]:
        # mean |opacity - mask| over the reference view's pixels
        return (opacity.float() - mask.float()).abs().mean()

    # in LOSSES:
    OwnLoss("mask_l1", "reference", lambda x: mask_l1(x.out["opacity"], x.batch["mask"])),

    # in a config: stages[i].loss_weights: {mask_l1: 100.0}
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
from jaxtyping import Bool, Float
from torch import Tensor

Mask = Bool[Tensor, "B H W 1"] | Float[Tensor, "B H W 1"]

__all__ = ["rgb_mse", "mask_bce", "depth_pearson", "normal_smoothness_2d", "sparsity", "opaque", "LossInputs",
           "OwnLoss", "LOSSES", "VIEWS"]

VIEWS = ("reference", "main", "image_stage", "field")


def rgb_mse(rgb: Float[Tensor, "B H W 3"], ref_rgb: Float[Tensor, "B H W 3"], mask: Mask,
            bg_rgb: Float[Tensor, "B H W 3"]) -> Float[Tensor, ""]:
    """Mean squared error against the reference composited on the rendered background: target = ref * m + bg * (1 - m).

    Args:
        rgb: rendered colour [B, H, W, 3]; ref_rgb: reference colour [B, H, W, 3]; mask: [B, H, W, 1] (bool or 0/1);
        bg_rgb: the renderer's background colour [B, H, W, 3] (gives no gradient through the target's background).
    """
    m = mask.float()
    return (rgb - (ref_rgb * m + bg_rgb * (1.0 - m))).square().mean()


def mask_bce(opacity: Float[Tensor, "B H W 1"], mask: Mask, clamp: float = 1e-5) -> Float[Tensor, ""]:
    """Binary cross-entropy of the opacity against the reference mask, opacity clamped to [clamp, 1 - clamp], in fp32.

    Written out instead of ``F.binary_cross_entropy``, which CUDA autocast (16-mixed) refuses.
    """
    p = opacity.float().clamp(clamp, 1.0 - clamp)
    m = mask.float()
    return -(m * p.log() + (1.0 - m) * (1.0 - p).log()).mean()


def depth_pearson(depth: Float[Tensor, "B H W 1"], ref_depth: Float[Tensor, "B H W 1"], mask: Mask) -> Float[Tensor, ""]:
    """(1 - Pearson correlation) / 2 between rendered depth and 1 - reference depth, over the mask's pixels.

    The reference is relative depth with larger = nearer (as ``animate124 preprocess`` writes it); rendered depth is
    larger = farther, hence ``1 - ref``. 0 = perfectly correlated, 0.5 = uncorrelated, 1 = anti-correlated. Fewer than
    two masked pixels give 0 (with a graph, so the step still back-propagates).
    """
    m = mask[..., 0].bool()
    pred = depth[..., 0][m]
    target = (1.0 - ref_depth[..., 0])[m]
    if pred.numel() < 2:
        return depth.sum() * 0.0
    pred, target = pred - pred.mean(), target - target.mean()
    corr = (pred * target).sum() / (pred.norm() * target.norm() + 1e-8)
    return (1.0 - corr) / 2.0


def normal_smoothness_2d(normal: Float[Tensor, "B H W 3"]) -> Float[Tensor, ""]:
    """Screen-space normal smoothness: mean((N[:, 1:] - N[:, :-1])^2) + mean((N[:, :, 1:] - N[:, :, :-1])^2).

    Args:
        normal: rendered normals [B, H, W, 3] (the renderer's ``comp_normal``).
    """
    return (normal[:, 1:] - normal[:, :-1]).square().mean() + (normal[:, :, 1:] - normal[:, :, :-1]).square().mean()


def sparsity(opacity: Float[Tensor, "B H W 1"]) -> Float[Tensor, ""]:
    """Charbonnier-style sparsity: mean(sqrt(opacity^2 + 0.01)); pushes empty pixels to zero opacity."""
    return (opacity.square() + 0.01).sqrt().mean()


def opaque(opacity: Float[Tensor, "B H W 1"], clamp: float = 1e-3) -> Float[Tensor, ""]:
    """Entropy of the opacity (BCE of the clamped opacity against itself): pushes pixels to fully on or off."""
    p = opacity.float().clamp(clamp, 1.0 - clamp)
    return -(p * p.log() + (1.0 - p) * (1.0 - p).log()).mean()


@dataclass(frozen=True)
class LossInputs:
    """What a loss's ``compute`` reads.

    Attributes:
        out: the renderer's outputs on the term's view (None for ``field`` terms).
        batch: that view's part of the training batch (``rgb``, ``mask``, ``ref_depth`` on the reference view).
        geometry: the field being trained (``field`` terms).
        settings: the system's config (a loss's own settings are fields of it).
        generator: the system's random stream (seeded from the run's seed, saved in checkpoints).
    """

    out: Optional[dict] = None
    batch: Optional[dict] = None
    geometry: Any = None
    settings: Any = None
    generator: Optional[torch.Generator] = None


@dataclass(frozen=True)
class OwnLoss:
    """One own loss term (module docstring: the table)."""

    name: str
    view: str
    compute: Callable[[LossInputs], Float[Tensor, ""]]
    normals: bool = False
    needs_ref_depth: bool = False
    trains: Optional[str] = None

    def __post_init__(self) -> None:
        if self.view not in VIEWS:
            raise ValueError(f"OwnLoss {self.name!r}: view={self.view!r} is not one of {list(VIEWS)}")
        if self.view == "field" and self.normals:
            raise ValueError(f"OwnLoss {self.name!r}: a field term has no render to carry normals")


def _normal_smoothness_term(x: LossInputs) -> Float[Tensor, ""]:
    normal, mask = x.out["comp_normal"], x.out.get("normal_frame_mask")
    return normal_smoothness_2d(normal if mask is None else normal[mask])  # the renderer's normal_frames: those only


def _time_smoothness_term(x: LossInputs) -> Float[Tensor, ""]:
    return x.geometry.time_smoothness_loss(x.settings.time_smoothness_points, x.settings.time_smoothness_dt,
                                           generator=x.generator)


def _table(*entries: OwnLoss) -> dict[str, OwnLoss]:
    table = {entry.name: entry for entry in entries}
    if len(table) != len(entries):
        raise ValueError(f"LOSSES: duplicate names in {[e.name for e in entries]}")
    return table


# name -> entry, in the order the terms add up
LOSSES: dict[str, OwnLoss] = _table(
    OwnLoss("normal_smoothness_2d", "main", _normal_smoothness_term, normals=True),
    OwnLoss("sparsity", "image_stage", lambda x: sparsity(x.out["opacity"])),
    OwnLoss("opaque", "image_stage", lambda x: opaque(x.out["opacity"])),
    OwnLoss("rgb", "reference",
            lambda x: rgb_mse(x.out["comp_rgb"], x.batch["rgb"], x.batch["mask"], x.out["comp_rgb_bg"])),
    OwnLoss("mask", "reference", lambda x: mask_bce(x.out["opacity"], x.batch["mask"])),
    OwnLoss("depth", "reference", lambda x: depth_pearson(x.out["depth"], x.batch["ref_depth"], x.batch["mask"]),
            needs_ref_depth=True),
    OwnLoss("time_smoothness", "field", _time_smoothness_term, trains="field_4d"),
)
