"""The guidance slots of ``system.guidances`` at run time: loaded when a stage that uses them starts, freed when a
stage does not, and called with the inputs their kind needs (validation of the mapping: ``core/training/step_plan.py``).

Kept in plain dicts, not ``nn.Module`` attributes, so the frozen diffusion models stay out of the checkpoint.
With ``compile_mode`` (``system.compile_denoisers``) each slot's denoisers are compiled (or wrapped for CUDA graphs)
in place when it loads (:func:`animate124.core.guidance.diffusion_networks.compile_networks`); the compilation itself runs at
their first call, a CUDA graph's recording at the second.
"""
from __future__ import annotations

import gc
from typing import Any, Callable, Dict, Iterable, Optional

import threestudio
import torch
from threestudio.utils.misc import cleanup

from animate124.components.host_compat import alias_host_zero123
from animate124.core.guidance.cuda_graphs import GraphPool
from animate124.core.guidance.diffusion_networks import compile_networks
from animate124.core.training.step_plan import GuidanceSlot


class GuidanceSlots:
    def __init__(self, slots: Dict[str, GuidanceSlot], compile_mode: Optional[str] = None,
                 compile_vae_encoder: bool = False) -> None:
        self.slots = slots
        self.compile_mode, self.compile_vae_encoder = compile_mode, compile_vae_encoder
        self._compile_skip_logged = False
        self._graph_pool = GraphPool()  # cuda-graphs: all slots' graphs in one memory pool (they never run at once)
        self.guidances: Dict[str, Any] = {}
        self.prompt_processors: Dict[str, Any] = {}  # type names and keys: checked by preflight.check_system

    def keep_only(self, names: Iterable[str], device: torch.device, epoch: int, step: int) -> None:
        """Free every loaded slot not in ``names``, then load the missing ones (scheduled for ``step``)."""
        names = list(names)
        for name in [n for n in self.guidances if n not in names]:
            del self.guidances[name]
            self.prompt_processors.pop(name, None)
            gc.collect()
            cleanup()
        for name in [n for n in names if n not in self.guidances]:
            slot = self.slots[name]
            alias_host_zero123()
            # loaded inside training_step: no 16-mixed autocast; and the global random state is left as it was, so a
            # seeded run draws the same numbers whether a model's random init ran (transformers 4.x) or a cache hit
            forked = [device] if device.type == "cuda" else []
            with torch.autocast(device.type, enabled=False), torch.random.fork_rng(devices=forked):
                self.guidances[name] = threestudio.find(slot.guidance_type)(slot.guidance)
                if slot.prompt_processor_type:
                    self.prompt_processors[name] = threestudio.find(slot.prompt_processor_type)(slot.prompt_processor)
            for obj in (self.guidances[name], self.prompt_processors.get(name)):  # this step's update_step has run
                if hasattr(obj, "do_update_step"):
                    obj.do_update_step(epoch, step)
            if self.compile_mode is not None:
                self._compile(name, device)

    def _compile(self, name: str, device: torch.device) -> None:
        if device.type != "cuda":  # inductor on the CPU costs minutes per U-Net and gains little: not worth a run
            if not self._compile_skip_logged:
                threestudio.info(f"compile_denoisers={self.compile_mode!r}: skipped on {device.type} (CUDA only)")
                self._compile_skip_logged = True
            return
        labels = compile_networks([self.guidances[name]], self.compile_mode, vae_encoder=self.compile_vae_encoder,
                                  graph_pool=self._graph_pool)
        how = ("CUDA graphs" if self.compile_mode == "cuda-graphs" else f"torch.compile(mode={self.compile_mode!r})")
        threestudio.info(f"guidance slot {name!r}: {how} of {labels or 'nothing'}"
                         " (recorded / compiled at the first calls)")

    def update_step(self, epoch: int, step: int, on_load_weights: bool = False) -> None:
        # the host's Updateable walk does not visit plain dicts
        for obj in list(self.guidances.values()) + list(self.prompt_processors.values()):
            if hasattr(obj, "do_update_step"):
                obj.do_update_step(epoch, step, on_load_weights=on_load_weights)

    def __call__(self, name: str, rgb: torch.Tensor, view_batch: dict, cond_rgb: Optional[torch.Tensor],
                 log: Callable[[str, Any], None]) -> Dict[str, torch.Tensor]:
        """Run one slot on a render; returns its ``loss_<key>`` outputs by ``key`` (other scalars are logged).

        ``cond_rgb``: the ControlNet condition image (``controlnet`` slots only)."""
        args = [rgb] + ([self.prompt_processors[name]()] if name in self.prompt_processors else [])
        extra = {"cond_rgb": cond_rgb} if self.slots[name].input == "controlnet" else {}
        out = self.guidances[name](*args, **{**view_batch, **extra}, rgb_as_latents=False)
        for key, value in out.items():
            if not key.startswith("loss_") and (isinstance(value, (int, float)) or torch.is_tensor(value) and value.ndim == 0):
                log(f"train/{name}_{key}", value)
        return {key[5:]: value for key, value in out.items() if key.startswith("loss_")}
