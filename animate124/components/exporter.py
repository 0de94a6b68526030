"""``a124-mesh-sequence-exporter``: meshes of the 4D field at several frame times, plus one animated ``.glb``.

The host's ``mesh-exporter`` extracts one mesh and takes no time argument. This exporter runs marching cubes
on ``geometry.forward_density(points, times=t)`` at each requested time (``animate124.core.export.mesh_export``), colours the
vertices with the material (``material.export(points, **geometry.export(points, times=t))["albedo"]``, as the host's
exporter does), and writes (``animate124.core.export.writers``; axes, material and colours are described there)

* ``{save_name}/{save_name}_{k:04d}_t{time:.4f}.{fmt}``: one mesh per time, with vertex colours, y up as the ``.glb``
  (``axes: z_up`` keeps the training frame);
* ``{save_name}.glb``: ONE binary glTF whose mesh has the t = times[0] topology and N - 1 morph targets (the t = 0
  surface tracked onto every later level set), with a PBR material (vertex colours, metallic 0, roughness 1);
  keyframe k plays at ``times[k] * (clip_frames - 1) / fps`` seconds, so the animation runs at the speed of the test
  videos (64 frames over t in [0, 1] at 16 fps by default). Written only when tracking keeps the topology for every
  frame, otherwise the reason is logged with ``threestudio.warn``.

Files are written to a temporary folder and returned as ``save_type: file`` outputs, so the host's ``save_file``
copies them into ``it{step}-export/``.
"""
from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from typing import Optional, Union

import threestudio
import torch
from threestudio.models.exporters.base import Exporter, ExporterOutput
from threestudio.utils.typing import List

from animate124.components.choices import check_choice
from animate124.core.export.mesh_export import build_mesh_animation
from animate124.core.export.writers import AXES, write_mesh_sequence, write_morph_glb


@threestudio.register("a124-mesh-sequence-exporter")
class MeshSequenceExporter(Exporter):
    @dataclass
    class Config(Exporter.Config):
        times: Optional[list] = None
        """Frame times in [0, 1], strictly increasing; default ``n_times`` evenly spaced over [0, 1]."""
        n_times: int = 8
        resolution: int = 128
        """Marching-cubes samples per axis over the geometry's bbox."""
        threshold: Optional[Union[float, str]] = None
        """Density level of the surface, a number or "auto"; default the geometry's ``isosurface_threshold``."""
        save_name: str = "mesh"
        fmt: str = "obj"
        """obj | ply."""
        glb: bool = True
        """Also write the animated ``{save_name}.glb`` (when the t = 0 topology can follow every frame)."""
        fps: float = 16.0
        """Frame rate of the glTF animation's clock: the validation and test videos' (16 fps)."""
        clip_frames: int = 64
        """Frames from t = 0 to t = 1 at ``fps`` (the test videos' ``n_test_frames``): keyframe k plays at
        ``times[k] * (clip_frames - 1) / fps`` seconds."""
        axes: str = "y_up"
        """y_up: the mesh sequence in the ``.glb``'s axes (glTF: y up, the reference view on +z); z_up: the training
        frame (z up, the reference view on +x)."""
        roughness: float = 1.0
        """Roughness of the ``.glb``'s material (metallic 0, base colour = the vertex colours)."""
        interpolation: str = "LINEAR"
        """LINEAR | STEP (glTF sampler interpolation)."""
        min_component_fraction: float = 0.01
        """Drop connected components with fewer faces than this fraction (the host's outlier removal)."""
        chunk_size: int = 2**18
        track_iterations: int = 10
        track_substeps: int = 1
        track_max_substeps: int = 8
        """A keyframe that fails its check is tracked again in twice the substeps, up to this many."""
        tolerance_voxels: float = 1.5
        """Largest distance (voxels) between a tracked frame and that frame's marching-cubes mesh."""
        check_topology: bool = True

        def __post_init__(self) -> None:
            check_choice("a124-mesh-sequence-exporter", "fmt", self.fmt, ("obj", "ply"))
            check_choice("a124-mesh-sequence-exporter", "interpolation", self.interpolation, ("LINEAR", "STEP"))
            check_choice("a124-mesh-sequence-exporter", "axes", self.axes, AXES)
            if self.fps <= 0 or self.clip_frames < 2:
                raise ValueError(f"a124-mesh-sequence-exporter: fps={self.fps} must be > 0 and clip_frames="
                                 f"{self.clip_frames} >= 2")

    cfg: Config

    def configure(self, geometry, material, background) -> None:
        super().configure(geometry, material, background)
        if self.cfg.times is None:
            if self.cfg.n_times < 1:
                raise ValueError(f"a124-mesh-sequence-exporter: n_times={self.cfg.n_times} must be >= 1")
            self.times = torch.linspace(0, 1, self.cfg.n_times).tolist()
        else:
            self.times = [float(t) for t in self.cfg.times]
        if not self.times or any(not 0 <= t <= 1 for t in self.times) or any(
            b <= a for a, b in zip(self.times, self.times[1:])
        ):
            raise ValueError(
                f"a124-mesh-sequence-exporter: times={self.times} must be non-empty, in [0, 1] and strictly increasing"
            )
        threshold = self.cfg.threshold
        if threshold is None:
            threshold = self.geometry.cfg.isosurface_threshold
        if isinstance(threshold, str) and threshold != "auto":
            raise ValueError(f"a124-mesh-sequence-exporter: threshold={threshold!r} must be a number or 'auto'")
        self.threshold = threshold if isinstance(threshold, str) else float(threshold)

    def __call__(self) -> List[ExporterOutput]:
        bbox = self.geometry.bbox.detach().float()
        color_fn = self._color
        with torch.no_grad():
            if "albedo" not in self._material_out(bbox.mean(0, keepdim=True), bbox.new_zeros(1)):
                threestudio.warn("a124-mesh-sequence-exporter: the material exports no albedo; meshes have no colours")
                color_fn = None
        animation = build_mesh_animation(
            self._density, bbox, self.times, resolution=self.cfg.resolution, threshold=self.threshold,
            color_fn=color_fn, min_component_fraction=self.cfg.min_component_fraction,
            chunk_size=self.cfg.chunk_size, iterations=self.cfg.track_iterations, substeps=self.cfg.track_substeps,
            max_substeps=self.cfg.track_max_substeps, tolerance_voxels=self.cfg.tolerance_voxels, check_topology=self.cfg.check_topology,
        )
        # the folder lives as long as this exporter: the host copies the files after __call__ returns
        self._tmp = tempfile.TemporaryDirectory(prefix="a124-export-")
        name = self.cfg.save_name
        paths = write_mesh_sequence(os.path.join(self._tmp.name, name), animation.meshes, self.cfg.fmt, name,
                                    self.cfg.axes)
        outputs = [ExporterOutput(f"{name}/{os.path.basename(p)}", "file", {"src_path": p}) for p in paths]
        threestudio.info(
            f"a124-mesh-sequence-exporter: {len(paths)} meshes at t={[round(t, 4) for t in self.times]}, "
            f"threshold {animation.meshes[0].threshold:.4g}"
        )
        if not self.cfg.glb:
            return outputs
        if len(self.times) < 2:
            threestudio.warn("a124-mesh-sequence-exporter: one time only, no animated .glb (needs >= 2 times)")
        elif not animation.morph_ok:
            threestudio.warn(f"a124-mesh-sequence-exporter: no animated {name}.glb, per-frame meshes only: "
                             f"{animation.reason}")
        else:
            base = animation.meshes[0]
            glb = os.path.join(self._tmp.name, f"{name}.glb")
            seconds_per_t = (self.cfg.clip_frames - 1) / self.cfg.fps
            write_morph_glb(
                glb, base.vertices, base.faces, animation.tracked.frame_vertices, base.vertex_colors,
                [t * seconds_per_t for t in self.times], interpolation=self.cfg.interpolation,
                roughness=self.cfg.roughness,
                extras={"fps": self.cfg.fps, "clip_frames": self.cfg.clip_frames, "frame_times": self.times},
            )
            outputs.append(ExporterOutput(f"{name}.glb", "file", {"src_path": glb}))
        return outputs

    # field callables for the core (world points [N, 3], times [N])

    def _density(self, points, times):
        return self.geometry.forward_density(points, times=times)

    def _material_out(self, points, times) -> dict:
        return self.material.export(points=points, **self.geometry.export(points, times=times))

    def _color(self, points, times):
        return self._material_out(points, times)["albedo"][..., :3]
