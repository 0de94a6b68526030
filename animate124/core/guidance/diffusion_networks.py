"""The frozen diffusion networks inside a loaded guidance: finding them, and compiling their forwards in place.

A guidance (ours or the host's) keeps its networks somewhere in its attributes: ``self.unet``, ``self.pipe.unet``,
``self.model.unet``, or, for the host's LDM Zero123, ``self.model`` = a ``LatentDiffusion`` whose denoiser is
``model.model.diffusion_model`` (ldm's ``UNetModel``). :func:`find_networks` walks the attributes a few levels deep
and returns them by kind; the step benchmark (``benchmarks/step_benchmark``) times the same networks and
``a124-system``'s ``compile_denoisers`` compiles them (:func:`compile_networks`).

Compiling replaces the module's ``forward`` *instance attribute* with ``torch.compile(module.forward)`` (with
``cuda-graphs``, :class:`animate124.core.guidance.cuda_graphs.GraphedForward`): the module object, its weights and its hooks
stay as they are, ``module(...)`` runs the compiled code (``nn.Module.__call__`` looks ``forward`` up on the instance
first), and anything that wraps ``forward`` afterwards (the benchmark's call recorder) wraps the compiled one.
Compilation itself happens at the first call with each new input shape (recording: at the second).
"""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from typing import Iterable, Optional

import torch

from animate124.core.guidance.cuda_graphs import GraphedForward, GraphPool

__all__ = ["COMPILE_MODES", "MEASURE_ONLY_MODES", "DENOISER_CLASSES", "VAE_CLASSES", "FoundNetworks", "find_networks",
           "is_denoiser", "is_vae", "compile_networks", "compile_problem"]

DENOISER_CLASSES: tuple[str, ...] = ("UNet2DConditionModel", "UNet3DConditionModel", "ControlNetModel")
"""diffusers denoisers by class name (SD 1.5 / Zero123 / ControlNet's U-Net, ModelScope / ZeroScope, ControlNet)."""
LDM_DENOISER_CLASS = "UNetModel"
"""ldm's denoiser (``ldm.modules.diffusionmodules.openaimodel``), matched only in a module whose path names ldm."""
VAE_CLASSES: tuple[str, ...] = ("AutoencoderKL", "AutoencoderTiny")
"""VAEs by class name (diffusers' and ldm's ``AutoencoderKL`` share it); their ``encoder`` runs with gradient."""
COMPILE_MODES: tuple[str, ...] = ("cuda-graphs", "default", "max-autotune-no-cudagraphs")
"""Modes offered for training: ``cuda-graphs`` records each denoiser's eager no-grad forward as CUDA graphs (no
compilation; :mod:`animate124.core.guidance.cuda_graphs`); ``torch.compile`` with inductor's default; autotuned kernels
without CUDA graphs.

Not ``torch.compile``'s ``reduce-overhead``: a graph's outputs are overwritten by its next replay, and a step feeds
the ControlNet's residuals into the U-Net and keeps noise predictions across calls; ``cuda-graphs`` copies its
outputs out instead, and needs no minute of compilation per network and shape."""
MEASURE_ONLY_MODES: tuple[str, ...] = ("reduce-overhead",)
"""Modes the compile benchmark may time on their own (one call per step), never offered to training."""


@dataclass
class FoundNetworks:
    """The networks of one or more objects, each once, in the order found."""

    denoisers: list = field(default_factory=list)
    vaes: list = field(default_factory=list)

    def all(self) -> list:
        return self.denoisers + self.vaes


def is_denoiser(module) -> bool:
    kind = type(module)
    return kind.__name__ in DENOISER_CLASSES or (kind.__name__ == LDM_DENOISER_CLASS and "ldm" in kind.__module__)


def is_vae(module) -> bool:
    return type(module).__name__ in VAE_CLASSES


def find_networks(objects: Iterable, depth: int = 4) -> FoundNetworks:
    """Denoisers and VAEs reachable from ``objects`` through at most ``depth`` attribute / dict / submodule levels.

    A network found is not searched further (a ControlNet inside a U-Net wrapper is found; a VAE's sub-blocks are
    not). ``None`` entries are skipped."""
    found: dict[int, torch.nn.Module] = {}
    for obj in objects:
        _walk(obj, found, depth)
    out = FoundNetworks()
    for module in found.values():
        (out.denoisers if is_denoiser(module) else out.vaes).append(module)
    return out


def compile_networks(
    objects: Iterable,
    mode: str,
    *,
    vae_encoder: bool = False,
    backend: str = "inductor",
    graph_pool: Optional[GraphPool] = None,
) -> list[str]:
    """Compile the ``forward`` of every denoiser (and, with ``vae_encoder``, every VAE's ``encoder``) found in
    ``objects``, in place; returns one label per network compiled (``"UNet2DConditionModel"``,
    ``"AutoencoderKL.encoder"``), networks already compiled skipped.

    Args:
        objects: loaded guidances (or anything holding networks in its attributes, see :func:`find_networks`).
        mode: one of :data:`COMPILE_MODES` (or :data:`MEASURE_ONLY_MODES`, for the compile benchmark); passed to
            inductor only (other backends take no mode).
        vae_encoder: also compile the VAE encoders. They run with gradient (SDS back-propagates through the
            encode), inside ``torch.utils.checkpoint`` when the guidance checkpoints its VAE.
        backend: ``torch.compile``'s backend; tests use ``"aot_eager"`` (the same graph capture and autograd
            split as inductor, without generating kernels) to stay cheap on a CPU.
        graph_pool: ``cuda-graphs``: the memory pool shared with other networks' graphs (one per guidance slot set,
            so the slots' graphs hold one pool's peak, not one each); a new one when None.

    ``dynamic=False``: every stage calls a network with fixed shapes, so each new shape gets its own static graph
    (inductor's best kernels, and what CUDA graphs need) instead of a dynamic-shape recompile. The SD, Zero123 and
    ControlNet U-Nets share one ``forward`` code object, and dynamo's recompile limit (8 by default) counts per code
    object: past it, calls run eager (torch logs a warning naming the limit).
    """
    if mode not in COMPILE_MODES + MEASURE_ONLY_MODES:
        raise ValueError(f"compile_networks: mode={mode!r} is not one of {', '.join(COMPILE_MODES)}")
    if mode == "cuda-graphs" and vae_encoder:
        raise ValueError("compile_networks: cuda-graphs replays no-grad forwards only and a VAE encoder runs with "
                         "gradient: compile the encoders with mode='default', or leave vae_encoder off")
    found = find_networks(objects)
    targets = [(type(m).__name__, m) for m in found.denoisers]
    if vae_encoder:
        targets += [(f"{type(v).__name__}.encoder", v.encoder) for v in found.vaes if hasattr(v, "encoder")]
    kwargs = {"mode": mode} if backend == "inductor" else {}
    pool = graph_pool if graph_pool is not None else GraphPool()
    labels = []
    for label, module in targets:
        if getattr(module.forward, "_a124_compiled", False):
            continue
        if mode == "cuda-graphs":
            compiled = GraphedForward(module.forward, module.parameters(), pool, name=label)
        else:
            compiled = torch.compile(module.forward, backend=backend, dynamic=False, **kwargs)
        compiled._a124_compiled = True
        module.forward = compiled  # an instance attribute: the class's forward, the weights and the hooks stay
        labels.append(label)
    return labels


def compile_problem(device: torch.device, backend: str = "inductor", mode: str = "default") -> Optional[str]:
    """Why :func:`compile_networks` cannot work with this torch on ``device`` (one line with the fix), or None."""
    if mode == "cuda-graphs":
        return None  # torch.cuda.CUDAGraph: every torch this project supports; CUDA only, like the others
    if not hasattr(torch, "compile"):
        return f"torch {torch.__version__} has no torch.compile (needs torch >= 2.0): upgrade torch or set it to null"
    if backend == "inductor" and device.type == "cuda" and importlib.util.find_spec("triton") is None:
        return (f"torch {torch.__version__}: inductor needs triton on CUDA and it is not installed: "
                "pip install triton (the version matching torch) or set it to null")
    return None


# ----------------------------------------------------------------------------------------------------------------------


def _walk(obj, found: dict, depth: int) -> None:
    if obj is None or depth < 0:
        return
    if isinstance(obj, torch.nn.Module) and (is_denoiser(obj) or is_vae(obj)):
        found[id(obj)] = obj
        return
    attrs = getattr(obj, "__dict__", None)
    if not isinstance(attrs, dict):
        return
    for value in list(attrs.values()):
        if isinstance(value, (str, bytes, int, float, bool, torch.Tensor)):
            continue
        if isinstance(value, dict):  # an nn.Module's _modules, a guidance's dict of models
            for v in list(value.values()):
                _walk(v, found, depth - 1)
        elif hasattr(value, "__dict__"):
            _walk(value, found, depth - 1)
