"""``a124-system``: every Animate124 stage (static -> dynamic -> refine) inside ONE run, switched by the step.

``stages:`` (:mod:`animate124.core.training.stages`) says per stage how many steps it runs, which guidance slots are active,
the loss weights, the learning rate of each parameter group and which groups train. Slots are declared once under
``guidances:`` with any host or a124 guidance; a slot is loaded when a stage that uses it starts and freed when the
stage that follows does not use it. What each step renders and weighs is :func:`animate124.core.training.step_plan.plan_step`;
this class executes the plan. Stage timing / VRAM: :mod:`animate124.components.stage_records`.
"""
from __future__ import annotations

import copy
import functools
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

import threestudio
import torch
from threestudio.systems.base import BaseLift3DSystem

from animate124.components import preflight
from animate124.components.choices import check_choice
from animate124.components.ddp_check import DDPConsistencyCheck
from animate124.components.eval_outputs import EvalOutputsMixin
from animate124.components.guidance_slots import GuidanceSlots
from animate124.components.host_compat import load_weights_reporting
from animate124.components.nonfinite_guard import NonfiniteGuard
from animate124.components.stage_records import StageRecords
from animate124.core.guidance.diffusion_networks import COMPILE_MODES, compile_problem
from animate124.core.training import losses
from animate124.core.training.stages import PARAM_GROUPS, Stage, parse_stages, stage_at, starts_later_stage
from animate124.core.training.step_plan import StepRecord, check_weights, parse_slots, plan_step, slot_weight


@threestudio.register("a124-system")
class Animate124System(EvalOutputsMixin, BaseLift3DSystem):
    @dataclass
    class Config(BaseLift3DSystem.Config):
        stages: Any = field(default_factory=dict)
        """The stage schedule: {name: {steps, guidances, loss_weights, learning_rates, trainable}} in order (or the
        older list of {name, ...}; keys checked, unknown ones named); the configs set trainer.max_steps to their sum."""
        guidances: dict = field(default_factory=dict)
        """Guidance slots: name -> {guidance_type, guidance, prompt_processor_type, prompt_processor, input}, input
        one of image (random view at t = 0) | video (the clip) | controlnet (the clip + a condition render)."""
        controlnet_condition: str = "frozen"
        """ControlNet condition: ``frozen`` = render of a copy frozen at stage start (upstream main); ``current`` =
        the detached current render (upstream threestudio)."""
        anchor_interval: int = 0
        """Video stages anchor (reference-view losses + image slots at t = 0) on clips that start at t = 0, as
        upstream threestudio; k > 0 also anchors every k-th step (ours before; less drift, maybe damped motion)."""
        static_ref_interval: int = 1
        """Image-only stages: reference-view losses every this many steps (upstream: every step)."""
        fresh_optimizer_per_stage: bool = True
        """Reset the optimizer state (Adam moments) at each stage start, as upstream's separate runs per stage."""
        time_smoothness_points: int = 4096
        """Random points at which ``time_smoothness`` compares the 4-D grid at t and t + dt."""
        time_smoothness_dt: float = 0.0625
        """The time offset of ``time_smoothness`` (one frame of a 16-frame clip)."""
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
        """Smoke runs only: the folder of the tiny random models; the system does not read it (the smoke config's
        ``${a124_smoke_assets:...}`` resolver makes the models there)."""
        max_nonfinite_steps: int = 5
        """Steps with a NaN/inf loss or gradient are skipped; this many in a row stop the run (nonfinite_guard)."""
        min_free_vram_gb: Optional[float] = None
        """Refuse to start with less free GPU memory than this (None: no check); the message names the lowvram config."""
        compile_denoisers: Optional[str] = None
        """Speed up the frozen U-Nets / ControlNets of each guidance slot when it loads: null (off); cuda-graphs
        (their no-grad forwards recorded and replayed as CUDA graphs, no compilation); ``torch.compile`` with mode
        default or max-autotune-no-cudagraphs (``core.diffusion_networks.COMPILE_MODES``). CUDA only (skipped,
        logged once, elsewhere); each stage's first calls per network and shape record / compile, which the
        benchmark counts in ``switch_s``."""
        compile_vae_encoder: bool = False
        """With a ``torch.compile`` mode of ``compile_denoisers``: also compile the VAE encoders (they run with
        gradient, so ``cuda-graphs`` cannot take them)."""

        def __post_init__(self) -> None:
            check_choice("a124-system", "controlnet_condition", self.controlnet_condition, ("frozen", "current"))
            if self.compile_denoisers is not None:
                check_choice("a124-system", "compile_denoisers", self.compile_denoisers, COMPILE_MODES + ("null",))
                if self.compile_denoisers == "null":  # --set system.compile_denoisers=null on some command lines
                    self.compile_denoisers = None
            if self.compile_denoisers is not None:
                problem = compile_problem(torch.device("cuda" if torch.cuda.is_available() else "cpu"),
                                          mode=self.compile_denoisers)
                if problem:
                    raise ValueError(f"a124-system: compile_denoisers={self.compile_denoisers!r}: {problem}")
            if self.compile_vae_encoder and self.compile_denoisers in (None, "cuda-graphs"):
                why = ("compiles nothing while compile_denoisers is null" if self.compile_denoisers is None else
                       "needs a torch.compile mode (the encoders run with gradient, which CUDA graphs here do not "
                       "take)")
                raise ValueError(f"a124-system: compile_vae_encoder=true {why}: set compile_denoisers=default, or "
                                 "compile_vae_encoder=false")

    cfg: Config

    last_step: Optional[StepRecord] = None
    """What the last training step computed (stage, slots, each term's value and weight, the total); the non-finite
    guard reads it."""

    def __init__(self, cfg, resumed: bool = False) -> None:
        preflight.check_system_settings(self.Config, cfg)  # all typos at once, before the host's parse stops at one
        super().__init__(cfg, resumed)

    def configure(self) -> None:
        try:
            self.stages: tuple[Stage, ...] = parse_stages(self.cfg.stages)
        except (ValueError, TypeError) as error:  # e.g. a stage an override misspells: one line, nothing started
            preflight.raise_if([f"system.{error}"])
        self.slots = parse_slots(self.cfg.guidances)
        check_weights(self.stages, self.slots, self.cfg.static_ref_interval)
        # every stage's inputs and every component's keys, before the host builds geometry / renderer (a typo there
        # would stop it with a bare TypeError) and before any model loads
        preflight.check_system(self.cfg, self.slots, self.stages)
        super().configure()
        self.guidance_slots = GuidanceSlots(self.slots, self.cfg.compile_denoisers, self.cfg.compile_vae_encoder)
        self._stage_index: Optional[int] = None
        self.frozen_geometry = self.frozen_estimator = None
        self._ddp_grad_masking = False
        self._seed, self._generator, self._generator_state = torch.initial_seed(), None, None

    def configure_callbacks(self):
        return [StageRecords(), NonfiniteGuard(self.cfg.max_nonfinite_steps), preflight.OutputFolderCheck(),
                DDPConsistencyCheck()]

    def load_weights(self, weights: str, ignore_modules: Optional[List[str]] = None) -> None:
        self.weights_report = load_weights_reporting(self, weights, ignore_modules, self.cfg.strict_weights,
                                                     skip_missing=("frozen_geometry.", "frozen_estimator."))

    def configure_optimizers(self):
        opt = self.cfg.optimizer or {}
        name, args = opt.get("name", "Adam"), dict(opt.get("args", {}))
        args.pop("lr", None)  # learning rates come from the stages
        if not hasattr(torch.optim, name) or self.cfg.scheduler is not None:
            raise ValueError(f"system.optimizer.name={name!r} / system.scheduler: a124-system builds torch.optim "
                             "optimizers (Adam, AdamW, ...) without a scheduler; learning rates are set per stage")
        groups, seen = [], set()
        for group, module in self._param_modules().items():
            params = [p for p in module.parameters() if id(p) not in seen]
            seen.update(id(p) for p in params)
            if params:
                groups.append({"params": params, "name": group, "lr": self.stages[0].learning_rates.get(group, 0.0)})
        return getattr(torch.optim, name)(groups, lr=0.0, **args)

    def on_fit_start(self) -> None:
        preflight.raise_if(preflight.check_max_steps(self.trainer.max_steps, self.stages))
        data_cfg = getattr(getattr(self.trainer, "datamodule", None), "cfg", None)  # known once the data is attached
        if data_cfg is not None and hasattr(data_cfg, "depth_path"):
            check_weights(self.stages, self.slots, self.cfg.static_ref_interval, bool(data_cfg.depth_path))

    def on_load_checkpoint(self, checkpoint: Dict[str, Any]) -> None:
        # resume= from a run with other sizes: named settings instead of load_state_dict's size-mismatch traceback
        path = str(getattr(getattr(self, "_trainer", None), "ckpt_path", None) or "the checkpoint")
        preflight.raise_if(preflight.checkpoint_size_problems("resume", path, checkpoint.get("state_dict", {}), self,
                                                              self.cfg))
        # a run resumed mid-refine needs the frozen copy before its weights load
        if any(k.startswith(("frozen_geometry.", "frozen_estimator.")) for k in checkpoint.get("state_dict", {})):
            self._make_frozen_copy()
        self._generator_state = checkpoint.get("a124_generator_state")

    def on_save_checkpoint(self, checkpoint: Dict[str, Any]) -> None:
        if self._generator is not None:
            checkpoint["a124_generator_state"] = self._generator.get_state()

    def _make_frozen_copy(self) -> None:
        """The model as the ControlNet stage starts: geometry and its occupancy grid (so the condition render is not
        pruned by the live model's grid as it drifts)."""
        if self.frozen_geometry is None:
            self.frozen_geometry = copy.deepcopy(self.geometry).requires_grad_(False).eval()
            if getattr(self.renderer, "estimator", None) is not None:
                self.frozen_estimator = copy.deepcopy(self.renderer.estimator)

    def current_stage(self) -> Stage:
        return stage_at(self.stages, self.true_global_step).stage

    def _param_modules(self) -> Dict[str, torch.nn.Module]:
        found = {g: functools.reduce(lambda obj, a: getattr(obj, a, None), group.path.split("."), self)
                 for g, group in PARAM_GROUPS.items()}
        return {group: module for group, module in found.items() if module is not None}

    def _enter_stage(self) -> Stage:
        """Set up the stage of the current step once: slots, trainable groups, learning rates, optimizer, frozen copy."""
        pos = stage_at(self.stages, self.true_global_step)
        if starts_later_stage(self.stages, self.true_global_step) and self.cfg.fresh_optimizer_per_stage:
            self.trainer.optimizers[0].state.clear()  # Adam re-initialises its moments lazily at the next step
        if pos.index == self._stage_index:
            return pos.stage
        self._stage_index, stage = pos.index, pos.stage
        self.guidance_slots.keep_only(stage.guidances, self.device, self.true_current_epoch, self.true_global_step)
        for group, module in self._param_modules().items():
            # DDP builds its gradient hooks once, for the parameters that require grad then: under DDP every group
            # keeps requires_grad and frozen groups get their gradients dropped before the step instead
            module.requires_grad_(stage.trains(group) or self._ddp_grad_masking)
        for pg in self.trainer.optimizers[0].param_groups:
            pg["lr"] = stage.learning_rates.get(pg["name"], 0.0) if stage.trains(pg["name"]) else 0.0
        if self.cfg.controlnet_condition == "frozen" and any(self.slots[g].input == "controlnet" for g in stage.guidances):
            self._make_frozen_copy()
        threestudio.info(f"stage {pos.index + 1}/{len(self.stages)} '{stage.name}' from step {self.true_global_step}: "
                         f"guidances {list(stage.guidances)}")
        return stage

    def setup(self, stage: str) -> None:
        # before the strategy wraps the model: under DDP freeze by dropping gradients, never by requires_grad
        trainer = getattr(self, "_trainer", None)
        self._ddp_grad_masking = trainer is not None and trainer.world_size > 1
        if self._ddp_grad_masking:
            for module in self._param_modules().values():
                module.requires_grad_(True)

    def on_before_optimizer_step(self, optimizer) -> None:
        if self._ddp_grad_masking:
            stage = self.current_stage()
            for group, module in self._param_modules().items():
                if not stage.trains(group):
                    for p in module.parameters():
                        p.grad = None

    def update_step(self, epoch: int, global_step: int, on_load_weights: bool = False) -> None:
        self.guidance_slots.update_step(epoch, global_step, on_load_weights)

    def forward(self, batch: Dict[str, Any]) -> Dict[str, Any]:
        return self.renderer(**batch)

    def generator(self) -> torch.Generator:
        """The system's random stream (render jitter, time-smoothness points), seeded from the run's seed."""
        if self._generator is None or self._generator.device != self.device:
            self._generator = torch.Generator(device=self.device).manual_seed(self._seed)
            if self._generator_state is not None:
                self._generator.set_state(self._generator_state)
        return self._generator

    def training_step(self, batch, batch_idx):
        stage = self._enter_stage()
        weights = {k: float(self.C(list(v) if isinstance(v, tuple) else v)) for k, v in stage.loss_weights.items()}
        plan = plan_step(stage, self.slots, weights, self.true_global_step, bool(batch["video"].get("start_from_zero")),
                         self.cfg.anchor_interval, self.cfg.static_ref_interval)
        outs = {view: self.renderer(**batch[view], return_normal=normal, generator=self.generator())
                for view, normal in plan.renders.items()}
        terms: Dict[str, tuple] = {}  # name -> (value, weight)
        for name, view in plan.slots:
            rgb = outs[view]["comp_rgb"]
            cond = None
            if self.slots[name].input == "controlnet":
                cond = self._render_frozen(batch[view]) if self.cfg.controlnet_condition == "frozen" else rgb.detach()
            for key, value in self.guidance_slots(name, rgb, batch[view], cond, self.log).items():
                terms[f"{name}:{key}"] = (value, slot_weight(weights, name, key))
        generator = self.generator()
        for name, (view, weight) in plan.terms.items():
            inputs = losses.LossInputs(outs.get(view), batch.get(view), self.geometry, self.cfg, generator)
            terms[name] = (losses.LOSSES[name].compute(inputs), weight)
        loss = sum((value * weight for value, weight in terms.values()), torch.zeros((), device=self.device))
        for name, (value, _) in terms.items():
            self.log(f"train/loss_{name}", value)
        for name, weight in weights.items():
            self.log(f"train_params/lambda_{name}", weight)
        self.log("train/stage", float(self._stage_index))
        self.log("train/loss", loss, prog_bar=True)
        # detached tensors, not floats: reading a value waits for the GPU, and a wait here, before the backward is
        # launched, idles it
        self.last_step = StepRecord(stage.name, tuple(n for n, _ in plan.slots), plan.anchor, loss.detach(),
                                    {n: value.detach() for n, (value, _) in terms.items()},
                                    {n: weight for n, (_, weight) in terms.items()})
        return {"loss": loss}

    @torch.no_grad()
    def _render_frozen(self, view_batch: dict) -> torch.Tensor:
        """Render the clip with the geometry (and occupancy grid) frozen at stage start: the ControlNet condition."""
        live, live_estimator = self.renderer.geometry, getattr(self.renderer, "estimator", None)
        self.renderer.set_geometry(self.frozen_geometry)
        if self.frozen_estimator is not None:
            self.renderer.estimator = self.frozen_estimator
        try:
            return self.renderer(**view_batch, generator=self.generator())["comp_rgb"]
        finally:
            self.renderer.set_geometry(live)
            if self.frozen_estimator is not None:
                self.renderer.estimator = live_estimator
