"""The shape the benchmark's steps start from. A run's dynamic and refine stages start from the static stage's result,
a surface, not from the soft initial density blob the short benchmark run would otherwise render: marching, the
alpha threshold and the transmittance early stop keep far fewer samples on a surface, and the field's work scales
with them.

``blobs``: before step 0 the geometry's field is fitted to the density of the procedural 4-D scene of
``animate124.testing.synthetic_scene`` (a soft sphere moving on an arc, a breathing ellipsoid; at every time, by
regression at random points and times, no rendering), and the renderer's occupancy grid is filled from the fitted
field as a run's grid is after its warm-up.
"""

from __future__ import annotations

import time

import pytorch_lightning as pl
import torch

START_SHAPES = ("blob", "blobs")


def fit_field_to_blobs(field, *, steps: int = 400, batch: int = 2**16, lr: float = 1e-2, seed: int = 0) -> dict:
    """Fit ``field`` (a :class:`~animate124.core.field.dynamic_field.DynamicField`) in place to the synthetic scene's
    density at random points of its bbox and random times; returns the final loss and the fitted density's mean
    inside / outside the scene's blobs on fresh points."""
    from animate124.testing.synthetic_scene import blobs_scene

    device = field.encoding.embeddings.device
    generator = torch.Generator(device=device).manual_seed(seed)
    r = field.radius
    params = list(field.parameters())
    trainable = [p.requires_grad for p in params]  # a stage may have frozen some: all are fitted, then restored
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.Adam(params, lr=lr, betas=(0.9, 0.99), eps=1e-15)

    def draw(n):
        x = (torch.rand(n, 3, generator=generator, device=device) * 2 - 1) * r
        t = torch.rand(n, generator=generator, device=device)
        return x, t, blobs_scene(x, t)[0]

    with torch.enable_grad(), torch.autocast(device_type=device.type, enabled=False):
        for _ in range(steps):
            x, t, target = draw(batch)
            # log space: the empty space (density ~0) weighs as much as the blobs (density up to 20)
            loss = (torch.log1p(field.forward_density(x, t).reshape(-1)) - torch.log1p(target)).square().mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    with torch.no_grad():
        x, t, target = draw(batch)
        sigma = field.forward_density(x, t).reshape(-1)
        inside = target > 10.0
    for p, flag in zip(params, trainable):
        p.grad = None
        p.requires_grad_(flag)
    return {"loss": round(float(loss.detach()), 5), "density_inside": round(float(sigma[inside].mean()), 3),
            "density_outside": round(float(sigma[~inside].mean()), 3)}


def fill_occupancy(renderer, updates: int = 4) -> dict:
    """The renderer's occupancy grid refreshed from the current field as in a run's warm-up (every cell, ``updates``
    times); returns the occupied fraction of the cells over all time slices."""
    estimator = getattr(renderer, "estimator", None)
    if estimator is None:
        return {}
    cfg = renderer.cfg
    generator = torch.Generator(device=estimator.occs.device).manual_seed(0)
    for _ in range(updates):
        estimator.update(0, lambda points, t: renderer.geometry.forward_density(points, times=t),
                         step_size=renderer.render_step_size, occ_thre=cfg.occ_thre, ema_decay=cfg.occ_ema_decay,
                         warmup_steps=1, n=1, generator=generator)
    return {"occupied_fraction": round(float(estimator.binaries.float().mean()), 4)}


class StartShape(pl.Callback):
    """Sets the start shape when training starts (the system is on its device then); ``info`` says what was done."""

    def __init__(self, shape: str, steps: int = 400) -> None:
        if shape not in START_SHAPES:
            raise ValueError(f"start shape {shape!r}: use one of {START_SHAPES}")
        self.shape, self.steps = shape, steps
        self.info: dict = {"shape": shape}

    def on_fit_start(self, trainer, pl_module) -> None:
        if self.shape == "blob":
            return
        t0 = time.perf_counter()
        field = pl_module.geometry.field
        self.info["fit"] = fit_field_to_blobs(field, steps=self.steps)
        self.info.update(fill_occupancy(pl_module.renderer))
        self.info["seconds"] = round(time.perf_counter() - t0, 2)
