"""A non-finite loss or gradient skips the optimiser step; after N in a row the run stops; checkpoints stay finite.

The system returns :class:`NonfiniteGuard` from ``configure_callbacks``. Before each optimiser step the guard looks at
the loss terms of the step (the system's ``last_step`` record; for another system, the logged ``train/loss*``) and at
every gradient of the optimiser. When one is NaN or inf it sets every gradient to ``None``: torch optimisers skip
parameters without a gradient, so neither the parameters nor the optimiser state (Adam's moments and step count)
change. The skip is counted (``train/nonfinite_skipped``) and warned; ``max_in_row`` skipped steps in a row stop the
run with :class:`NonfiniteTrainingError`, naming the step, the stage and the non-finite terms.

Under 16-bit mixed precision an overflowing *gradient* with a finite loss is the grad scaler's business (it skips the
step and lowers its scale, routinely early in training): such steps are skipped but not counted towards the stop.

A run usually diverges before its loss turns non-finite (parameters grown by a learning rate too high), and the
checkpoints written meanwhile hold those parameters: resuming from the latest fails again at once. The guard keeps
each step's total loss, and the stop names the last checkpoint written before the divergence began
(:mod:`animate124.core.training.divergence`).
"""
from __future__ import annotations

import collections
import math
import os
from typing import Any, Dict, List, Optional

import pytorch_lightning as pl
import threestudio
import torch

from animate124.core.training.divergence import checkpoint_before, divergence_onset


class NonfiniteTrainingError(RuntimeError):
    """Training produced non-finite losses or gradients for too many steps in a row."""


class NonfiniteCheckpointError(RuntimeError):
    """A checkpoint about to be written holds NaN/inf tensors (it is not written)."""


def nonfinite_tensors(tree: Any, prefix: str = "") -> List[str]:
    """Names (dotted paths) of floating-point tensors in a nested dict/list holding NaN or inf."""
    bad: List[str] = []
    if torch.is_tensor(tree):
        if tree.is_floating_point() and not bool(torch.isfinite(tree).all()):
            bad.append(prefix or "<tensor>")
    elif isinstance(tree, dict):
        for key, value in tree.items():
            bad += nonfinite_tensors(value, f"{prefix}.{key}" if prefix else str(key))
    elif isinstance(tree, (list, tuple)):
        for i, value in enumerate(tree):
            bad += nonfinite_tensors(value, f"{prefix}[{i}]")
    return bad


def _named(bad: List[str]) -> List[str]:
    """The total is non-finite whenever a term is: name the terms, or the total ("loss") when no term is."""
    return [b for b in bad if b != "loss"] or bad


def _uses_grad_scaler(trainer: pl.Trainer) -> bool:
    plugin = getattr(trainer, "precision_plugin", None) or getattr(trainer.strategy, "precision_plugin", None)
    return getattr(plugin, "scaler", None) is not None


class NonfiniteGuard(pl.Callback):
    def __init__(self, max_in_row: int) -> None:
        super().__init__()
        if max_in_row < 1:
            raise ValueError(f"system.max_nonfinite_steps={max_in_row} must be >= 1 (skipped steps in a row before "
                             "the run stops)")
        self.max_in_row = max_in_row
        self.in_row = 0
        self.skipped = 0
        self.first_bad: Optional[int] = None  # the first step of the current run of non-finite steps
        self.losses: collections.deque = collections.deque(maxlen=1000)  # (step, stage index, finite total loss)

    # ---- the step ------------------------------------------------------------------------------------------------

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        step = getattr(pl_module, "last_step", None)  # a StepRecord (core/training/step_plan.py)
        terms = dict(step.losses, loss=step.loss) if step is not None else {}
        # one wait for the GPU per step: every term and gradient checked on the device, one flag each read back, with
        # the total loss (kept to find where a divergence began)
        checks = [torch.isfinite(v).all() for v in terms.values()] + [torch.isfinite(p.grad).all() for p in params]
        total = [step.loss.detach().float().reshape(())] if step is not None else []
        values = torch.stack(total + [c.float() for c in checks]).tolist() if total or checks else []
        loss = values[0] if total else float("nan")
        finite = [v > 0.5 for v in values[len(total):]]
        if step is not None:
            bad_terms = _named([name for name, ok in zip(terms, finite) if not ok])
        else:  # a system without last_step: the logged losses
            bad_terms = self._nonfinite_terms(trainer)
        bad_grads = [p for p, ok in zip(params, finite[len(terms):]) if not ok]
        stage_index = getattr(pl_module, "_stage_index", None)
        if not bad_terms and not bad_grads:
            self.in_row, self.first_bad = 0, None
            if math.isfinite(loss):
                self.losses.append((int(pl_module.true_global_step), stage_index, loss))
            return
        for group in optimizer.param_groups:  # torch optimisers skip parameters whose grad is None: a no-op step
            for p in group["params"]:
                p.grad = None
        self.skipped += 1
        step, stage = pl_module.true_global_step, _stage_name(pl_module)
        what = f"loss terms {bad_terms}" if bad_terms else f"gradients of {_param_names(pl_module, bad_grads)}"
        overflow_only = not bad_terms and _uses_grad_scaler(trainer)
        if not overflow_only:
            self.in_row += 1
            if self.first_bad is None:
                self.first_bad = int(step)
        pl_module.log("train/nonfinite_skipped", float(self.skipped))
        if overflow_only:
            return
        threestudio.warn(f"step {step} (stage {stage!r}): non-finite {what}; optimiser step skipped "
                         f"({self.in_row} in a row, stops at {self.max_in_row})")
        if self.in_row >= self.max_in_row:
            where, then = self._resume_from(trainer, stage_index)
            raise NonfiniteTrainingError(
                f"stopped at step {step} (stage {stage!r}): {self.in_row} steps in a row had non-finite {what}; "
                f"{where}: lower that stage's learning rates or the weights of those terms, then {then}; or raise "
                "system.max_nonfinite_steps"
            )

    def _resume_from(self, trainer, stage_index) -> tuple[str, str]:
        """(where the divergence began and the last checkpoint written before it, what to run next)."""
        onset = divergence_onset(list(self.losses), self.first_bad, stage_index)
        since = (f"the loss was non-finite from step {self.first_bad}" if onset == self.first_bad else
                 f"the loss grew abnormally from step {onset} and was non-finite from step {self.first_bad}")
        folders = {cb.dirpath for cb in getattr(trainer, "checkpoint_callbacks", []) if getattr(cb, "dirpath", None)}
        paths = [os.path.join(d, f) for d in folders if os.path.isdir(d) for f in os.listdir(d) if f.endswith(".ckpt")]
        found = checkpoint_before(paths, onset)
        if found is None:
            return (f"{since}, and no checkpoint was written before that (later ones hold the diverging parameters)",
                    "start the run again")
        path, n = found
        return (f"{since}; the last checkpoint written before that is {path} (step {n}; later ones, last.ckpt "
                "included, hold the diverging parameters)", f"resume={path}")

    @staticmethod
    def _nonfinite_terms(trainer) -> List[str]:
        bad = []
        for key, value in trainer.callback_metrics.items():
            if not key.startswith("train/loss"):
                continue
            v = float(value) if torch.is_tensor(value) else value
            if isinstance(v, float) and not math.isfinite(v):
                bad.append(key[len("train/loss_"):] if key.startswith("train/loss_") else "loss")
        return _named(bad)

    # ---- checkpoints ---------------------------------------------------------------------------------------------

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: Dict[str, Any]) -> None:
        bad = nonfinite_tensors(checkpoint.get("state_dict", {}), "state_dict")
        bad += nonfinite_tensors(checkpoint.get("optimizer_states", []), "optimizer_states")
        if bad:
            raise NonfiniteCheckpointError(
                f"refusing to write a checkpoint at step {pl_module.true_global_step}: non-finite tensors "
                f"{bad[:5]}{' ...' if len(bad) > 5 else ''}; the previous checkpoint is kept"
            )

    def state_dict(self) -> Dict[str, Any]:
        return {"in_row": self.in_row, "skipped": self.skipped}

    def load_state_dict(self, state_dict: Dict[str, int]) -> None:
        self.in_row = int(state_dict.get("in_row", 0))
        self.skipped = int(state_dict.get("skipped", 0))


def _stage_name(pl_module) -> str:
    stage = getattr(pl_module, "current_stage", None)
    try:
        return stage().name if callable(stage) else "?"
    except Exception:  # noqa: BLE001 - naming the stage must never hide the real problem
        return "?"


def _param_names(pl_module, params) -> List[str]:
    ids = {id(p) for p in params}
    names = [n for n, p in pl_module.named_parameters() if id(p) in ids]
    return names[:5] + (["..."] if len(names) > 5 else [])
