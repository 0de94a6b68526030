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
from test_system_integration import _config, _run

NAN_STEPS: set = set()  # global steps at which the poisoned SD guidance returns a NaN loss
_CURRENT = {"step": -1}


@pytest.fixture()
def run_dir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the host's prompt cache is relative to the working directory
    return tmp_path


@pytest.fixture()
def rgba(example_rgba):
    return example_rgba


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
    trainer.save_checkpoint(str(last))  # finite: written (Lightning 2.0 writes no last.ckpt without a periodic save)
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


# ---- checks before step 0 --------------------------------------------------------------------------------------------


def _build(threestudio, text: str, cli=()):
    """What launch.py does before the Trainer (the config, the data module, the system), then the data module's
    setup, the first thing Trainer.fit runs (no step, no model load)."""
    from threestudio.utils.config import load_config

    cfg = load_config(text, cli_args=list(cli), from_string=True)
    dm = threestudio.find(cfg.data_type)(cfg.data)
    system = threestudio.find(cfg.system_type)(cfg.system)
    dm.setup("fit")  # what Trainer.fit runs first: the data files are checked here
    return cfg, dm, system


def _unsafe_pickle(path: Path) -> Path:
    class RunsCode:
        def __reduce__(self):
            return (os.system, ("echo this file ran code",))

    with open(path, "wb") as f:
        pickle.dump({"_tok_": RunsCode()}, f)
    return path


def _image(path: Path, mode: str, alpha: int = 255) -> Path:
    from PIL import Image

    size = (16, 16)
    if mode == "RGBA":
        Image.new("RGBA", size, (200, 100, 50, alpha)).save(path)
    elif mode == "text":
        path.write_text("not an image")
    else:
        Image.new(mode, size).save(path)
    return path


# case -> (how to make the config bad: cli overrides or a function(root) returning them, or a text edit; the message)
CASES = {
    "loss_key_typo": (["system.loss.lamda_rgb=1"],
                      "system.loss has keys ['lamda_rgb'], which a124-system does not read: put loss weights in "
                      "system.stages.<stage>.loss_weights"),
    "guidance_type_typo": (("guidance_type: stable-diffusion-guidance", "guidance_type: stable-diffusion-guidanse"),
                           "system.guidances.sd.guidance_type='stable-diffusion-guidanse' is not a registered type: "
                           "did you mean ['stable-diffusion-guidance'"),
    "refine_guidance_type_typo": (("guidance_type: a124-controlnet-tile-guidance",
                                   "guidance_type: a124-controlnet-tile-guidence"),
                                  "system.guidances.cn.guidance_type='a124-controlnet-tile-guidence' is not a "
                                  "registered type: did you mean ['a124-controlnet-tile-guidance'"),
    "prompt_processor_type_typo": (("prompt_processor_type: a124-video-prompt-processor",
                                    "prompt_processor_type: a124-video-prompt-procesor"),
                                   "system.guidances.video.prompt_processor_type='a124-video-prompt-procesor' is not a "
                                   "registered type: did you mean ['a124-video-prompt-processor'"),
    "guidance_key_typo": (["system.guidances.cn.guidance.guidance_scael=3"],
                          "system.guidances.cn.guidance.guidance_scael is not a setting of "
                          "'a124-controlnet-tile-guidance': did you mean ['guidance_scale'"),
    "host_guidance_field": (["system.guidance_type=stable-diffusion-guidance"],
                            "system.guidance_type='stable-diffusion-guidance' is not read by a124-system: declare the "
                            "guidance as a slot under system.guidances"),
    "system_key_typo": (["system.geomtry_type=a124-4d-volume"],
                        "system.geomtry_type is not a setting of 'a124-system': did you mean ['geometry_type'"),
    "renderer_key_typo": (["system.renderer.alpha_thr=0.1"],
                          "system.renderer.alpha_thr is not a setting of 'a124-"),
    "motion_prompt_none": (["system.motion_prompt=null"],
                           "system.motion_prompt is empty (None): give it a value"),
    "num_frames_zero": (["data.video.num_frames=0"], "data.video.num_frames=0 must be a positive integer"),
    "zero_rate_range": (["data.video.zero_rate=1.5"], "data.video.zero_rate=1.5 is a probability: use a value in [0, 1]"),
    "fixed_size_60": (["system.guidances.cn.guidance.fixed_size=60"],
                      "system.guidances.cn.guidance.fixed_size=60 must be a positive multiple of 64 (the latents are "
                      "fixed_size/8 and the U-Net halves them 3 times): use e.g. 64"),
    "video_model_size": (["system.guidances.video.guidance.model_size=[64,60]"],
                         "system.guidances.video.guidance.model_size=[64, 60] must be [H, W], each a positive multiple "
                         "of 64"),
    "refine_prompt_without_token": (["system.guidances.cn.prompt_processor.prompt=a panda is dancing"],
                                    "system.guidances.cn.prompt_processor.prompt='a panda is dancing' has no "
                                    "'<token>': write it where the learned subject goes"),
    "empty_prompt": (('prompt: "a panda is dancing"', 'prompt: " "'),
                     "system.guidances.video.prompt_processor.prompt is empty: write the text this guidance should "
                     "follow"),
    "embedding_missing": (lambda root: [f"system.guidances.cn.prompt_processor.learned_embeds_path={root}/none.bin"],
                          "system.guidances.cn.prompt_processor.learned_embeds_path='{root}/none.bin' does not exist: "
                          "make it with `animate124 invert` or fix the path"),
    "embedding_two_tokens": (lambda root: [f"system.guidances.cn.prompt_processor.learned_embeds_path="
                                           f"{_write_embeds(root / 'two.safetensors', tokens=2)}"],
                             "system.guidances.cn.prompt_processor.learned_embeds_path='{root}/two.safetensors' cannot "
                             "be read (ValueError: textual inversion: '{root}/two.safetensors' must hold exactly one "
                             "embedding tensor"),
    "embedding_wrong_width": (lambda root: [f"system.guidances.cn.prompt_processor.learned_embeds_path="
                                            f"{_write_embeds(root / 'w16.safetensors', width=16)}"],
                              "system.guidances.cn.prompt_processor.learned_embeds_path='{root}/w16.safetensors' holds "
                              "a 16-d embedding but the text encoder is 32-d"),
    "embedding_unsafe_pickle": (lambda root: [f"system.guidances.cn.prompt_processor.learned_embeds_path="
                                              f"{_unsafe_pickle(root / 'evil.bin')}"],
                                "system.guidances.cn.prompt_processor.learned_embeds_path: '{root}/evil.bin' is a "
                                "pickle that calls posix.system when loaded, so it is refused (loading it could run "
                                "any code): convert it to .safetensors"),
    "embedding_ordinary_word": (lambda root: [f"system.guidances.cn.prompt_processor.learned_embeds_path="
                                              f"{_write_embeds(root / 'panda.safetensors', key='panda')}"],
                                "system.guidances.cn.prompt_processor.learned_embeds_path='{root}/panda.safetensors' "
                                "holds token 'panda', which is already the word 'panda</w>' of the tokenizer (every "
                                "'panda' in a prompt would become the learned vector): learn it under a new name, e.g. "
                                "`animate124 invert ... --token _panda_`"),
    "model_path_missing": (["system.guidances.video.guidance.pretrained_model_name_or_path=/nonexistent/t2v"],
                           "system.guidances.video.guidance.pretrained_model_name_or_path='/nonexistent/t2v' is neither "
                           "a local folder nor a hub id (owner/name)"),
    "model_id_malformed": (["system.guidances.sd.prompt_processor.pretrained_model_name_or_path=bad id!"],
                           "system.guidances.sd.prompt_processor.pretrained_model_name_or_path='bad id!' is neither a "
                           "local folder nor a hub id"),
    "image_missing": (lambda root: [f"data.image_path={root}/none.png"],
                      "data.image_path='{root}/none.png' does not exist: fix the path"),
    "image_without_alpha": (lambda root: [f"data.image_path={_image(root / 'rgb.png', 'RGB')}"],
                            "data.image_path='{root}/rgb.png' has no alpha channel (mode RGB): run `animate124 "
                            "preprocess` on it"),
    "image_transparent": (lambda root: [f"data.image_path={_image(root / 'clear.png', 'RGBA', alpha=0)}"],
                          "data.image_path='{root}/clear.png' is fully transparent (alpha 0 everywhere)"),
    "image_not_an_image": (lambda root: [f"data.image_path={_image(root / 'text.png', 'text')}"],
                           "data.image_path='{root}/text.png' is not a readable image"),
    "zero123_condition_missing": (lambda root: [f"system.guidances.zero123.guidance.cond_image_path={root}/none.png"],
                                  "system.guidances.zero123.guidance.cond_image_path='{root}/none.png' does not exist"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_config_fails_before_anything_starts(case, threestudio, tiny_models, rgba, run_dir):
    from animate124.components.preflight import PreflightError

    how, message = CASES[case]
    _write_embeds(run_dir / "embeds.safetensors")
    text, cli = _config(tiny_models, rgba, run_dir, with_cn=True), []
    if isinstance(how, tuple):
        assert how[0] in text
        text = text.replace(how[0], how[1], 1)
    else:
        cli = how(run_dir) if callable(how) else how
    before = _snapshot(run_dir)
    with pytest.raises(PreflightError) as info:
        _build(threestudio, text, cli)
    lines = str(info.value).splitlines()
    assert lines[0] == "1 problem(s) found before step 0; nothing was started:", lines
    assert lines[1].startswith("  - " + message.format(root=run_dir)), lines[1]
    assert "weights_only=False" not in str(info.value)
    assert _snapshot(run_dir) == before  # nothing written, nothing changed
    assert not list(run_dir.rglob("*.ckpt"))


def test_every_problem_is_reported_at_once(threestudio, tiny_models, rgba, run_dir):
    """All of the data module's problems in one list when it is built (before the system and any model), then all of
    the system's in one list when it is built."""
    from animate124.components.preflight import PreflightError

    _write_embeds(run_dir / "embeds.safetensors")
    system_mistakes = ["system.loss.lamda_rgb=1", "system.guidances.cn.guidance.fixed_size=100",
                       "system.guidances.cn.prompt_processor.prompt=a panda"]
    text = _config(tiny_models, rgba, run_dir, with_cn=True)
    with pytest.raises(PreflightError) as info:
        _build(threestudio, text, system_mistakes + ["data.video.num_frames=0", f"data.image_path={run_dir}/none.png"])
    assert [p.split(" ")[0] for p in info.value.problems] == [
        "data.video.num_frames=0", f"data.image_path='{run_dir}/none.png'"]
    with pytest.raises(PreflightError) as info:
        _build(threestudio, text, system_mistakes)
    assert [p.split(" ")[0] for p in info.value.problems] == [
        "system.loss", "system.guidances.cn.prompt_processor.prompt='a", "system.guidances.cn.guidance.fixed_size=100"]
    assert "use e.g. 128" in info.value.problems[2]


def test_no_cuda_and_too_little_vram(threestudio, tiny_models, rgba, run_dir, monkeypatch):
    import threestudio.utils.misc as misc

    from animate124.components.preflight import PreflightError

    text = _config(tiny_models, rgba, run_dir)
    monkeypatch.setattr(misc, "get_device", lambda: torch.device("cuda:0"))  # where launch.py places components
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(PreflightError, match=r"CUDA is not available \(torch .*\): animate124 trains on an NVIDIA GPU; "
                                             r"torch is (a CPU-only build|built for CUDA .* but sees no GPU).*smoke"):
        _build(threestudio, text)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (3 * 2**30, 80 * 2**30))
    with pytest.raises(PreflightError) as info:
        _build(threestudio, text, ["system.min_free_vram_gb=20"])
    assert info.value.problems == [
        "3.0 GiB of GPU memory is free on cuda:0 (80 GiB total) but this config needs about 20 GiB "
        "(system.min_free_vram_gb): free the GPU, use a lighter config (configs/animate124-lowvram.yaml), or set "
        "system.min_free_vram_gb=null to try anyway"]
    _build(threestudio, text, ["system.min_free_vram_gb=2.5"])  # enough: builds


def test_output_folder_without_room_stops_at_fit_start(threestudio, tiny_models, rgba, run_dir, monkeypatch):
    from collections import namedtuple

    from animate124.components import preflight

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(preflight.shutil, "disk_usage", lambda p: usage(10 * 2**30, 10 * 2**30 - 2**20, 2**20))
    with pytest.raises(preflight.PreflightError, match=r"has 0\.0 GiB free but this run writes about 1\.\d GiB"):
        _run(threestudio, _config(tiny_models, rgba, run_dir), run_dir)
    assert not list(run_dir.rglob("*.ckpt")) and not list(run_dir.rglob("stages.json"))
    (run_dir / "file.txt").write_text("the user's file")
    problems = preflight.check_output_folder(str(run_dir / "file.txt" / "sub"), 0)  # under a file: not writable
    assert problems and "is not writable" in problems[0] and "set exp_root_dir" in problems[0]


def test_a_fresh_run_never_trains_into_an_earlier_runs_folder(threestudio, tiny_models, rgba, run_dir):
    """use_timestamp=false and the same tag: the second run (no resume=) stops at fit start, its checkpoints, stage
    records and renders untouched; resuming the same folder is still allowed."""
    from animate124.components.preflight import PreflightError

    text = _config(tiny_models, rgba, run_dir, steps=(1, 1, 1))
    cfg, _, _ = _run(threestudio, text, run_dir)
    trial = Path(cfg.trial_dir)
    kept = {path: path.read_bytes() for path in [*trial.glob("ckpts/*.ckpt"), trial / "stages.json"]}
    assert len(kept) >= 2
    with pytest.raises(PreflightError) as info:
        _run(threestudio, text, run_dir)
    (problem,) = info.value.problems
    assert problem == (f"the trial folder {str(trial)!r} already holds an earlier run (ckpts/*.ckpt, stages.json, "
                       f"save/): resume it with resume={trial / 'ckpts' / 'last.ckpt'}, or start a new trial (another "
                       "tag, or use_timestamp=true); nothing of it was overwritten")
    assert {path: path.read_bytes() for path in kept} == kept
    (step2,) = trial.glob("ckpts/epoch=*-step=2.ckpt")
    _, _, resumed = _run(threestudio, text, run_dir, resume=str(step2))  # resuming that folder: allowed
    assert resumed.global_step == 3


# ---- interrupted runs ------------------------------------------------------------------------------------------------


class _StateAtStart:
    """Per step: the stage that ran and the parameters + Adam state the step started from."""

    def __new__(cls):
        import pytorch_lightning as pl

        class StateAtStart(pl.Callback):
            def __init__(self):
                self.start, self.stage = {}, {}

            def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
                self.start[trainer.global_step] = (_params(pl_module), _optimizer_state(trainer.optimizers[0]))

            def on_before_optimizer_step(self, trainer, pl_module, optimizer):
                self.stage[trainer.global_step] = pl_module.last_step.stage

        return StateAtStart()


def test_resume_mid_each_stage_continues_same_stage_step_and_state(threestudio, tiny_models, rgba, run_dir):
    """Killed after any step and resumed with resume=: the run goes on in the same stage at the same step, from the
    same parameters and Adam state, and ends with the same step count (steps 2 + 3 + 2, refine with ControlNet)."""
    _write_embeds(run_dir / "embeds.safetensors")
    text = _config(tiny_models, rgba, run_dir, steps=(2, 3, 2), with_cn=True).replace(
        "every_n_train_steps: 3", "every_n_train_steps: 1")
    full = _StateAtStart()
    cfg, _, trainer = _run(threestudio, text, run_dir, callbacks=[full])
    assert trainer.global_step == 7
    expected = ["static"] * 2 + ["dynamic"] * 3 + ["refine"] * 2
    assert [full.stage[s] for s in range(7)] == expected
    ckpts = Path(cfg.trial_dir) / "ckpts"
    for resume_at in (1, 3, 6):  # mid static, mid dynamic, mid refine
        (ckpt,) = ckpts.glob(f"epoch=*-step={resume_at}.ckpt")
        rec = _StateAtStart()
        _, _, resumed = _run(threestudio, text, run_dir, resume=str(ckpt), callbacks=[rec])
        assert [(s, rec.stage[s]) for s in sorted(rec.stage)] == [(s, expected[s]) for s in range(resume_at, 7)]
        assert resumed.global_step == 7
        _assert_same(rec.start[resume_at][0], full.start[resume_at][0])  # the weights the step started from
        _assert_same(rec.start[resume_at][1], full.start[resume_at][1])  # Adam's moments and step counts


def test_shipped_configs_pass_the_type_and_key_checks(threestudio):
    """Every slot and component of every config in configs/ names a registered type and only its keys."""
    from omegaconf import OmegaConf

    from animate124.components.preflight import _component

    configs = sorted((Path(__file__).resolve().parents[2] / "configs").glob("*.yaml"))
    assert configs
    for path in configs:
        system = OmegaConf.to_container(OmegaConf.load(path), resolve=False).get("system", {})
        problems = []
        for part in ("geometry", "material", "background", "renderer", "exporter"):
            problems += _component(f"system.{part}", system.get(f"{part}_type", ""), system.get(part) or {})
        for name, slot in (system.get("guidances") or {}).items():
            problems += _component(f"{name}.guidance", slot.get("guidance_type", ""), slot.get("guidance") or {})
            problems += _component(f"{name}.prompt_processor", slot.get("prompt_processor_type", ""),
                                   slot.get("prompt_processor") or {})
        assert problems == [], (path.name, problems)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_no_cuda_as_under_launch_py(threestudio, tiny_models, rgba, run_dir):
    """A fresh process that, like launch.py, leaves the host placing components on cuda:0: the system refuses to
    build with the one-line CUDA message (nothing else is patched)."""
    import subprocess
    import sys

    from threestudio_env import threestudio_root

    script = f"""
import sys
from pathlib import Path
sys.path[:0] = [{str(Path(__file__).parent)!r}, {str(Path(__file__).parents[1])!r}]
from animate124.tools.host import load_extension
ts = load_extension(Path({str(threestudio_root())!r}))
from test_system_integration import _config
from threestudio.utils.config import load_config
tiny = {{k: Path(v) for k, v in {({k: str(v) for k, v in tiny_models.items()})!r}.items()}}
cfg = load_config(_config(tiny, Path({str(rgba)!r}), Path({str(run_dir)!r})), from_string=True)
ts.find(cfg.data_type)(cfg.data)
ts.find(cfg.system_type)(cfg.system)
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=run_dir,
                            env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert result.returncode == 1
    assert "PreflightError: 1 problem(s) found before step 0; nothing was started:" in result.stderr
    assert "  - CUDA is not available (torch " in result.stderr


# ---- a divergence: the checkpoint to resume from --------------------------------------------------------------------


def test_a_divergence_stop_names_the_checkpoint_before_it_and_resuming_from_that_one_trains(
        threestudio, tiny_models, rgba, run_dir, monkeypatch):
    """Step 2's update blows the parameters up (x 1e30: an injected fault standing for a learning rate far too high);
    with those parameters the loss is NaN from step 3 on. Every checkpoint from step=3 on (last.ckpt included) is
    finite but holds them, so resuming from last.ckpt stops again at once; the stop names step=2, the last one written
    before, and resuming from it trains to the end."""
    import pytorch_lightning as pl
    from threestudio.models.guidance.stable_diffusion_guidance import StableDiffusionGuidance

    from animate124.components.nonfinite_guard import NonfiniteTrainingError

    system_of = {}
    original = StableDiffusionGuidance.__call__

    def nan_when_blown_up(self, *args, **kwargs):  # the loss overflows once the parameters are huge
        out = original(self, *args, **kwargs)
        if any(bool(p.abs().max() > 1e20) for p in system_of["system"].geometry.parameters()):
            out["loss_sds"] = out["loss_sds"] * float("nan")
        return out

    monkeypatch.setattr(StableDiffusionGuidance, "__call__", nan_when_blown_up)

    class Track(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            system_of["system"] = pl_module

    class BlowUpAfterStep2(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if trainer.global_step == 3:  # step 2 done; runs before ModelCheckpoint, which Lightning orders last
                with torch.no_grad():
                    for p in pl_module.geometry.parameters():
                        p.mul_(1e30)

    text = _config(tiny_models, rgba, run_dir, steps=(6, 1, 1)).replace(
        "  anchor_interval: 2", "  anchor_interval: 2\n  max_nonfinite_steps: 2").replace(
        "every_n_train_steps: 7", "every_n_train_steps: 1")
    with pytest.raises(NonfiniteTrainingError) as info:
        _run(threestudio, text, run_dir, callbacks=[Track(), BlowUpAfterStep2()])
    ckpts = run_dir / "outputs" / "a124-smoke" / "test" / "ckpts"
    good = ckpts / "epoch=0-step=2.ckpt"
    assert str(info.value) == (
        "stopped at step 4 (stage 'static'): 2 steps in a row had non-finite loss terms ['sd:sds', 'zero123:sd', "
        "'normal_smoothness_2d', 'rgb', 'mask']; the loss was "
        f"non-finite from step 3; the last checkpoint written before that is {good} (step 2; later ones, last.ckpt "
        "included, hold the diverging parameters): lower that stage's learning rates or the weights of those terms, "
        f"then resume={good}; or raise system.max_nonfinite_steps")
    later = torch.load(ckpts / "epoch=0-step=4.ckpt", map_location="cpu", weights_only=False)["state_dict"]
    assert all(torch.isfinite(v).all() for v in later.values())  # finite, but blown up:
    assert max(float(v.abs().max()) for k, v in later.items() if k.startswith("geometry.")) > 1e20
    with pytest.raises(NonfiniteTrainingError):  # resuming from the latest checkpoint fails again at once
        _run(threestudio, text, run_dir, resume=str(ckpts / "last.ckpt"), callbacks=[Track()])
    _, _, trainer = _run(threestudio, text, run_dir, resume=str(good), callbacks=[Track()])  # trains to the end
    assert trainer.global_step == 8


# ---- checkpoints from another run -----------------------------------------------------------------------------------


def _grid(text: str, log2: int) -> str:
    return text.replace("log2_hashmap_size: 12", f"log2_hashmap_size: {log2}")


def test_weights_from_another_grid_size_name_the_tensors_and_settings(threestudio, tiny_models, rgba, run_dir):
    from omegaconf import OmegaConf
    from threestudio.utils.config import load_config

    from animate124.components.preflight import PreflightError

    text = _config(tiny_models, rgba, run_dir, steps=(1, 1, 1))
    assert "log2_hashmap_size: 12" in text
    cfg, _, trainer = _run(threestudio, text, run_dir, max_steps=1)
    trial = Path(cfg.trial_dir)
    ckpt = trial / "ckpts" / "grid12.ckpt"
    trainer.save_checkpoint(str(ckpt))
    other = load_config(_grid(_config(tiny_models, rgba, run_dir / "next", steps=(1, 1, 1)), 13), from_string=True)

    def build(weights):
        other.system.weights = str(weights)
        before = _snapshot(run_dir)
        with pytest.raises(PreflightError) as info:
            threestudio.find(other.system_type)(other.system)
        assert _snapshot(run_dir) == before
        (problem,) = info.value.problems
        return problem

    tensors = ("geometry.field.encoding.embeddings [10432, 2] in the checkpoint, [16264, 2] here; "
               "geometry.field.encoding_time.embeddings [16384, 2] in the checkpoint, [28672, 2] here")
    assert build(ckpt) == (f"system.weights={ckpt} holds tensors of other sizes than this config makes ({tensors}): "
                           "set system.geometry.pos_encoding_config as in that run, or start without it")
    (trial / "configs").mkdir()
    OmegaConf.save(cfg, trial / "configs" / "parsed.yaml")  # as launch.py's ConfigSnapshotCallback writes it
    assert build(ckpt) == (f"system.weights={ckpt} holds tensors of other sizes than this config makes ({tensors}): "
                           "its run used system.geometry.pos_encoding_config.log2_hashmap_size=12 (here 13): set them "
                           "alike, or start without it")
    assert build(run_dir / "none.ckpt") == (f"system.weights={run_dir / 'none.ckpt'} does not exist: give the "
                                            "last.ckpt of the earlier stage's run (outputs/<name>/<trial>/ckpts/"
                                            "last.ckpt)")
    assert build(trial) == (f"system.weights={trial} is a folder: give its checkpoint, e.g. "
                            f"system.weights={ckpt.parent / 'last.ckpt'}")
    (run_dir / "notes.txt").write_text("not a checkpoint")
    assert build(run_dir / "notes.txt").startswith(f"system.weights={run_dir / 'notes.txt'} cannot be read as a "
                                                   "threestudio checkpoint (")
    # a checkpoint from elsewhere that would run code: the host's torch.load asks for the whole pickle; refused
    marker = run_dir / "code-ran"

    class RunsCode:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    torch.save({"state_dict": {}, "payload": RunsCode()}, run_dir / "foreign.ckpt")
    assert build(run_dir / "foreign.ckpt") == (
        f"system.weights: {str(run_dir / 'foreign.ckpt')!r} is a pickle that calls posix.system when loaded, so it was "
        "refused (loading it could run any code): use the repository's .safetensors files or convert this one")
    assert not marker.exists()
    # resume= from that run: the same message from the checkpoint's own load, before any step
    with pytest.raises(PreflightError) as info:
        _run(threestudio, _grid(_config(tiny_models, rgba, run_dir / "again", steps=(1, 1, 1)), 13), run_dir,
             resume=str(ckpt))
    assert info.value.problems[0].startswith(f"resume={ckpt} holds tensors of other sizes than this config makes")


def test_gpu_index_this_machine_lacks(threestudio, tiny_models, rgba, run_dir, monkeypatch):
    """launch.py turns --gpu 7 into CUDA_VISIBLE_DEVICES=7; the system's check names --gpu, not a generic no-CUDA."""
    from animate124.components.preflight import check_device

    monkeypatch.setattr(torch.version, "cuda", "12.4")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "7")
    assert check_device(None, torch.device("cuda:0")) == [
        "CUDA_VISIBLE_DEVICES=7 (launch.py sets it from --gpu) leaves torch no GPU: give --gpu an index that "
        "`nvidia-smi -L` lists (--gpu 0 is the first GPU)"]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,7")
    assert check_device(None, torch.device("cuda:0")) == [
        "CUDA_VISIBLE_DEVICES=0,7 (launch.py sets it from --gpu) lists 2 GPUs but torch sees 1: an index is not one of "
        "this machine's GPUs; give --gpu indices that `nvidia-smi -L` lists"]


def test_max_steps_beyond_the_stages_stops_at_fit_start(threestudio, tiny_models, rgba, run_dir):
    from animate124.components.preflight import PreflightError

    with pytest.raises(PreflightError) as info:
        _run(threestudio, _config(tiny_models, rgba, run_dir, steps=(1, 1, 1)), run_dir, max_steps=5)
    assert info.value.problems == [
        "trainer.max_steps=5 but the stages sum to 3 steps: the run would repeat stage 'refine' for 2 more steps; set "
        "trainer.max_steps to 3 (the shipped configs set it to ${a124_total_steps:${system.stages}}, the stages' sum) "
        "or lengthen a stage"]
    assert not list(run_dir.rglob("*.ckpt"))


def _keyed(text: str) -> str:
    """The harness config with its stages keyed by name (as the shipped configs) and max_steps their sum."""
    import re

    text = re.sub(r"^    - name: (\w+)$", r"    \1:", text, flags=re.M)
    return re.sub(r"^  max_steps: \d+$", "  max_steps: ${a124_total_steps:${system.stages}}", text, flags=re.M)


def test_keyed_stages_take_command_line_overrides_through_the_host(threestudio, tiny_models, rgba, run_dir):
    """threestudio's own load_config merges system.stages.<name>.<key>=... into the keyed form, and max_steps (the
    extension's resolver) follows; the system runs the stages as overridden."""
    from threestudio.utils.config import load_config

    text = _keyed(_config(tiny_models, rgba, run_dir, steps=(2, 3, 2)))
    cfg = load_config(text, cli_args=["system.stages.dynamic.steps=1", "system.stages.refine.loss_weights.mask=7"],
                      from_string=True)
    assert cfg.trainer.max_steps == 2 + 1 + 2
    system = threestudio.find(cfg.system_type)(cfg.system)
    assert [(s.name, s.steps) for s in system.stages] == [("static", 2), ("dynamic", 1), ("refine", 2)]
    assert system.stages[2].loss_weights["mask"] == 7.0
    from animate124.components.preflight import PreflightError

    before = _snapshot(run_dir)
    with pytest.raises(PreflightError) as info:  # a misspelt stage: one line, before anything starts
        _build(threestudio, text, ["system.stages.dynamc.steps=1"])
    assert info.value.problems == [
        "system.stages.dynamc has no guidances and no loss_weights, so it would train nothing (did you mean "
        "system.stages.dynamic? an override with a stage name the config does not have adds such a stage; its stages: "
        "['static', 'dynamic', 'refine'])"]
    assert _snapshot(run_dir) == before


def test_reference_images_read_by_their_bit_depth(threestudio, tmp_path):
    """A 16-bit depth map is scaled by its bit depth (convert("L") alone clipped it at 255), and a gray + alpha
    reference image counts as having alpha (it was refused as 'no alpha channel')."""
    import numpy as np
    from PIL import Image

    from animate124.components.data import ImageVideoDataModuleConfig, load_reference

    la = np.zeros((8, 8, 2), np.uint8)
    la[2:6, 2:6] = (90, 255)
    Image.fromarray(la, "LA").save(tmp_path / "la.png")
    depth = np.zeros((8, 8), np.uint16)
    depth[2:6, 2:6] = 257 * 200  # 16-bit full scale: 200 of 255
    depth[0, 0] = 1000  # above 255: convert("L") read it as 255
    Image.fromarray(depth).save(tmp_path / "depth16.png")
    cfg = ImageVideoDataModuleConfig(image_path=str(tmp_path / "la.png"), depth_path=str(tmp_path / "depth16.png"),
                                     height=8, width=8)
    ref = load_reference(cfg)
    assert ref["mask"][0, 3, 3, 0] and not ref["mask"][0, 0, 0, 0]
    torch.testing.assert_close(ref["rgb"][0, 3, 3], torch.full((3,), 90 / 255))
    assert round(float(ref["ref_depth"][0, 3, 3, 0]) * 255) == 200
    assert round(float(ref["ref_depth"][0, 0, 0, 0]) * 255) == 4  # round(1000 * 255 / 65535)
