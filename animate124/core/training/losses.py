"""The system's own loss terms, as plain tensor functions (renders in, scalar out).

Shapes follow the renderer's outputs: images ``[B, H, W, C]``, opacity / depth / masks ``[B, H, W, 1]``. Every
function returns a 0-d tensor that keeps the gradient of its render inputs. The guidance (SDS) terms are not here:
they come from the guidance modules.
"""
from __future__ import annotations

from jaxtyping import Bool, Float
from torch import Tensor

Mask = Bool[Tensor, "B H W 1"] | Float[Tensor, "B H W 1"]

__all__ = ["rgb_mse", "mask_bce", "depth_pearson", "normal_smoothness_2d", "sparsity", "opaque", "render_term"]


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


def render_term(name: str, out: dict, view_batch: dict) -> Float[Tensor, ""]:
    """The system's own loss ``name`` on one render ``out`` (renderer outputs) of ``view_batch`` (its batch):
    rgb, mask, depth (reference view), normal_smoothness_2d, sparsity, opaque."""
    if name == "rgb":
        return rgb_mse(out["comp_rgb"], view_batch["rgb"], view_batch["mask"], out["comp_rgb_bg"])
    if name == "mask":
        return mask_bce(out["opacity"], view_batch["mask"])
    if name == "depth":
        return depth_pearson(out["depth"], view_batch["ref_depth"], view_batch["mask"])
    if name == "normal_smoothness_2d":  # on the images that got normals (the renderer's normal_frames)
        mask = out.get("normal_frame_mask")
        return normal_smoothness_2d(out["comp_normal"] if mask is None else out["comp_normal"][mask])
    if name in ("sparsity", "opaque"):
        return sparsity(out["opacity"]) if name == "sparsity" else opaque(out["opacity"])
    raise ValueError(f"render_term: unknown term {name!r}; one of rgb, mask, depth, normal_smoothness_2d, sparsity, opaque")
