"""Reliability through real threestudio on CPU with tiny models: the NaN guard, the checks before step 0, resume.

Each bad-input case asserts the one-line message, that nothing started (no system built, no step, no checkpoint) and
that nothing on disk changed.
"""
from __future__ import annotations

import copy
import os
import pickle
from pathlib import Path

import pytest
import torch
from test_system_integration import REF, _config, _run

NAN_STEPS: set = set()  # global steps at which the poisoned SD guidance returns a NaN loss
_CURRENT = {"step": -1}


@pytest.fixture()
def run_dir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the host's prompt cache is relative to the working directory
    return tmp_path


@pytest.fixture()
def rgba(shared_data):
    return shared_data / "examples" / REF / "rgba.png"


def _write_embeds(path, width=32, tokens=1, key="_tiny_tok_") -> Path:
    from safetensors.torch import save_file

    state = {f"{key}{i}" if i else key: torch.randn(width) for i in range(tokens)}
    save_file(state, str(path))
    return Path(path)


def _snapshot(folder: Path) -> dict:
    """Every file under folder -> its bytes (what 'nothing on disk changed' compares)."""
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _poison_sd(monkeypatch):
    """The host's SD guidance returns NaN at the global steps in NAN_STEPS (an injected fault, named 'sd:sds')."""
    import pytorch_lightning as pl
    from threestudio.models.guidance.stable_diffusion_guidance import StableDiffusionGuidance

    original = StableDiffusionGuidance.__call__

    def poisoned(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        if _CURRENT["step"] in NAN_STEPS:
            out["loss_sds"] = out["loss_sds"] * float("nan")
        return out

    monkeypatch.setattr(StableDiffusionGuidance, "__call__", poisoned)

    class StepClock(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            _CURRENT["step"] = trainer.global_step

    return StepClock()


def _optimizer_state(optimizer) -> dict:
    return copy.deepcopy(optimizer.state_dict()["state"])


def _params(module) -> dict:
    return {k: v.detach().clone() for k, v in module.state_dict().items() if k.startswith("geometry.")}


def _assert_same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        if isinstance(a[k], dict):
            _assert_same(a[k], b[k])
        else:
            assert torch.equal(torch.as_tensor(a[k]), torch.as_tensor(b[k])), k


def _changed(a: dict, b: dict) -> bool:
    return any(not torch.equal(a[k], b[k]) for k in a)


class _BeforeAfter:
    """Parameters and Adam state at the start and end of every step."""

    def __new__(cls):
        import pytorch_lightning as pl

        class BeforeAfter(pl.Callback):
            def __init__(self):
                self.before, self.after = {}, {}

            def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
                step = trainer.global_step
                self.before[step] = (_params(pl_module), _optimizer_state(trainer.optimizers[0]))

            def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
                step = trainer.global_step - 1
                self.after[step] = (_params(pl_module), _optimizer_state(trainer.optimizers[0]))

        return BeforeAfter()


# ---- NaN / inf ------------------------------------------------------------------------------------------------------


def test_nan_loss_step_is_skipped_and_counted_params_and_adam_state_untouched(threestudio, tiny_models, rgba, run_dir,
                                                                              monkeypatch):
    from animate124.components.nonfinite_guard import NonfiniteCheckpointError, NonfiniteGuard

    clock = _poison_sd(monkeypatch)
    NAN_STEPS.clear()
    NAN_STEPS.add(1)
    rec = _BeforeAfter()
    cfg, system, trainer = _run(threestudio, _config(tiny_models, rgba, run_dir, steps=(3, 1, 1)), run_dir,
                                max_steps=3, callbacks=[clock, rec])
    NAN_STEPS.clear()
    # step 1: nothing moved, not the parameters, not Adam's moments or its step count
    _assert_same(rec.before[1][0], rec.after[1][0])
    _assert_same(rec.before[1][1], rec.after[1][1])
    # steps 0 and 2 trained
    assert _changed(rec.before[0][0], rec.after[0][0]) and _changed(rec.before[2][0], rec.after[2][0])
    step_counts = {int(s["step"]) for s in rec.after[2][1].values()}
    assert step_counts == {2}, step_counts  # Adam stepped twice (steps 0 and 2), not three times
    guard = next(cb for cb in trainer.callbacks if isinstance(cb, NonfiniteGuard))
    assert (guard.skipped, guard.in_row) == (1, 0)
    assert float(trainer.callback_metrics["train/nonfinite_skipped"]) == 1.0
    # a checkpoint holding NaN is refused and the existing one is untouched
    last = Path(cfg.trial_dir) / "ckpts" / "last.ckpt"
    before = last.read_bytes()
    with torch.no_grad():
        next(system.geometry.parameters()).view(-1)[0] = float("nan")
    with pytest.raises(NonfiniteCheckpointError, match=r"refusing to write a checkpoint at step 3: non-finite tensors "
                                                        r"\['state_dict\.geometry\."):
        trainer.save_checkpoint(str(last))
    assert last.read_bytes() == before
    with pytest.raises(NonfiniteCheckpointError):
        trainer.save_checkpoint(str(last.with_name("new.ckpt")))
    assert not last.with_name("new.ckpt").exists()


def test_nan_steps_in_a_row_stop_the_run_naming_step_stage_and_terms(threestudio, tiny_models, rgba, run_dir,
                                                                     monkeypatch):
    from animate124.components.nonfinite_guard import NonfiniteTrainingError

    clock = _poison_sd(monkeypatch)
    NAN_STEPS.clear()
    NAN_STEPS.update({1, 2, 3})
    text = _config(tiny_models, rgba, run_dir, steps=(4, 1, 1)).replace(
        "  anchor_interval: 2", "  anchor_interval: 2\n  max_nonfinite_steps: 2").replace(
        "every_n_train_steps: 5", "every_n_train_steps: 1")
    rec = _BeforeAfter()
    with pytest.raises(NonfiniteTrainingError) as info:
        _run(threestudio, text, run_dir, max_steps=4, callbacks=[clock, rec])
    NAN_STEPS.clear()
    assert str(info.value).startswith("stopped at step 2 (stage 'static'): 2 steps in a row had non-finite loss terms "
                                      "['sd:sds']"), str(info.value)
    assert "max_nonfinite_steps" in str(info.value)
    assert sorted(rec.before) == [0, 1, 2]  # step 3 never ran
    # parameters stayed as after step 0; every checkpoint written is finite and holds them
    after0 = rec.after[0][0]
    _assert_same(after0, rec.before[2][0])
    ckpts = sorted((run_dir / "outputs").rglob("*.ckpt"))
    assert ckpts
    for path in ckpts:
        state = torch.load(path, map_location="cpu", weights_only=False)
        for key, value in state["state_dict"].items():
            assert torch.isfinite(value).all(), (path.name, key)
        _assert_same(after0, {k: v for k, v in state["state_dict"].items() if k.startswith("geometry.")})


def test_guard_unit_rules(threestudio):
    """Direct calls: a finite step resets the count; a gradient overflow under a grad scaler is skipped but not
    counted; the step of a NaN gradient leaves Adam's parameters and state as they were."""
    from types import SimpleNamespace

    from animate124.components.nonfinite_guard import NonfiniteGuard, nonfinite_tensors

    p = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.Adam([p], lr=0.1)
    p.grad = torch.ones(3)
    opt.step()
    state = copy.deepcopy(opt.state_dict())
    module = SimpleNamespace(true_global_step=7, current_stage=lambda: SimpleNamespace(name="dynamic"),
                             log=lambda *a, **k: None, named_parameters=lambda: [("w", p)])
    guard = NonfiniteGuard(max_in_row=2)
    trainer = SimpleNamespace(callback_metrics={"train/loss": torch.tensor(1.0)}, precision_plugin=None,
                              strategy=SimpleNamespace())
    p.grad = torch.tensor([1.0, float("inf"), 0.0])
    guard.on_before_optimizer_step(trainer, module, opt)
    assert p.grad is None and guard.in_row == 1 and guard.skipped == 1
    opt.step()
    assert torch.allclose(p.detach(), torch.full((3,), 0.9))  # as after the first (real) step
    _assert_same(state["state"], opt.state_dict()["state"])
    p.grad = torch.ones(3)
    guard.on_before_optimizer_step(trainer, module, opt)  # finite: the count restarts
    assert p.grad is not None and guard.in_row == 0
    scaled = SimpleNamespace(callback_metrics={"train/loss": torch.tensor(1.0)},
                             precision_plugin=SimpleNamespace(scaler=object()), strategy=SimpleNamespace())
    for _ in range(3):  # fp16 overflow with a finite loss: the scaler's business, never stops the run
        p.grad = torch.full((3,), float("inf"))
        guard.on_before_optimizer_step(scaled, module, opt)
    assert guard.in_row == 0 and guard.skipped == 4
    assert nonfinite_tensors({"a": [torch.ones(2), torch.tensor([float("nan")])], "b": torch.arange(3)}) == ["a[1]"]
    with pytest.raises(ValueError, match="max_nonfinite_steps=0 must be >= 1"):
        NonfiniteGuard(0)
