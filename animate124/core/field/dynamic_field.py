"""4D radiance field: a static 3-D hash grid plus an additive 4-D (x, t) hash grid, then density and feature MLPs.

As the upstream threestudio branch's ``HashGridSpatialTime`` + ``implicit-volume``, with time as a per-sample
tensor instead of a mutable attribute (so a clip renders in one call):

    h(x, t) = enc(x01) + enc_t([x01, t]),            x01 = (x + r) / (2 r)  (world bbox [-r, r]^3 -> [0, 1]^3)
    sigma   = act(density_mlp(h) + bias(x))          act: softplus | exp | trunc_exp;  bias: blob / none / constant
    feat    = feature_mlp(h)                         raw (the host material applies e.g. a sigmoid: features_to_rgb)

``enc_t`` starts as U(-1e-4, 1e-4) (tiny-cuda-nn's init), so a fresh dynamic field equals the static one up to
~1e-4 in the features. Both grids share one level configuration (the time axis uses the same per-level resolutions).
The MLPs run in float32 with autocast disabled (as threestudio's VanillaMLP).

State-dict keys: ``encoding.embeddings``, ``encoding_time.embeddings``, ``density_network.layers.{0,2,..}.weight``,
``feature_network.layers.{0,2,..}.weight`` (a static-stage checkpoint lacks only ``encoding_time``).
"""


from typing import Literal, Optional, Union

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from jaxtyping import Float
from torch import Tensor, nn

from animate124.core.field.grid_levels import MERGE_RUNS_MAX_RES
from animate124.core.field.hashgrid import HashGridEncoding
from animate124.core.field.work_counters import count

__all__ = ["DynamicField", "VanillaMLP", "trunc_exp", "features_to_rgb", "DENSITY_ACTIVATIONS", "DENSITY_BIASES"]

DensityActivation = Literal["softplus", "exp", "trunc_exp"]
DensityBias = Union[Literal["blob_magic3d", "blob_dreamfusion", "none"], float]
DENSITY_ACTIVATIONS = ("softplus", "exp", "trunc_exp")
DENSITY_BIASES = ("blob_magic3d", "blob_dreamfusion", "none")


class DynamicField(nn.Module):
    """Static + additive temporal hash-grid field (see the module docstring).

    Args:
        radius: half-size r of the world bbox [-r, r]^3 (threestudio ``radius``).
        n_feature_dims: C, raw feature channels (3 for an RGB albedo).
        n_levels, n_features_per_level, log2_hashmap_size, base_resolution, per_level_scale, implementation:
            the level configuration of BOTH hash grids (threestudio branch: 16, 2, 19, 16, 1.4472692, tcnn).
        time_init_scale: the 4-D grid starts as U(-s, s); 0 gives a field exactly independent of t.
        mlp_hidden: width of the MLP hidden layers (threestudio ``n_neurons`` 64).
        mlp_hidden_layers: number of hidden layers (threestudio ``n_hidden_layers`` 1 -> Linear, ReLU, Linear).
        density_activation: ``"softplus"`` (threestudio default), ``"exp"``, or ``"trunc_exp"`` (exp whose backward
            clamps its input at 15, as torch-ngp).
        density_bias: ``"blob_magic3d"`` scale * (1 - |x| / std), ``"blob_dreamfusion"`` scale * exp(-|x|^2 / (2
            std^2)), ``"none"``, or a float added before the activation. |x| in world units.
        density_blob_scale, density_blob_std: blob parameters (threestudio defaults 10, 0.5).
        normal_eps: finite-difference step (world units) for normals (threestudio 0.01).
        normal_difference: ``"central"`` (6 extra density queries per point, upstream Animate124's
            ``finite_difference``) or ``"forward"`` (3, reusing the point's own density: threestudio's
            ``finite_difference``; error O(eps) instead of O(eps^2), about half the normals' field work).
        normal_checkpoint: keep nothing of the normals' density queries for the backward and run them again there,
            N queries at a time: the same values and gradients, without their grid and MLP activations (6 of a
            sample's 7 field evaluations with central differences) and with a backward that handles N queries at once
            instead of 6 N, for one more forward of those queries.
        normal_fused: with ``normal_checkpoint``, the k offset queries of all points as one batched query with its
            own backward (``_OffsetDensities``): a point's k queries follow each other (the grids' backward merges
            their shared coarse cells), the backward runs the grids' backward kernels on the stored or recomputed
            grid features without building a graph for them, and the gradients are those of the plain evaluation up
            to float summation order. False: one ``torch.utils.checkpoint`` per offset.
        normal_keep_features_gb: with ``normal_fused``, keep up to this many GiB of the offset queries' grid features
            (128 bytes per query with the default grids) for the backward instead of computing them again there;
            queries beyond it are recomputed. 0: recompute all (the least memory).
        merge_runs_max_res: both grids' Triton backward sums runs of consecutive samples with the same table row
            at levels of resolution <= this before its atomic add (``HashGridEncoding``); 0: off.
        generator: optional CPU generator for all initialisations (grids and MLPs).
    """

    def __init__(
        self,
        *,
        radius: float = 1.0,
        n_feature_dims: int = 3,
        n_levels: int = 16,
        n_features_per_level: int = 2,
        log2_hashmap_size: int = 19,
        base_resolution: int = 16,
        per_level_scale: float = 1.447269237440378,
        implementation: Literal["auto", "torch", "triton", "tcnn"] = "auto",
        time_init_scale: float = 1e-4,
        mlp_hidden: int = 64,
        mlp_hidden_layers: int = 1,
        density_activation: DensityActivation = "softplus",
        density_bias: DensityBias = "blob_magic3d",
        density_blob_scale: float = 10.0,
        density_blob_std: float = 0.5,
        normal_eps: float = 0.01,
        normal_difference: str = "central",
        normal_checkpoint: bool = False,
        normal_fused: bool = True,
        normal_keep_features_gb: float = 0.0,
        merge_runs_max_res: int = MERGE_RUNS_MAX_RES,
        generator: Optional[torch.Generator] = None,
    ) -> None:
        super().__init__()
        _check_config(radius, n_feature_dims, density_activation, density_bias, density_blob_std, normal_eps,
                      time_init_scale)
        self.radius = float(radius)
        self.n_feature_dims = int(n_feature_dims)
        self.density_activation = density_activation
        self.density_bias = density_bias
        self.density_blob_scale = float(density_blob_scale)
        self.density_blob_std = float(density_blob_std)
        self.normal_eps = float(normal_eps)
        if normal_difference not in ("central", "forward"):
            raise ValueError(f"normal_difference must be 'central' or 'forward'; got {normal_difference!r}.")
        self.normal_difference = normal_difference
        self.normal_checkpoint = bool(normal_checkpoint)
        self.normal_fused = bool(normal_fused)
        if not normal_keep_features_gb >= 0:
            raise ValueError(f"normal_keep_features_gb must be >= 0 (0: recompute all); got {normal_keep_features_gb}.")
        self.normal_keep_features_gb = float(normal_keep_features_gb)
        grid = dict(n_levels=n_levels, n_features_per_level=n_features_per_level, log2_hashmap_size=log2_hashmap_size,
                    base_resolution=base_resolution, per_level_scale=per_level_scale, implementation=implementation,
                    merge_runs_max_res=merge_runs_max_res)
        self.encoding = HashGridEncoding(3, **grid, generator=generator)
        self.encoding_time = HashGridEncoding(4, **grid, init_scale=time_init_scale, generator=generator)
        if time_init_scale == 0.0:
            with torch.no_grad():
                self.encoding_time.embeddings.zero_()
        n_enc = self.encoding.n_output_dims
        self.density_network = VanillaMLP(n_enc, 1, mlp_hidden, mlp_hidden_layers, generator)
        self.feature_network = VanillaMLP(n_enc, self.n_feature_dims, mlp_hidden, mlp_hidden_layers, generator)

    # --- coarse-to-fine ------------------------------------------------------------------------------------------------

    @property
    def n_active_levels(self) -> int:
        return self.encoding.n_active_levels

    @n_active_levels.setter
    def n_active_levels(self, value: int) -> None:
        """Coarse-to-fine: mask the same finest levels in both grids."""
        self.encoding.n_active_levels = value
        self.encoding_time.n_active_levels = value

    # --- evaluation --------------------------------------------------------------------------------------------------

    def encode(self, points: Float[Tensor, "N 3"], times: Float[Tensor, " N"]) -> Float[Tensor, "N E"]:
        """h = enc(x01) + enc_t([x01, t]): the summed grid features, ``[N, L * F]`` float32."""
        _check_points_times(points, times)
        x01, xt = self._grid_inputs(points, times)
        return self.encoding(x01) + self.encoding_time(xt)

    def _grid_inputs(self, points: Tensor, times: Tensor) -> tuple[Tensor, Tensor]:
        """The 3-D grid's input in [0, 1]^3 and the 4-D grid's (with the time appended)."""
        x01 = (points.float() + self.radius) / (2.0 * self.radius)
        return x01, torch.cat([x01, times.float().reshape(-1, 1)], dim=-1)

    def forward_density(self, points: Float[Tensor, "N 3"], times: Float[Tensor, " N"]) -> Float[Tensor, "N 1"]:
        """Post-activation density sigma >= 0 at each point at its own time."""
        h = self.encode(points, times)
        return self._activate(self._mlp(self.density_network, h), points)

    def forward(
        self, points: Float[Tensor, "N 3"], times: Float[Tensor, " N"], output_normal: bool = False
    ) -> dict[str, Tensor]:
        """Density ``[N,1]``, raw features ``[N,C]`` and, with ``output_normal``, normals ``[N,3]``.

        Normals are finite differences of the density (``normal_difference``: central, 6 extra density queries per
        point, or forward, 3; offsets clamped to the bbox as threestudio's): ``n = normalize(-grad sigma)``, pointing
        out of dense regions.
        """
        h = self.encode(points, times)
        out = {
            "density": self._activate(self._mlp(self.density_network, h), points),
            "features": self._mlp(self.feature_network, h),
        }
        if output_normal:
            out["normal"] = self._finite_difference_normal(points, times, out["density"])
        return out

    def normal(self, points: Float[Tensor, "N 3"], times: Float[Tensor, " N"],
               density: Optional[Float[Tensor, "N 1"]] = None) -> Float[Tensor, "N 3"]:
        """The normals of :meth:`forward` alone; ``density``: the points' own density, which forward differences
        reuse (queried again when omitted; central differences do not need it)."""
        if density is None and self.normal_difference == "forward":
            density = self.forward_density(points, times)
        return self._finite_difference_normal(points, times, density)

    # --- regulariser -------------------------------------------------------------------------------------------------

    def time_smoothness_loss(
        self, n_points: int = 4096, dt: float = 1.0 / 16, generator: Optional[torch.Generator] = None
    ) -> Float[Tensor, ""]:
        """Squared time derivative of the 4-D grid, by finite differences at random points and times.

            L = mean_{x, t, c} ((enc_t([x, t + dt])_c - enc_t([x, t])_c) / dt)^2,
            x ~ U([0, 1]^3) (the whole bbox, contracted), t ~ U(0, 1 - dt), c over the L * F channels.

        Zero exactly when enc_t does not vary along t. Only ``encoding_time`` gets a gradient (the static grid and
        the MLPs are not used). Relation to the ``main`` branch's time-TV (weight 0.1 over K = 64 time grids, i.e.
        dt = 1/63, summed over F = 2 channels per level): main_tv ~= F * dt^2 * L, so weight 0.1 there ~= 0.1 * 2 /
        63^2 ~= 5e-5 here. The caller applies the weight.
        """
        if not 0.0 < dt < 1.0:
            raise ValueError(f"dt must be in (0, 1); got {dt}.")
        device = self.encoding_time.embeddings.device
        x = torch.rand(n_points, 3, generator=generator, device=device)
        t = torch.rand(n_points, 1, generator=generator, device=device) * (1.0 - dt)
        diff = self.encoding_time(torch.cat([x, t + dt], dim=-1)) - self.encoding_time(torch.cat([x, t], dim=-1))
        return (diff / dt).square().mean()

    # --- helpers -----------------------------------------------------------------------------------------------------

    @staticmethod
    def _mlp(net: nn.Module, h: Tensor) -> Tensor:
        with torch.autocast(device_type=h.device.type, enabled=False):
            return net(h.float())

    def _activate(self, raw: Tensor, points: Tensor) -> Tensor:
        raw = raw + self._bias(points.float())
        if self.density_activation == "softplus":
            return F.softplus(raw)
        if self.density_activation == "exp":
            return torch.exp(raw)
        return trunc_exp(raw)

    def _bias(self, points: Tensor) -> Union[Tensor, float]:
        if self.density_bias == "blob_magic3d":
            return self.density_blob_scale * (1.0 - points.norm(dim=-1, keepdim=True) / self.density_blob_std)
        if self.density_bias == "blob_dreamfusion":
            sq = points.square().sum(dim=-1, keepdim=True)
            return self.density_blob_scale * torch.exp(-0.5 * sq / self.density_blob_std**2)
        if self.density_bias == "none":
            return 0.0
        return float(self.density_bias)

    def _offset_density(self, points: Tensor, times: Tensor, offset: Tensor) -> Tensor:
        return self.forward_density((points.float() + offset).clamp(-self.radius, self.radius), times.float())

    def _finite_difference_normal(self, points: Tensor, times: Tensor, density: Optional[Tensor]) -> Tensor:
        eps = self.normal_eps
        forward = self.normal_difference == "forward"
        steps = [[eps, 0, 0], [0, eps, 0], [0, 0, eps]] if forward else [
            [eps, 0, 0], [-eps, 0, 0], [0, eps, 0], [0, -eps, 0], [0, 0, eps], [0, 0, -eps]]
        offsets = torch.tensor(steps, device=points.device, dtype=torch.float32)
        k = offsets.shape[0]
        count("normal_samples", points.shape[0])
        count("normal_queries", k * points.shape[0])
        params = self._offset_params()
        if (self.normal_checkpoint and self.normal_fused and torch.is_grad_enabled() and not points.requires_grad
                and any(p.requires_grad for p in params)):
            sigma = _OffsetDensities.apply(points.float(), times.float(), offsets, self, *params)
        elif self.normal_checkpoint and torch.is_grad_enabled():
            # one offset at a time, so the backward re-runs N queries at once, not k * N: the peak is there
            sigma = torch.cat([
                torch.utils.checkpoint.checkpoint(self._offset_density, points, times, offsets[i], use_reentrant=False)
                for i in range(k)], dim=-1)
        else:
            shifted = (points.float()[:, None, :] + offsets).clamp(-self.radius, self.radius).reshape(-1, 3)
            sigma = self.forward_density(shifted, times.float().repeat_interleave(k)).view(-1, k)
        if forward:
            grad = (sigma - density.float().reshape(-1, 1)) / eps
        else:
            grad = 0.5 * (sigma[:, 0::2] - sigma[:, 1::2]) / eps
        return F.normalize(-grad, dim=-1)


    def _offset_params(self) -> list[Tensor]:
        """What a density query depends on: both grids' tables, then the density MLP's weights in layer order."""
        return [self.encoding.embeddings, self.encoding_time.embeddings,
                *(m.weight for m in self.density_network.layers if isinstance(m, nn.Linear))]

    def _offset_queries(self, points: Tensor, times: Tensor, offsets: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """The k offset queries of each point, point-major (``[M * k]`` rows): shifted points (clamped to the bbox)
        and both grids' inputs."""
        k = offsets.shape[0]
        shifted = (points[:, None, :] + offsets).clamp(-self.radius, self.radius).reshape(-1, 3)
        return (shifted, *self._grid_inputs(shifted, times.repeat_interleave(k)))


class _OffsetDensities(torch.autograd.Function):
    """``sigma(clamp(x_i + o_j))`` ``[N, k]`` for the k normal offsets ``o_j``, without gradient graph; the backward
    computes the same gradients as autograd through the plain evaluation (up to summation order), N queries at a
    time: the grids' features (kept, or computed again without graph), the density MLP again under autograd from
    them, then each grid's backward kernel on the features' gradient (``HashGridEncoding.embedding_grad``).
    Inputs: points [N, 3], times [N] (no gradient to either), offsets [k, 3], the field, then its
    ``_offset_params()``."""

    @staticmethod
    def forward(ctx, points, times, offsets, field, *params):
        n, k = points.shape[0], offsets.shape[0]
        chunk = max(1, -(-n // k))  # points per piece: k pieces of ~N queries each, as one offset at a time had
        sigma = points.new_empty(n, k)
        kept, budget = [], field.normal_keep_features_gb * 2**30
        for start in range(0, n, chunk):
            shifted, x01, xt = field._offset_queries(points[start:start + chunk], times[start:start + chunk], offsets)
            h = field.encoding(x01) + field.encoding_time(xt)
            sigma[start:start + chunk] = field._activate(field._mlp(field.density_network, h), shifted).view(-1, k)
            size = h.numel() * h.element_size()
            kept.append(h if size <= budget else None)
            budget -= size if size <= budget else 0
        ctx.field, ctx.chunk, ctx.kept = field, chunk, kept
        ctx.save_for_backward(points, times, offsets)
        return sigma

    @staticmethod
    def backward(ctx, grad_sigma):
        points, times, offsets = ctx.saved_tensors
        field, chunk, kept = ctx.field, ctx.chunk, ctx.kept
        needs = ctx.needs_input_grad[4:]
        grids = (field.encoding, field.encoding_time)  # the tables' gradients come first in `needs` and `grads`
        weights = [p.detach() for p in field._offset_params()[2:]]
        grads = [torch.zeros_like(p) if need else None for p, need in zip(field._offset_params(), needs)]
        for piece, start in enumerate(range(0, points.shape[0], chunk)):
            shifted, x01, xt = field._offset_queries(points[start:start + chunk], times[start:start + chunk], offsets)
            h = kept[piece]
            # off CUDA the grids have no backward kernel to run alone: their forward is run again under autograd
            graphed = h is None and field.encoding._backend(x01) != "triton"
            with torch.enable_grad(), torch.autocast(device_type=points.device.type, enabled=False):
                if h is None:
                    with torch.set_grad_enabled(graphed):
                        h = field.encoding(x01) + field.encoding_time(xt)
                if not graphed:
                    h = h.detach().requires_grad_(True)
                ws = [w.requires_grad_(need) for w, need in zip(weights, needs[2:])]
                sigma = field._activate(_mlp_with(ws, h), shifted)
                tables = [p for p, need in zip(field._offset_params()[:2], needs) if need and graphed]
                wanted = ([] if graphed else [h]) + tables + [w for w in ws if w.requires_grad]
                d = list(torch.autograd.grad(sigma, wanted, grad_sigma[start:start + chunk].reshape(-1, 1)))
            dh = None if graphed else d.pop(0)
            for i, need in enumerate(needs):
                if not need:
                    continue
                if i >= 2 or graphed:
                    grads[i] += d.pop(0)
                else:
                    grids[i].embedding_grad((x01, xt)[i], dh, out=grads[i])
        ctx.kept = None
        return (None, None, None, None, *grads)


def _mlp_with(weights: list[Tensor], h: Tensor) -> Tensor:
    """``VanillaMLP`` with the given weights (Linear without bias, ReLU between), float32."""
    for i, w in enumerate(weights):
        h = F.linear(h, w)
        if i < len(weights) - 1:
            h = F.relu(h)
    return h


class VanillaMLP(nn.Module):
    """threestudio's VanillaMLP: Linear(in, h, no bias), ReLU, [Linear(h, h, no bias), ReLU] * (k - 1),
    Linear(h, out, no bias). Keys ``layers.{0,2,...}.weight``. Default PyTorch (Kaiming-uniform) init."""

    def __init__(self, n_in: int, n_out: int, hidden: int = 64, hidden_layers: int = 1,
                 generator: Optional[torch.Generator] = None) -> None:
        super().__init__()
        if hidden < 1 or hidden_layers < 1:
            raise ValueError(f"mlp_hidden and mlp_hidden_layers must be >= 1; got {hidden}, {hidden_layers}.")
        dims = [n_in] + [hidden] * hidden_layers
        layers: list[nn.Module] = []
        for a, b in zip(dims[:-1], dims[1:]):
            layers += [nn.Linear(a, b, bias=False), nn.ReLU(inplace=True)]
        layers.append(nn.Linear(dims[-1], n_out, bias=False))
        self.layers = nn.Sequential(*layers)
        if generator is not None:
            with torch.no_grad():
                for layer in self.layers:
                    if isinstance(layer, nn.Linear):
                        bound = 1.0 / layer.in_features**0.5  # = kaiming_uniform(a=sqrt(5)) bound, torch's default
                        layer.weight.uniform_(-bound, bound, generator=generator)

    def forward(self, h: Float[Tensor, "N E"]) -> Float[Tensor, "N O"]:
        return self.layers(h)


def features_to_rgb(features: Float[Tensor, "N C"]) -> Float[Tensor, "N C"]:
    """Raw features -> colour in [0, 1] (threestudio ``no-material`` with sigmoid colour activation)."""
    return torch.sigmoid(features)


class _TruncExp(torch.autograd.Function):
    """exp(x) whose backward uses exp(min(x, 15)) (torch-ngp), so huge densities do not blow up gradients."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        ctx.save_for_backward(x)
        return torch.exp(x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        (x,) = ctx.saved_tensors
        return grad * torch.exp(x.clamp(max=15.0))


def trunc_exp(x: Tensor) -> Tensor:
    """exp with a backward clamped at input 15 (see :class:`_TruncExp`)."""
    return _TruncExp.apply(x.float())


def _check_config(radius, n_feature_dims, density_activation, density_bias, blob_std, normal_eps, time_init) -> None:
    if not radius > 0:
        raise ValueError(f"radius must be > 0; got {radius}.")
    if int(n_feature_dims) < 1:
        raise ValueError(f"n_feature_dims must be >= 1; got {n_feature_dims}.")
    if density_activation not in DENSITY_ACTIVATIONS:
        raise ValueError(f"density_activation must be one of {DENSITY_ACTIVATIONS}; got {density_activation!r}.")
    if isinstance(density_bias, bool) or not (
        density_bias in DENSITY_BIASES or isinstance(density_bias, (int, float))
    ):
        raise ValueError(f"density_bias must be one of {DENSITY_BIASES} or a float; got {density_bias!r}.")
    if not blob_std > 0:
        raise ValueError(f"density_blob_std must be > 0; got {blob_std}.")
    if not normal_eps > 0:
        raise ValueError(f"normal_eps must be > 0; got {normal_eps}.")
    if time_init < 0:
        raise ValueError(f"time_init_scale must be >= 0; got {time_init}.")


def _check_points_times(points: Tensor, times: Tensor) -> None:
    if points.dim() != 2 or points.shape[-1] != 3:
        raise ValueError(
            f"points must be [N, 3] world coordinates; got {tuple(points.shape)}: use points.reshape(-1, 3)."
        )
    if times.shape != points.shape[:1]:
        raise ValueError(
            f"times must be [N] = [{points.shape[0]}], one frame time per point; got {tuple(times.shape)}: "
            "use times.expand(N) or repeat each frame's time."
        )
