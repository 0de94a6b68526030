"""What the ``a124-system`` writes outside training: validation / test frames and videos, and the exported meshes,
each written once under DDP (every rank renders its share of the views; global rank 0 assembles the videos after a
barrier), and, once a training run's test views are written, the export command ready to paste. A mixin of
:class:`animate124.components.system.Animate124System`."""
from __future__ import annotations

import os
import shlex

from animate124.components.host_compat import video_format

LAUNCHER_ENV = "A124_LAUNCHER"
"""Set by ``animate124 launch`` to itself: the export command then uses the same launcher."""


def export_command(trial_dir: str, launcher: str | None = None, cwd: str | None = None) -> str:
    """The command that exports a trained run's meshes and animated glb (paths relative to ``cwd`` when inside it):
    ``python launch.py ... --export --gpu 0 resume=...``, or with ``launcher`` (``animate124 launch``) instead of
    ``python launch.py`` and no ``--gpu``."""
    cwd = os.path.abspath(cwd or os.getcwd())
    trial = os.path.abspath(trial_dir)
    if trial == cwd or trial.startswith(cwd + os.sep):
        trial = os.path.relpath(trial, cwd)
    config = shlex.quote(os.path.join(trial, "configs", "parsed.yaml"))
    resume = shlex.quote("resume=" + os.path.join(trial, "ckpts", "last.ckpt"))
    if launcher:
        return f"{launcher} --config {config} --export {resume}"
    return f"python launch.py --config {config} --export --gpu 0 {resume}"


class EvalOutputsMixin:
    def _save_views(self, prefix: str, out: dict) -> None:
        imgs = [{"type": "rgb", "img": out["comp_rgb"][0], "kwargs": {"data_format": "HWC"}}]
        if "comp_normal" in out:
            imgs.append({"type": "rgb", "img": out["comp_normal"][0], "kwargs": {"data_format": "HWC", "data_range": (0, 1)}})
        imgs.append({"type": "grayscale", "img": out["opacity"][0, :, :, 0], "kwargs": {"cmap": None, "data_range": (0, 1)}})
        self.save_image_grid(f"{prefix}.png", imgs, name=None, step=self.true_global_step)

    def validation_step(self, batch, batch_idx):
        self._save_views(f"it{self.true_global_step}-val/{int(batch['index'][0])}", self(batch))

    def test_step(self, batch, batch_idx):
        step, name = self.true_global_step, batch["trajectory"][0]
        self._save_views(f"it{step}-test/{name}/{int(batch['index'][0])}", self(batch))

    def _rank_zero_after_barrier(self) -> bool:
        trainer = getattr(self, "_trainer", None)  # None when called outside a Trainer (e.g. an export script)
        if trainer is not None and trainer.world_size > 1:
            trainer.strategy.barrier()
        return self.global_rank == 0

    def on_validation_epoch_end(self):
        if self._rank_zero_after_barrier():
            step = self.true_global_step
            self.save_img_sequence(f"it{step}-val", f"it{step}-val", r"(\d+)\.png", save_format=video_format(), fps=16,
                                   name="validation_video", step=step)

    def on_test_epoch_end(self):
        if self._rank_zero_after_barrier():
            self._write_test_videos()

    def on_fit_end(self) -> None:
        self._a124_trained = True  # launch.py --train tests right after: the export hint follows those views

    def on_test_end(self) -> None:
        super().on_test_end()
        if getattr(self, "_a124_trained", False) and self.global_rank == 0 and self._save_dir is not None:
            command = export_command(os.path.dirname(self._save_dir), os.environ.get(LAUNCHER_ENV))
            print(f"\nanimate124: trained. Export the meshes and the animated .glb with:\n  {command}\n", flush=True)

    def on_predict_epoch_end(self) -> None:
        """As the host's, but written once under DDP."""
        if not self._rank_zero_after_barrier():
            return
        if self.exporter.cfg.save_video:
            self._write_test_videos()
        for out in self.exporter():
            save = getattr(self, f"save_{out.save_type}", None)
            if save is None:
                raise ValueError(f"exporter output type {out.save_type!r} has no save_{out.save_type} in SaverMixin")
            save(f"it{self.true_global_step}-export/{out.save_name}", **out.params)

    def _write_test_videos(self) -> None:
        step = self.true_global_step
        root = os.path.join(self.get_save_dir(), f"it{step}-test")
        if not os.path.isdir(root):
            return
        for name in sorted(os.listdir(root)):
            self.save_img_sequence(f"it{step}-test-{name}", f"it{step}-test/{name}", r"(\d+)\.png",
                                   save_format=video_format(), fps=16, name=f"test_{name}", step=step)
