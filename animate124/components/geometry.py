"""``a124-4d-volume``: the 4D field (static 3-D hash grid + additive 4-D grid) as a threestudio implicit geometry.

Time is a per-point argument (``times=``) filled by ``a124-time-volume-renderer``; host code that knows nothing about
time (``isosurface()``, the host's ``mesh-exporter``) sees the scene at ``export_time``. No tinycudann: the hash grids
are our own (torch / Triton), with tiny-cuda-nn's parameter layout so host checkpoints convert.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Union

import threestudio
import torch
from threestudio.models.geometry.base import BaseGeometry, BaseImplicitGeometry
from threestudio.utils.typing import Any, Dict, Float, Tensor, Tuple

from animate124.components.choices import check_choice
from animate124.core.field.dynamic_field import DynamicField


def _default_grid() -> dict:
    return {
        "n_levels": 16,
        "n_features_per_level": 2,
        "log2_hashmap_size": 19,
        "base_resolution": 16,
        "per_level_scale": 1.447269237440378,
        "implementation": "auto",
    }


_GRID_KEYS = ("n_levels", "n_features_per_level", "log2_hashmap_size", "base_resolution", "per_level_scale",
              "implementation", "merge_runs_max_res", "otype")


@threestudio.register("a124-4d-volume")
class TimeVolume(BaseImplicitGeometry):
    @dataclass
    class Config(BaseImplicitGeometry.Config):
        n_feature_dims: int = 3
        pos_encoding_config: dict = field(default_factory=_default_grid)
        """Level configuration shared by the 3-D and the 4-D grid (tiny-cuda-nn HashGrid keys; ``otype`` ignored;
        ``implementation``: auto | torch | triton | tcnn; ``merge_runs_max_res``: the Triton backward's coarse levels
        add a run of consecutive samples in one cell with one atomic, see animate124.core.field.hashgrid_triton)."""
        time_init_scale: float = 1e-4
        """The 4-D grid starts as U(-s, s): the dynamic model starts as the static one."""
        mlp_network_config: dict = field(default_factory=lambda: {"n_neurons": 64, "n_hidden_layers": 1})
        density_activation: str = "softplus"
        """softplus | exp | trunc_exp."""
        density_bias: Union[float, str] = "blob_magic3d"
        """blob_magic3d | blob_dreamfusion | none | a float added before the activation."""
        density_blob_scale: float = 10.0
        density_blob_std: float = 0.5
        normal_type: str = "finite_difference"
        """finite_difference: central differences, 6 extra density queries per sample (upstream Animate124's
        finite_difference; threestudio calls it finite_difference_laplacian, also accepted) | finite_difference_forward:
        3, reusing the sample's own density (threestudio's finite_difference; about half the normals' field work)."""
        finite_difference_normal_eps: float = 0.01
        normal_checkpoint: bool = True
        """Recompute the normals' density queries in the backward, about N queries at a time, instead of keeping
        their activations: the same values and gradients; on an H200 the default recipe's dynamic peak fell from 32.5
        to 12.8 GiB with no measurable change in step time (docs/memory.md). false: keep them."""
        normal_fused: bool = True
        """With normal_checkpoint: all offset queries as one batched query with its own backward (a sample's queries
        together, the grids' backward kernels run without a graph), the same gradients up to float summation order;
        false: one checkpointed query per offset."""
        normal_keep_features_gb: float = 0.0
        """With normal_fused: keep up to this many GiB of the offset queries' grid features (128 bytes a query) for
        the backward instead of computing the grids again there (the rest are recomputed). 0: recompute all."""
        isosurface_threshold: Union[float, str] = 25.0
        export_time: float = 0.0
        """Frame time seen by time-unaware host code (isosurface, host exporters)."""
        coarse_to_fine: Optional[list] = None
        """[n_levels_at_start, until_step]: only the coarsest levels are active (finer ones output 0) until that
        global step (upstream main masks the 8 finest of 16 levels for 3000 steps). None: all levels always."""

        def __post_init__(self) -> None:
            check_choice("a124-4d-volume", "density_activation", self.density_activation, ("softplus", "exp", "trunc_exp"))
            check_choice("a124-4d-volume", "normal_type", self.normal_type,
                         ("finite_difference", "finite_difference_laplacian", "finite_difference_forward"))

    cfg: Config

    def configure(self) -> None:
        super().configure()
        grid = {**_default_grid(), **self.cfg.pos_encoding_config}
        unknown = sorted(set(grid) - set(_GRID_KEYS))
        if unknown:
            raise ValueError(f"a124-4d-volume: unknown pos_encoding_config keys {unknown}; allowed: {list(_GRID_KEYS)}")
        grid.pop("otype", None)
        mlp = self.cfg.mlp_network_config
        self.field = DynamicField(
            radius=self.cfg.radius,
            n_feature_dims=self.cfg.n_feature_dims,
            time_init_scale=self.cfg.time_init_scale,
            mlp_hidden=int(mlp.get("n_neurons", 64)),
            mlp_hidden_layers=int(mlp.get("n_hidden_layers", 1)),
            density_activation=self.cfg.density_activation,
            density_bias=self.cfg.density_bias,
            density_blob_scale=self.cfg.density_blob_scale,
            density_blob_std=self.cfg.density_blob_std,
            normal_eps=self.cfg.finite_difference_normal_eps,
            normal_difference="forward" if self.cfg.normal_type == "finite_difference_forward" else "central",
            normal_checkpoint=self.cfg.normal_checkpoint,
            normal_fused=self.cfg.normal_fused,
            normal_keep_features_gb=self.cfg.normal_keep_features_gb,
            **grid,
        )

    def update_step(self, epoch: int, global_step: int, on_load_weights: bool = False) -> None:
        if self.cfg.coarse_to_fine is not None:
            start_levels, until_step = (int(v) for v in self.cfg.coarse_to_fine)
            full = self.field.encoding.n_levels
            self.field.n_active_levels = min(start_levels, full) if global_step < until_step else full

    # the parameter groups the system's stages refer to
    @property
    def encoding(self):
        return self.field.encoding

    @property
    def encoding_time(self):
        return self.field.encoding_time

    @property
    def density_network(self):
        return self.field.density_network

    @property
    def feature_network(self):
        return self.field.feature_network

    def _times(self, points: Tensor, times) -> Tensor:
        n = points.reshape(-1, 3).shape[0]
        if times is None:
            times = self.cfg.export_time
        t = torch.as_tensor(times, dtype=torch.float32, device=points.device).reshape(-1)
        if t.numel() == 1:
            return t.expand(n)
        if t.numel() != n:
            raise ValueError(f"times has {t.numel()} entries for {n} points: give one time per point or a scalar")
        return t

    def forward(self, points: Float[Tensor, "*N 3"], output_normal: bool = False, times=None) -> Dict[str, Tensor]:
        lead = points.shape[:-1]
        out = self.field(points.reshape(-1, 3), self._times(points, times), output_normal=output_normal)
        out = {k: v.reshape(*lead, v.shape[-1]) for k, v in out.items()}
        if "normal" in out:
            out["shading_normal"] = out["normal"]
        return out

    def forward_normal(self, points: Float[Tensor, "N 3"], times=None, density=None) -> Float[Tensor, "N 3"]:
        """The normals of ``forward(..., output_normal=True)`` alone (``density``: the points' own, for forward
        differences); the renderer asks for them on the samples that weigh only."""
        return self.field.normal(points.reshape(-1, 3), self._times(points, times),
                                 None if density is None else density.reshape(-1, 1))

    def forward_density(self, points: Float[Tensor, "*N 3"], times=None) -> Float[Tensor, "*N 1"]:
        lead = points.shape[:-1]
        return self.field.forward_density(points.reshape(-1, 3), self._times(points, times)).reshape(*lead, 1)

    def forward_field(self, points: Float[Tensor, "*N 3"], times=None) -> Tuple[Float[Tensor, "*N 1"], None]:
        return self.forward_density(points, times), None

    def forward_level(self, field: Float[Tensor, "*N 1"], threshold: float) -> Float[Tensor, "*N 1"]:
        return -(field - threshold)

    def export(self, points: Float[Tensor, "*N 3"], times=None, **kwargs) -> Dict[str, Any]:
        if self.cfg.n_feature_dims == 0:
            return {}
        return {"features": self.forward(points, times=times)["features"]}

    def time_smoothness_loss(self, n_points: int = 4096, dt: float = 1.0 / 16, generator=None) -> Tensor:
        return self.field.time_smoothness_loss(n_points=n_points, dt=dt, generator=generator)

    @staticmethod
    @torch.no_grad()
    def create_from(
        other: BaseGeometry, cfg: Optional[Union[dict, Any]] = None, copy_net: bool = True, **kwargs
    ) -> "TimeVolume":
        """From another ``a124-4d-volume`` (all weights, strictly) or the host's ``implicit-volume`` with a
        HashGrid / HashGridSpatialTime encoding of the same level configuration (grids and MLPs; the 4-D grid too
        when the host had one)."""
        instance = TimeVolume(cfg, **kwargs)
        if isinstance(other, TimeVolume):
            instance.field.load_state_dict(other.field.state_dict(), strict=True)
            return instance
        host = threestudio.find("implicit-volume")
        if not isinstance(other, host):
            raise TypeError(
                f"a124-4d-volume cannot be created from {other.__class__.__name__}: use a124-4d-volume or implicit-volume"
            )
        state = other.state_dict()
        grids = {"encoding.encoding.encoding.params": instance.field.encoding,
                 "encoding.encoding.encoding_time.params": instance.field.encoding_time}
        if "encoding.encoding.encoding.params" not in state:
            raise ValueError(
                "implicit-volume has no tiny-cuda-nn hash grid (encoding.encoding.encoding.params); only HashGrid / "
                "HashGridSpatialTime encodings convert to a124-4d-volume"
            )
        for key, grid in grids.items():
            if key not in state:
                continue
            params = state[key].float()
            if params.numel() != grid.embeddings.numel():
                raise ValueError(
                    f"{key} has {params.numel()} values but a124-4d-volume's grid has {grid.embeddings.numel()}: "
                    "use the same pos_encoding_config (n_levels, log2_hashmap_size, base_resolution, per_level_scale)"
                )
            grid.embeddings.copy_(params.view_as(grid.embeddings))
        nets = [("density_network", instance.field.density_network)]
        if copy_net and instance.cfg.n_feature_dims > 0 and other.cfg.n_feature_dims == instance.cfg.n_feature_dims:
            nets.append(("feature_network", instance.field.feature_network))
        for name, net in nets:
            sub = {k[len(name) + 1:]: v for k, v in state.items() if k.startswith(name + ".")}
            net.load_state_dict(sub, strict=True)
        return instance
