"""``a124-system``: every Animate124 stage (static -> dynamic -> refine) inside ONE run, switched by the step.

A ``stages:`` list (see :mod:`animate124.core.stages`) says per stage how many steps it runs, which guidance slots are
active, the loss weights, the learning rate of each parameter group and which groups train. Guidance slots are
declared once under ``guidances:`` with any host or a124 guidance type; a slot is loaded when a stage that uses it
starts and freed when no later step needs it, so the static stage never holds the video model and the refine stage
never holds SD.

Slot inputs (``input:``):

* ``image``: a random camera at t = 0 (SD-style guidances, called with ``prompt_utils``; Zero123-style guidances
  without a prompt processor are called without it). In video stages image slots run only on anchoring steps
  (clips that start at t = 0, plus every ``anchor_interval`` steps).
* ``video``: the rendered clip ``[T, H, W, 3]`` with its per-frame cameras.
* ``controlnet``: the rendered clip plus ``cond_rgb``: the render of a frozen copy of the model taken when the stage
  starts (``controlnet_condition: frozen``, upstream ``main``) or the detached current render (``current``).

Loss weights: ``loss_weights`` keys are ``<slot>`` (applies to every ``loss_*`` the slot returns), ``<slot>_<key>``
for one of them (``key`` without ``loss_``), and the system's own terms ``rgb``, ``mask``, ``depth``,
``normal_smoothness_2d``, ``time_smoothness``, ``sparsity``, ``opaque``. A missing key weighs 0 and is not computed.

Parameter groups (``learning_rates``/``trainable``): ``field_3d``, ``field_4d``, ``density_mlp``, ``feature_mlp``,
``background``.
"""
from __future__ import annotations

import copy
import gc
import os
import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

import threestudio
import torch
import torch.nn.functional as F
from threestudio.systems.base import BaseLift3DSystem
from threestudio.utils.misc import cleanup
from threestudio.utils.ops import binary_cross_entropy

from animate124.components import preflight
from animate124.components.choices import check_choice
from animate124.core import atomic_io
from animate124.core.stages import Stage, parse_stages, stage_at, stage_starts, total_steps
from animate124.components.choices import check_choice

PARAM_GROUPS = {
    "field_3d": "geometry.encoding",
    "field_4d": "geometry.encoding_time",
    "density_mlp": "geometry.density_network",
    "feature_mlp": "geometry.feature_network",
    "background": "background",
}
OWN_LOSSES = ("rgb", "mask", "depth", "normal_smoothness_2d", "time_smoothness", "sparsity", "opaque")
SLOT_KEYS = ("guidance_type", "guidance", "prompt_processor_type", "prompt_processor", "input")
SLOT_INPUTS = ("image", "video", "controlnet")


@dataclass
class GuidanceSlot:
    name: str
    guidance_type: str
    guidance: dict
    prompt_processor_type: str
    prompt_processor: dict
    input: str


def parse_slots(raw: Dict[str, Any]) -> Dict[str, GuidanceSlot]:
    """Validate the ``guidances:`` mapping (one line per problem, naming the slot and the fix)."""
    slots = {}
    for name, entry in dict(raw).items():
        entry = dict(entry)
        unknown = sorted(set(entry) - set(SLOT_KEYS))
        if unknown:
            raise ValueError(f"system.guidances.{name}: unknown keys {unknown}; allowed: {list(SLOT_KEYS)}")
        if not entry.get("guidance_type"):
            raise ValueError(f"system.guidances.{name}.guidance_type is missing: name a registered guidance")
        slot_input = entry.get("input", "image")
        if slot_input not in SLOT_INPUTS:
            raise ValueError(f"system.guidances.{name}.input={slot_input!r}; allowed: {list(SLOT_INPUTS)}")
        slots[name] = GuidanceSlot(
            name, entry["guidance_type"], dict(entry.get("guidance") or {}), entry.get("prompt_processor_type") or "",
            dict(entry.get("prompt_processor") or {}), slot_input,
        )
    return slots


@threestudio.register("a124-system")
class Animate124System(BaseLift3DSystem):
    @dataclass
    class Config(BaseLift3DSystem.Config):
        stages: List[dict] = field(default_factory=list)
        """The stage schedule (module docstring); the sum of steps should equal trainer.max_steps."""
        guidances: dict = field(default_factory=dict)
        """Guidance slots: name -> {guidance_type, guidance, prompt_processor_type, prompt_processor, input}."""
        controlnet_condition: str = "frozen"
        """ControlNet condition image: render of a copy frozen at stage start (upstream main), or current render."""
        anchor_interval: int = 4
        """In video stages, also anchor (reference-view losses + image slots at t = 0) every this many steps
        (0 = only on clips that start at t = 0, as upstream threestudio)."""
        static_ref_interval: int = 1
        """In image-only stages, reference-view losses every this many steps."""
        time_smoothness_points: int = 4096
        time_smoothness_dt: float = 0.0625
        strict_weights: bool = False
        """Loading ``weights``: raise on missing/unexpected keys instead of reporting them."""
        prompt: str = ""
        """Static description ("a high-resolution DSLR image of a panda"); configs interpolate it as ${system.prompt}."""
        motion_prompt: str = ""
        """The motion sentence ("a panda is dancing"), for the video slot."""
        refine_prompt: str = ""
        """The motion sentence with the learned subject ("a <token> is dancing"), for the ControlNet slot."""
        learned_embeds_path: Optional[str] = None
        """Textual-inversion embedding (``animate124 invert``), for the ControlNet slot's prompt processor."""
        tiny_models_dir: Optional[str] = None
        """Smoke runs: make the tiny random models (``animate124 make-tiny-models``) here when missing."""
        max_nonfinite_steps: int = 5
        """Steps with a NaN/inf loss or gradient are skipped; this many in a row stop the run (nonfinite_guard)."""
        min_free_vram_gb: Optional[float] = None
        """Refuse to start with less free GPU memory than this (None: no check); the message names the lowvram config."""

        def __post_init__(self) -> None:
            check_choice("a124-system", "controlnet_condition", self.controlnet_condition, ("frozen", "current"))

    cfg: Config

    # ---- construction ------------------------------------------------------------------------------------------

    def configure(self) -> None:
        if self.cfg.tiny_models_dir:
            _ensure_tiny_models(self.cfg.tiny_models_dir)
        super().configure()
        self.stages: tuple[Stage, ...] = parse_stages(self.cfg.stages)
        self.slots = parse_slots(self.cfg.guidances)
        for stage in self.stages:
            missing = [g for g in stage.guidances if g not in self.slots]
            if missing:
                raise ValueError(f"stage {stage.name!r} uses guidances {missing} not declared under system.guidances")
            for key in stage.loss_weights:
                of_slot = key in self.slots or any(key.startswith(f"{slot}_") for slot in self.slots)
                if key not in OWN_LOSSES and not of_slot:
                    raise ValueError(
                        f"stage {stage.name!r}: loss weight {key!r} names neither a slot ({list(self.slots)}) nor a "
                        f"system loss ({list(OWN_LOSSES)})"
                    )
            unknown = [g for g in list(stage.learning_rates) + list(stage.trainable or ()) if g not in PARAM_GROUPS]
            if unknown:
                raise ValueError(f"stage {stage.name!r}: unknown parameter groups {unknown}; allowed {list(PARAM_GROUPS)}")
        preflight.check_system(self.cfg, self.slots, self.stages)  # every stage's inputs, before any model loads
        self._guidances: Dict[str, Any] = {}  # plain dict: frozen diffusion models stay out of state_dict
        self._prompt_processors: Dict[str, Any] = {}
        self._stage_index: Optional[int] = None
        self._stage_clock: Optional[dict] = None
        self.stage_records: List[dict] = []
        self.frozen_geometry = None
        self.frozen_estimator = None
        self._resumed_clock: Optional[dict] = None
        self._ddp_grad_masking = False

    def configure_callbacks(self):
        from animate124.components.nonfinite_guard import NonfiniteGuard

        return [NonfiniteGuard(self.cfg.max_nonfinite_steps), preflight.OutputFolderCheck()]

    def load_weights(self, weights: str, ignore_modules: Optional[List[str]] = None) -> None:
        """Like the host's, but every missing / unexpected key is reported (or raises with strict_weights)."""
        from threestudio.utils.misc import load_module_weights

        state_dict, _, _ = load_module_weights(weights, ignore_modules=ignore_modules, map_location="cpu")
        result = self.load_state_dict(state_dict, strict=False)
        missing = [k for k in result.missing_keys if not k.startswith(("frozen_geometry.", "frozen_estimator."))]
        msg = (f"loaded {weights}: {len(state_dict)} tensors; missing keys {missing or 'none'}; "
               f"unexpected keys {list(result.unexpected_keys) or 'none'}")
        if (missing or result.unexpected_keys) and self.cfg.strict_weights:
            raise ValueError(msg + " (strict_weights: true)")
        threestudio.info(msg) if not (missing or result.unexpected_keys) else threestudio.warn(msg)
        self.weights_report = {"missing": missing, "unexpected": list(result.unexpected_keys)}

    def configure_optimizers(self):
        groups, seen = [], set()
        first = self.stages[0]
        for group, path in PARAM_GROUPS.items():
            module = self
            for part in path.split("."):
                module = getattr(module, part, None)
            params = [p for p in (module.parameters() if module is not None else []) if id(p) not in seen]
            seen.update(id(p) for p in params)
            if params:
                groups.append({"params": params, "name": group, "lr": first.learning_rates.get(group, 0.0)})
        opt = self.cfg.optimizer
        name = opt.get("name", "Adam") if opt else "Adam"
        args = dict(opt.get("args", {})) if opt else {}
        args.pop("lr", None)  # learning rates come from the stages
        if not hasattr(torch.optim, name):
            raise ValueError(f"system.optimizer.name={name!r}: a124-system builds torch.optim optimizers only "
                             "(Adam, AdamW, ...); learning rates are set per stage")
        optimizer = getattr(torch.optim, name)(groups, lr=0.0, **args)
        if self.cfg.scheduler is not None:
            raise ValueError("system.scheduler is not supported by a124-system: learning rates are set per stage "
                             "(stages[i].learning_rates); remove the scheduler")
        return optimizer

    # ---- stages ------------------------------------------------------------------------------------------------

    def on_load_checkpoint(self, checkpoint: Dict[str, Any]) -> None:
        # a run resumed mid-refine needs the frozen copy before its weights load
        if any(k.startswith(("frozen_geometry.", "frozen_estimator.")) for k in checkpoint.get("state_dict", {})):
            self._make_frozen_copy()
        self.stage_records = list(checkpoint.get("a124_stage_records", []))
        self._resumed_clock = checkpoint.get("a124_stage_clock")

    def on_save_checkpoint(self, checkpoint: Dict[str, Any]) -> None:
        checkpoint["a124_stage_records"] = self.stage_records
        if self._stage_clock is not None:  # the stage in progress: continued after a resume
            clock = self._stage_clock
            checkpoint["a124_stage_clock"] = {"name": clock["name"], "start_step": clock["start_step"],
                                              "elapsed_s": time.time() - clock["t0"]}

    def _make_frozen_copy(self) -> None:
        """The model as the ControlNet stage starts: geometry and its occupancy grid (so the condition render is not
        pruned by the live model's grid as it drifts)."""
        if self.frozen_geometry is None:
            self.frozen_geometry = copy.deepcopy(self.geometry)
            self.frozen_geometry.requires_grad_(False).eval()
            estimator = getattr(self.renderer, "estimator", None)
            if estimator is not None:
                self.frozen_estimator = copy.deepcopy(estimator)

    def current_stage(self) -> Stage:
        return stage_at(self.stages, self.true_global_step).stage

    def _sync_stage(self) -> Stage:
        """Enter the stage of the current step: slots, trainable groups, learning rates, frozen copy."""
        pos = stage_at(self.stages, self.true_global_step)
        if pos.index == self._stage_index:
            return pos.stage
        self._close_stage_record()
        self._stage_index = pos.index
        stage = pos.stage
        for name in [n for n in self._guidances if n not in stage.guidances]:
            self._free_slot(name)
        for name in stage.guidances:
            self._load_slot(name)
        for group, module in self._param_group_modules().items():
            # DDP builds its gradient hooks once, for the parameters that require grad then: under DDP every group
            # keeps requires_grad and frozen groups get their gradients dropped before the step instead
            module.requires_grad_(stage.trains(group) or self._ddp_grad_masking)
        if self.trainer is not None and self.trainer.optimizers:
            for pg in self.trainer.optimizers[0].param_groups:
                pg["lr"] = stage.learning_rates.get(pg.get("name"), 0.0) if stage.trains(pg.get("name")) else 0.0
        if any(self.slots[g].input == "controlnet" for g in stage.guidances):
            if self.cfg.controlnet_condition == "frozen" and self.frozen_geometry is None:
                self._make_frozen_copy()
        self._stage_clock = {"name": stage.name, "start_step": self.true_global_step, "t0": time.time()}
        resumed, self._resumed_clock = self._resumed_clock, None
        if resumed is not None and resumed["name"] == stage.name:  # a resume inside this stage: keep its record whole
            self._stage_clock.update(start_step=resumed["start_step"], t0=time.time() - resumed["elapsed_s"])
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        threestudio.info(f"stage {pos.index + 1}/{len(self.stages)} '{stage.name}' from step {self.true_global_step}: "
                         f"guidances {list(stage.guidances)}")
        return stage

    def _param_group_modules(self) -> Dict[str, torch.nn.Module]:
        modules = {}
        for group, path in PARAM_GROUPS.items():
            module = self
            for part in path.split("."):
                module = getattr(module, part, None)
            if module is not None:
                modules[group] = module
        return modules

    def setup(self, stage: str) -> None:
        # before the strategy wraps the model: under DDP freeze by dropping gradients, never by requires_grad
        trainer = getattr(self, "_trainer", None)
        self._ddp_grad_masking = trainer is not None and trainer.world_size > 1
        if self._ddp_grad_masking:
            for module in self._param_group_modules().values():
                module.requires_grad_(True)

    def on_before_optimizer_step(self, optimizer) -> None:
        if not self._ddp_grad_masking:
            return
        stage = self.current_stage()
        for group, module in self._param_group_modules().items():
            if not stage.trains(group):
                for p in module.parameters():
                    p.grad = None

    def _load_slot(self, name: str) -> None:
        if name in self._guidances:
            return
        slot = self.slots[name]
        _host_zero123_alias()
        # loaded inside training_step: keep 16-mixed autocast away from the frozen models and cached embeddings
        with torch.autocast(self.device.type, enabled=False):
            self._guidances[name] = threestudio.find(slot.guidance_type)(slot.guidance)
            if slot.prompt_processor_type:
                self._prompt_processors[name] = threestudio.find(slot.prompt_processor_type)(slot.prompt_processor)
        # loaded after this step's update_step ran: schedule it now (timestep ranges etc.)
        for obj in (self._guidances[name], self._prompt_processors.get(name)):
            if hasattr(obj, "do_update_step"):
                obj.do_update_step(self.true_current_epoch, self.true_global_step)

    def _free_slot(self, name: str) -> None:
        self._guidances.pop(name, None)
        self._prompt_processors.pop(name, None)
        gc.collect()
        cleanup()

    def _close_stage_record(self) -> None:
        if self._stage_clock is None:
            return
        clock, self._stage_clock = self._stage_clock, None
        record = {
            "stage": clock["name"],
            "start_step": clock["start_step"],
            "end_step": self.true_global_step,
            "steps": self.true_global_step - clock["start_step"],
            "wall_time_s": round(time.time() - clock["t0"], 3),
            "peak_vram_gb": round(torch.cuda.max_memory_allocated() / 2**30, 3) if torch.cuda.is_available() else None,
        }
        self.stage_records.append(record)
        if self.global_rank == 0:  # self.log is not allowed in on_train_end: write to the loggers directly
            metrics = {f"stages/{record['stage']}_wall_time_s": record["wall_time_s"]}
            if record["peak_vram_gb"] is not None:
                metrics[f"stages/{record['stage']}_peak_vram_gb"] = record["peak_vram_gb"]
            for logger in self.loggers:
                logger.log_metrics(metrics, step=self.true_global_step)
        self._write_stages_json()

    def _write_stages_json(self) -> None:
        if self._save_dir is None or self.global_rank != 0:
            return
        path = os.path.join(os.path.dirname(self.get_save_dir()), "stages.json")
        atomic_io.write_json(path, {"stages": self.stage_records, "total_steps": total_steps(self.stages),
                                    "stage_starts": stage_starts(self.stages)}, indent=2)

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

    def on_train_end(self) -> None:
        self._close_stage_record()

    def update_step(self, epoch: int, global_step: int, on_load_weights: bool = False) -> None:
        # slots live in a plain dict, which the host's Updateable walk does not visit
        for obj in list(self._guidances.values()) + list(self._prompt_processors.values()):
            if hasattr(obj, "do_update_step"):
                obj.do_update_step(epoch, global_step, on_load_weights=on_load_weights)

    # ---- rendering ---------------------------------------------------------------------------------------------

    def forward(self, batch: Dict[str, Any]) -> Dict[str, Any]:
        return self.renderer(**batch)

    def _weight(self, stage: Stage, key: str) -> float:
        value = stage.loss_weights.get(key)
        return 0.0 if value is None else float(self.C(list(value) if isinstance(value, tuple) else value))

    # ---- training ----------------------------------------------------------------------------------------------

    def training_step(self, batch, batch_idx):
        stage = self._sync_stage()
        terms: Dict[str, tuple] = {}  # name -> (value, weight)
        video_slots = [g for g in stage.guidances if self.slots[g].input in ("video", "controlnet")]
        image_slots = [g for g in stage.guidances if self.slots[g].input == "image"]
        need_normal = self._weight(stage, "normal_smoothness_2d") > 0
        step = self.true_global_step
        # 1. Video stages: the clip feeds the video / ControlNet slots; image slots and the reference view only run
        #    on anchoring steps (clips that start at t = 0, and every anchor_interval steps).
        if video_slots:
            video = batch["video"]
            out = self.renderer(**video, return_normal=need_normal)
            for name in video_slots:
                self._apply_slot(name, stage, out["comp_rgb"], video, terms)
            self._normal_smoothness(out, stage, terms)
            anchor = bool(video.get("start_from_zero", False)) or (
                self.cfg.anchor_interval > 0 and step % self.cfg.anchor_interval == 0)
            view_slots = image_slots if anchor else []
        # 2. Image stages: a random view at t = 0 feeds the image slots every step and carries the regularisers.
        else:
            anchor = self.cfg.static_ref_interval > 0 and step % self.cfg.static_ref_interval == 0
            view_slots = image_slots
        if view_slots or not video_slots:
            rnd = batch["random"]
            out_rnd = self.renderer(**rnd, return_normal=need_normal and not video_slots)
            for name in view_slots:
                self._apply_slot(name, stage, out_rnd["comp_rgb"], rnd, terms)
            if not video_slots:
                self._normal_smoothness(out_rnd, stage, terms)
                self._density_terms(out_rnd, stage, terms)
        if anchor:
            self._reference_terms(batch["ref"], stage, terms)
        if self._weight(stage, "time_smoothness") > 0:
            terms["time_smoothness"] = (self.geometry.time_smoothness_loss(
                self.cfg.time_smoothness_points, self.cfg.time_smoothness_dt), self._weight(stage, "time_smoothness"))
        loss = 0.0
        for name, (value, weight) in terms.items():
            self.log(f"train/loss_{name}", value)
            loss = loss + value * weight
        for name in stage.loss_weights:
            self.log(f"train_params/lambda_{name}", self._weight(stage, name))
        self.log("train/stage", float(self._stage_index))
        self.log("train/loss", loss if torch.is_tensor(loss) else torch.tensor(loss), prog_bar=True)
        # what ran at this step (tests and debugging read it)
        self.last_step_info = {"stage": stage.name, "guidances": sorted({k.split(":")[0] for k in terms if ":" in k}),
                               "terms": sorted(terms), "anchor": anchor}
        return {"loss": loss}

    def _apply_slot(self, name: str, stage: Stage, rgb, batch: dict, terms: dict) -> None:
        slot, guidance = self.slots[name], self._guidances[name]
        args = [rgb]
        if name in self._prompt_processors:
            args.append(self._prompt_processors[name]())
        extra = {}
        if slot.input == "controlnet":
            if self.cfg.controlnet_condition == "frozen":
                with torch.no_grad():
                    extra["cond_rgb"] = self._render_frozen(batch)
            else:
                extra["cond_rgb"] = rgb.detach()
        out = guidance(*args, **{**batch, **extra}, rgb_as_latents=False)
        for key, value in out.items():
            if not key.startswith("loss_"):
                if torch.is_tensor(value) and value.ndim == 0 or isinstance(value, (int, float)):
                    self.log(f"train/{name}_{key}", value)
                continue
            weight = stage.loss_weights.get(f"{name}_{key[5:]}", stage.loss_weights.get(name))
            weight = 0.0 if weight is None else float(self.C(list(weight) if isinstance(weight, tuple) else weight))
            terms[f"{name}:{key[5:]}"] = (value, weight)

    def _render_frozen(self, batch: dict):
        """Render the clip with the geometry frozen at stage start (the ControlNet condition)."""
        live, live_estimator = self.renderer.geometry, getattr(self.renderer, "estimator", None)
        self.renderer.set_geometry(self.frozen_geometry)
        if self.frozen_estimator is not None:
            self.renderer.estimator = self.frozen_estimator
        try:
            return self.renderer(**batch)["comp_rgb"]
        finally:
            self.renderer.set_geometry(live)
            if self.frozen_estimator is not None:
                self.renderer.estimator = live_estimator

    def _reference_terms(self, ref: dict, stage: Stage, terms: dict) -> None:
        names = [n for n in ("rgb", "mask", "depth") if self._weight(stage, n) > 0]
        if not names:
            return
        out = self.renderer(**ref, return_normal=False)
        mask = ref["mask"].float()
        if "rgb" in names:
            target = ref["rgb"] * mask + out["comp_rgb_bg"] * (1 - mask)
            terms["rgb"] = (F.mse_loss(out["comp_rgb"], target), self._weight(stage, "rgb"))
        if "mask" in names:
            # the host's BCE: F.binary_cross_entropy is refused under CUDA autocast (16-mixed)
            terms["mask"] = (binary_cross_entropy(out["opacity"].clamp(1e-5, 1 - 1e-5).float(), mask),
                             self._weight(stage, "mask"))
        if "depth" in names:
            if "ref_depth" not in ref:
                raise ValueError(f"stage {stage.name!r} weighs the depth loss but there is no reference depth: set "
                                 "data.depth_path (animate124 preprocess writes depth.png) or drop the weight")
            terms["depth"] = (pearson_depth_loss(out["depth"], ref["ref_depth"], ref["mask"]), self._weight(stage, "depth"))

    def _normal_smoothness(self, out: dict, stage: Stage, terms: dict) -> None:
        w = self._weight(stage, "normal_smoothness_2d")
        if w > 0 and "comp_normal" in out:
            n = out["comp_normal"]
            value = (n[:, 1:] - n[:, :-1]).square().mean() + (n[:, :, 1:] - n[:, :, :-1]).square().mean()
            terms["normal_smoothness_2d"] = (value, w)

    def _density_terms(self, out: dict, stage: Stage, terms: dict) -> None:
        if self._weight(stage, "sparsity") > 0:
            terms["sparsity"] = ((out["opacity"] ** 2 + 0.01).sqrt().mean(), self._weight(stage, "sparsity"))
        if self._weight(stage, "opaque") > 0:
            terms["opaque"] = (binary_cross_entropy(out["opacity"].clamp(1e-3, 1 - 1e-3),
                                                    out["opacity"].clamp(1e-3, 1 - 1e-3)), self._weight(stage, "opaque"))

    # ---- validation / test -------------------------------------------------------------------------------------

    def _save_views(self, prefix: str, out: dict, batch: dict) -> None:
        imgs = [{"type": "rgb", "img": out["comp_rgb"][0], "kwargs": {"data_format": "HWC"}}]
        if "comp_normal" in out:
            imgs.append({"type": "rgb", "img": out["comp_normal"][0], "kwargs": {"data_format": "HWC", "data_range": (0, 1)}})
        imgs.append({"type": "grayscale", "img": out["opacity"][0, :, :, 0], "kwargs": {"cmap": None, "data_range": (0, 1)}})
        self.save_image_grid(f"{prefix}.png", imgs, name=None, step=self.true_global_step)

    def validation_step(self, batch, batch_idx):
        out = self(batch)
        self._save_views(f"it{self.true_global_step}-val/{int(batch['index'][0])}", out, batch)

    def _rank_zero_after_barrier(self) -> bool:
        """Under DDP every rank renders its share of the views; one rank assembles the videos once all are on disk."""
        trainer = getattr(self, "_trainer", None)  # None when called outside a Trainer (e.g. an export script)
        if trainer is not None and trainer.world_size > 1:
            trainer.strategy.barrier()
        return self.global_rank == 0

    def on_validation_epoch_end(self):
        if not self._rank_zero_after_barrier():
            return
        step = self.true_global_step
        self.save_img_sequence(f"it{step}-val", f"it{step}-val", r"(\d+)\.png", save_format=_video_format(), fps=16,
                               name="validation_video", step=step)

    def test_step(self, batch, batch_idx):
        out = self(batch)
        name = batch["trajectory"][0]
        self._save_views(f"it{self.true_global_step}-test/{name}/{int(batch['index'][0])}", out, batch)

    def on_test_epoch_end(self):
        if self._rank_zero_after_barrier():
            self._write_test_videos()

    def _write_test_videos(self) -> None:
        step = self.true_global_step
        root = os.path.join(self.get_save_dir(), f"it{step}-test")
        if not os.path.isdir(root):
            return
        for name in sorted(os.listdir(root)):
            self.save_img_sequence(f"it{step}-test-{name}", f"it{step}-test/{name}", r"(\d+)\.png",
                                   save_format=_video_format(), fps=16, name=f"test_{name}", step=step)


def _ensure_tiny_models(out_dir: str) -> None:
    """Write the tiny random models once (rank 0 first; others wait for its marker file)."""
    from animate124.core.tiny_models import ALL_KINDS, make_tiny_models

    marker = os.path.join(out_dir, ".complete")
    if os.path.exists(marker):
        return
    if int(os.environ.get("LOCAL_RANK", 0)) == 0:
        threestudio.info(f"making tiny random models in {out_dir} (smoke run)")
        make_tiny_models(out_dir, kinds=ALL_KINDS)
        _write_smoke_image(os.path.join(out_dir, "smoke_rgba.png"))
        _write_smoke_embedding(os.path.join(out_dir, "smoke_embeds.safetensors"), os.path.join(out_dir, "sd"))
        open(marker, "w").close()
    else:
        while not os.path.exists(marker):
            time.sleep(1)


def _write_smoke_image(path: str, size: int = 128) -> None:
    """A procedural RGBA subject for smoke runs (a coloured disc with two 'ears' on a transparent background)."""
    from PIL import Image, ImageDraw

    img = Image.new("RGBA", (size, size), (0, 0, 0, 0))
    draw = ImageDraw.Draw(img)
    s = size / 128
    draw.ellipse([34 * s, 40 * s, 94 * s, 100 * s], fill=(235, 235, 235, 255))
    for x in (30, 78):
        draw.ellipse([x * s, 28 * s, (x + 20) * s, 48 * s], fill=(30, 30, 30, 255))
    draw.ellipse([50 * s, 62 * s, 78 * s, 80 * s], fill=(200, 60, 60, 255))
    img.save(path)


def _write_smoke_embedding(path: str, sd_dir: str) -> None:
    """A random textual-inversion embedding sized for the tiny SD text encoder."""
    from safetensors.torch import save_file
    from transformers import CLIPTextConfig

    width = CLIPTextConfig.from_pretrained(os.path.join(sd_dir, "text_encoder")).hidden_size
    save_file({"_smoke_token_": torch.randn(width, generator=torch.Generator().manual_seed(0))}, path)


def _video_format() -> str:
    """mp4 needs imageio-ffmpeg (imageio otherwise picks a writer that rejects fps); fall back to gif, once warned."""
    import importlib.util

    if importlib.util.find_spec("imageio_ffmpeg") is not None:
        return "mp4"
    threestudio.warn("imageio-ffmpeg is not installed: writing videos as gif (pip install imageio-ffmpeg for mp4)")
    return "gif"


def _host_zero123_alias() -> None:
    """Zero123 diffusers folders name their camera projection's library ``zero123`` (the host's
    ``extern/zero123.py``); diffusers >= 0.3x no longer imports a library it is only named, so the host's
    ``zero123-unified-guidance`` fails to load them. Make that name resolve to the host module."""
    import sys

    if "zero123" not in sys.modules:
        try:
            import extern.zero123 as host_zero123
        except ImportError:
            return
        sys.modules["zero123"] = host_zero123


def pearson_depth_loss(depth, ref_depth, mask) -> torch.Tensor:
    """(1 - Pearson correlation) / 2 between rendered depth and 1 - relative depth, inside the mask (upstream main):
    the reference is larger-is-nearer, rendered depth is larger-is-farther."""
    m = mask[..., 0] if mask.shape[-1] == 1 else mask
    pred = depth[..., 0][m]
    target = (1.0 - ref_depth[..., 0])[m]
    if pred.numel() < 2:
        return depth.sum() * 0.0
    pred, target = pred - pred.mean(), target - target.mean()
    corr = (pred * target).sum() / (pred.norm() * target.norm() + 1e-8)
    return (1.0 - corr) / 2.0
