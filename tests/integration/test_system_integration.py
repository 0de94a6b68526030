"""The a124-system through real threestudio on CPU with tiny models: every stage in one run, resume, outputs."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from checks import step_record

REF = "panda-dance"


def _config(tiny: dict, rgba: Path, root: Path, steps=(2, 3, 2), with_cn: bool = False) -> str:
    cn_slot = f"""
    cn:
      input: controlnet
      guidance_type: a124-controlnet-tile-guidance
      guidance:
        pretrained_model_name_or_path: {tiny['sd']}
        controlnet_name_or_path: {tiny['controlnet-tile']}
        fixed_size: 64
        seed: 0
      prompt_processor_type: a124-textual-inversion-prompt-processor
      prompt_processor:
        pretrained_model_name_or_path: {tiny['sd']}
        prompt: "a <token> is dancing"
        learned_embeds_path: {root / 'embeds.safetensors'}""" if with_cn else ""
    refine_guidances = "[video, zero123, cn]" if with_cn else "[video, zero123]"
    cn_weight = "cn: 3.0, " if with_cn else ""
    return f"""
name: a124-smoke
tag: test
use_timestamp: false
exp_root_dir: {root / 'outputs'}
seed: 0
data_type: a124-image-video-datamodule
data:
  image_path: {rgba}
  height: 16
  width: 16
  random_camera: {{height: 16, width: 16, batch_size: 1}}
  video: {{num_frames: 4, height: 16, width: 16, zero_rate: 0.5}}
  eval_height: 16
  eval_width: 16
  n_val_frames: 4
  n_test_views: 3
  n_test_frames: 4
system_type: a124-system
system:
  anchor_interval: 2
  geometry_type: a124-4d-volume
  geometry:
    radius: 1.0
    pos_encoding_config: {{n_levels: 4, log2_hashmap_size: 12, base_resolution: 8, per_level_scale: 1.5, implementation: torch}}
  material_type: no-material
  material: {{n_output_dims: 3, color_activation: sigmoid}}
  background_type: solid-color-background
  background: {{color: [1.0, 1.0, 1.0]}}
  renderer_type: a124-time-volume-renderer
  renderer:
    num_samples_per_ray: 16
    occ_grid_res: 8
    occ_n_time_slices: 4
    implementation: torch
  guidances:
    sd:
      input: image
      guidance_type: stable-diffusion-guidance
      guidance: {{pretrained_model_name_or_path: {tiny['sd']}, guidance_scale: 100., half_precision_weights: false}}
      prompt_processor_type: stable-diffusion-prompt-processor
      prompt_processor: {{pretrained_model_name_or_path: {tiny['sd']}, prompt: "a panda", spawn: false}}
    zero123:
      input: image
      guidance_type: zero123-unified-guidance
      guidance:
        pretrained_model_name_or_path: {tiny['zero123']}
        cond_image_path: {rgba}
        guidance_scale: 5.0
        cond_elevation_deg: 0.0
        cond_azimuth_deg: 0.0
        cond_camera_distance: 2.5
        half_precision_weights: false
    video:
      input: video
      guidance_type: a124-video-sds-guidance
      guidance: {{pretrained_model_name_or_path: {tiny['text-to-video']}, model_size: [64, 64], seed: 0}}
      prompt_processor_type: a124-video-prompt-processor
      prompt_processor: {{pretrained_model_name_or_path: {tiny['text-to-video']}, prompt: "a panda is dancing"}}{cn_slot}
  stages:
    - name: static
      steps: {steps[0]}
      guidances: [sd, zero123]
      loss_weights: {{sd: 0.025, zero123: 1.0, rgb: 1000.0, mask: 100.0, normal_smoothness_2d: 10.0}}
      learning_rates: {{field_3d: 0.01, density_mlp: 0.001, feature_mlp: 0.001}}
      trainable: [field_3d, density_mlp, feature_mlp]
    - name: dynamic
      steps: {steps[1]}
      guidances: [video, zero123]
      loss_weights: {{video: 1.0, zero123: 40.0, rgb: 1000.0, mask: 100.0, time_smoothness: 0.001}}
      learning_rates: {{field_3d: 0.0001, field_4d: 0.01, density_mlp: 0.001, feature_mlp: 0.001}}
    - name: refine
      steps: {steps[2]}
      guidances: {refine_guidances}
      loss_weights: {{video: 1.0, zero123: 40.0, {cn_weight}rgb: 1000.0, mask: 100.0}}
      learning_rates: {{field_3d: 0.0001, field_4d: 0.01, density_mlp: 0.001, feature_mlp: 0.001}}
  optimizer: {{name: Adam, args: {{betas: [0.9, 0.99], eps: 1.0e-8}}}}
trainer:
  max_steps: {sum(steps)}
  log_every_n_steps: 1
  num_sanity_val_steps: 0
  val_check_interval: {sum(steps)}
  enable_progress_bar: false
  precision: 32
checkpoint:
  save_last: true
  save_top_k: -1
  every_n_train_steps: {steps[0] + 1}
"""


def StepRecorder():
    """A Lightning callback recording, per step, the stage, the guidances that ran and which parameters got gradient
    (built on call: the integration tier may be collected where Lightning is not installed)."""
    import pytorch_lightning as pl

    class _StepRecorder(pl.Callback):
        def __init__(self):
            super().__init__()
            self.steps = []

        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            grads = {name: bool(p.grad is not None and p.grad.abs().sum() > 0)
                     for name, p in pl_module.geometry.named_parameters()}
            info = step_record(pl_module.last_step)
            info["step"] = pl_module.true_global_step
            info["grads"] = grads
            self.steps.append(info)

    return _StepRecorder()


def _datamodule(threestudio, cfg_text: str):
    from threestudio.utils.config import load_config

    cfg = load_config(cfg_text, from_string=True)
    return threestudio.find(cfg.data_type)(cfg.data)


def _run(threestudio, cfg_text: str, root: Path, resume=None, max_steps=None, callbacks=()):
    import pytorch_lightning as pl
    from threestudio.utils.config import load_config

    cfg = load_config(cfg_text, from_string=True)
    if max_steps is not None:
        cfg.trainer.max_steps = max_steps
    pl.seed_everything(cfg.seed)
    dm = threestudio.find(cfg.data_type)(cfg.data)
    system = threestudio.find(cfg.system_type)(cfg.system, resumed=resume is not None)
    system.set_save_dir(os.path.join(cfg.trial_dir, "save"))
    ckpt = pl.callbacks.ModelCheckpoint(dirpath=os.path.join(cfg.trial_dir, "ckpts"), **cfg.checkpoint)
    # the host puts every component on cuda:0 when CUDA exists (on CPU the harness points it at the CPU)
    accelerator = "gpu" if torch.cuda.is_available() else "cpu"
    trainer = pl.Trainer(accelerator=accelerator, devices=1, logger=False, callbacks=[ckpt, *callbacks],
                         inference_mode=False, **cfg.trainer)
    trainer.fit(system, datamodule=dm, ckpt_path=resume)
    return cfg, system, trainer


@pytest.fixture()
def run_dir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the host's prompt cache is relative to the working directory
    return tmp_path


def _grad(info, prefix):
    return any(v for k, v in info["grads"].items() if k.startswith(prefix))


def test_all_stages_in_one_run_then_resume_mid_stage(threestudio, tiny_models, example_rgba, run_dir):
    rgba = example_rgba
    cfg_text = _config(tiny_models, rgba, run_dir)
    rec = StepRecorder()
    cfg, system, trainer = _run(threestudio, cfg_text, run_dir, callbacks=[rec])
    stages = [s["stage"] for s in rec.steps]
    assert stages == ["static"] * 2 + ["dynamic"] * 3 + ["refine"] * 2, stages
    for info in rec.steps:
        if info["stage"] == "static":
            assert set(info["guidances"]) == {"sd", "zero123"}
            assert _grad(info, "field.encoding.") and not _grad(info, "field.encoding_time.")
        else:
            assert "video" in info["guidances"]
            assert _grad(info, "field.encoding_time.") and _grad(info, "field.density_network.")
            assert ("zero123" in info["guidances"]) == info["anchor"]
    # guidances of finished stages are freed
    assert set(system.guidance_slots.guidances) == {"video", "zero123"}
    trial = Path(cfg.trial_dir)
    record = json.loads((trial / "stages.json").read_text())
    assert [r["stage"] for r in record["stages"]] == ["static", "dynamic", "refine"]
    assert [r["steps"] for r in record["stages"]] == [2, 3, 2]
    assert all(r["wall_time_s"] > 0 for r in record["stages"])
    assert list((trial / "save").glob("it7-val.*")), sorted(p.name for p in (trial / "save").iterdir())
    # test renders: three turntables (t = 0, 0.5, 1), the front view over time and the orbit while animating
    trainer.test(system, datamodule=_datamodule(threestudio, cfg_text))
    videos = sorted(p.name.rsplit(".", 1)[0] for p in (trial / "save").glob("it7-test-*.*"))
    assert videos == ["it7-test-front-over-time", "it7-test-orbit", "it7-test-turntable-t0",
                                                 "it7-test-turntable-t0.5", "it7-test-turntable-t1"], videos

    # resume from the checkpoint at step 3 (mid dynamic): it continues in 'dynamic' at step 3
    ckpts = sorted((trial / "ckpts").glob("epoch=*step=3*.ckpt"))
    assert ckpts, sorted(p.name for p in (trial / "ckpts").iterdir())
    rec2 = StepRecorder()
    _run(threestudio, cfg_text, run_dir, resume=str(ckpts[0]), max_steps=5, callbacks=[rec2])
    assert [(s["step"], s["stage"]) for s in rec2.steps] == [(3, "dynamic"), (4, "dynamic")]
    # stages.json keeps the interrupted stage whole: dynamic counted from its start (step 2), not from the resume
    record = json.loads((trial / "stages.json").read_text())
    assert [(r["stage"], r["start_step"], r["end_step"]) for r in record["stages"]] == [("static", 0, 2),
                                                                                       ("dynamic", 2, 5)]


def test_stage_by_stage_weights_report_missing_and_unexpected_keys(threestudio, tiny_models, example_rgba, run_dir):
    """Per-stage configs chain through system.weights; unlike the host's silent strict=False, every missing or
    unexpected key is reported, and strict_weights turns that into an error."""
    from threestudio.utils.config import load_config

    rgba = example_rgba
    cfg, system, trainer = _run(threestudio, _config(tiny_models, rgba, run_dir, steps=(2, 1, 1)), run_dir, max_steps=2)
    ckpt = Path(cfg.trial_dir) / "weights.ckpt"  # saved here: pytorch-lightning 2.0.0 writes no last.ckpt at step 2
    trainer.save_checkpoint(str(ckpt))

    def build(weights, strict=False):
        c = load_config(_config(tiny_models, rgba, run_dir / "next", steps=(2, 1, 1)), from_string=True)
        c.system.weights = str(weights)
        c.system.strict_weights = strict
        return threestudio.find(c.system_type)(c.system)

    clean = build(ckpt)
    assert clean.weights_report == {"missing": [], "unexpected": []}
    for key, value in system.geometry.state_dict().items():
        torch.testing.assert_close(clean.geometry.state_dict()[key], value)
    # a checkpoint with one renamed key: the missing and the unexpected name are both reported
    state = torch.load(ckpt, map_location="cpu", weights_only=False)
    sd = state["state_dict"]
    sd["geometry.field.renamed"] = sd.pop("geometry.field.density_network.layers.0.weight")
    broken = run_dir / "broken.ckpt"
    torch.save(state, broken)
    report = build(broken).weights_report
    assert report == {"missing": ["geometry.field.density_network.layers.0.weight"],
                      "unexpected": ["geometry.field.renamed"]}
    with pytest.raises(ValueError, match="strict_weights"):
        build(broken, strict=True)


@pytest.mark.parametrize("edit, match", [
    (("guidance_scale: 5.0", "guidance_scale: 5.0\n        guidance_scael: 1.0"),
     r"system.guidances.zero123.guidance.guidance_scael is not a setting of 'zero123-unified-guidance': did you "
     r"mean \['guidance_scale'"),
    (("guidance_type: a124-video-sds-guidance", "guidance_type: a124-video-sds"),
     r"system.guidances.video.guidance_type='a124-video-sds' is not a registered type: did you mean "
     r"\['a124-video-sds-guidance'"),
    (("time_smoothness: 0.001}", "time_smoothness: 0.001, sparsity: 1.0}"),
     r"stage 'dynamic': loss weight 'sparsity' cannot be used"),
])
def test_bad_slot_configs_and_weights_fail_at_construction(threestudio, tiny_models, example_rgba, run_dir, edit, match):
    """A typo in a slot's config or a weight a stage cannot compute fails when the system is built (before any
    guidance loads), not when the stage starts."""
    from threestudio.utils.config import load_config

    text = _config(tiny_models, example_rgba, run_dir)
    assert edit[0] in text
    cfg = load_config(text.replace(edit[0], edit[1], 1), from_string=True)
    with pytest.raises(ValueError, match=match):
        threestudio.find(cfg.system_type)(cfg.system)


def test_smoke_config_file_trains_tests_and_exports(threestudio, run_dir):
    """configs/animate124-smoke.yaml itself: tiny models made on first use, all stages, test videos, export."""
    import pygltflib
    import pytorch_lightning as pl
    from threestudio.utils.config import load_config

    tiny = run_dir / "tiny"
    cfg = load_config(str(Path(__file__).resolve().parents[2] / "configs" / "animate124-smoke.yaml"),
                      cli_args=[f"system.tiny_models_dir={tiny}", f"exp_root_dir={run_dir / 'outputs'}",
                                "trainer.enable_progress_bar=false"])
    pl.seed_everything(cfg.seed)
    dm = threestudio.find(cfg.data_type)(cfg.data)
    system = threestudio.find(cfg.system_type)(cfg.system)
    assert (tiny / ".complete").is_file() and (tiny / "smoke_rgba.png").is_file()
    system.set_save_dir(os.path.join(cfg.trial_dir, "save"))
    accelerator = "gpu" if torch.cuda.is_available() else "cpu"
    trainer = pl.Trainer(accelerator=accelerator, devices=1, logger=False, inference_mode=False, **cfg.trainer)
    trainer.fit(system, datamodule=dm)
    trainer.test(system, datamodule=dm)
    trial = Path(cfg.trial_dir)
    stages = json.loads((trial / "stages.json").read_text())["stages"]
    assert [(r["stage"], r["steps"]) for r in stages] == [("static", 4), ("dynamic", 4), ("refine", 4)]
    save = trial / "save"
    assert len(list(save.glob("it12-val.*"))) == 1
    assert len(list(save.glob("it12-test-*.*"))) == 5  # 3 turntables, front view over time, orbit
    # the test pass is recorded next to the stages, and the results page shows its videos
    record = json.loads((trial / "stages.json").read_text())
    assert record["test"]["step"] == 12 and record["test"]["batches"] > 0 and record["test"]["wall_time_s"] > 0
    page = (trial / "report.html").read_text()
    assert page.count("<video src=\"save/it12-test-") == 5 and "No exported .glb" in page
    trainer.predict(system, datamodule=dm)  # what launch.py --export runs
    export = save / "it12-export"
    meshes = sorted((export / "mesh").glob("*.obj"))
    assert len(meshes) == cfg.system.exporter.n_times
    glb = pygltflib.GLTF2().load(str(export / "mesh.glb"))
    assert len(glb.meshes[0].primitives[0].targets) == cfg.system.exporter.n_times - 1
    # the export pass joins the same file (the stages and the test record kept) and the page gets the viewer
    after = json.loads((trial / "stages.json").read_text())
    assert after["stages"] == record["stages"] and after["test"] == record["test"]
    assert after["export"]["step"] == 12 and after["export"]["wall_time_s"] > 0
    page = (trial / "report.html").read_text()
    assert 'id="viewer-canvas"' in page and (trial / "report_files" / "mesh_glb.js").is_file()


def OptimizerSteps():
    """Records, after each step, Adam's step count of the 3-D grid's table (reset at a stage start or not)."""
    import pytorch_lightning as pl

    class _OptimizerSteps(pl.Callback):
        def __init__(self):
            super().__init__()
            self.counts = []

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            table = next(pl_module.geometry.encoding.parameters())
            self.counts.append(int(trainer.optimizers[0].state[table]["step"]))

    return _OptimizerSteps()


# The seeded run below on CPU with the tiny models. Step 0 (static) renders with the initial field only, so its own
# terms do not depend on the diffusion models; the SDS terms do, and the tiny random models that diffusers 0.19
# (threestudio's pin) and current diffusers build from one seed differ, so the dynamic step's total is pinned per stack.
# re-pinned when the renderer's alpha_thre default became 0.01 (upstream threestudio's): dropping samples with
# alpha < 0.01 moved these by 0.03-1.4% (was 0.016361 / 0.027630 / 0.189205 and 5234.76 / 5531.11)
PINNED_STATIC_TERMS = {"normal_smoothness_2d": 0.016591805964708328, "rgb": 0.027649598196148872,
                       "mask": 0.18912295997142792}
PINNED_TIME_SMOOTHNESS = 2.073280143122247e-07  # step 1: the 4-D grid after one static step (it did not train)
# the video text carries the first camera's view suffix (view_dependent_prompting, as upstream); with it off these are
# 5234.82666015625 and 5531.052734375
PINNED_DYNAMIC_LOSS = {"diffusers<0.20": 11579.4462890625, "diffusers>=0.20": 5292.240234375}


def _stack() -> str:
    import diffusers
    from packaging.version import Version

    return "diffusers<0.20" if Version(diffusers.__version__) < Version("0.20") else "diffusers>=0.20"


def test_seeded_steps_repeat_pinned_dynamic_loss_and_fresh_optimizer_per_stage(threestudio, tiny_models, shared_data,
                                                                                run_dir):
    """Same seed -> the same losses for 3 steps (static, then two dynamic steps); the first dynamic step's total loss
    is pinned; the optimizer state restarts at the stage boundary (upstream runs each stage with a fresh optimizer)."""
    rgba = shared_data / "examples" / REF / "rgba.png"
    runs = []
    for i in range(2):  # two trial folders: a fresh run never writes into an earlier run's
        rec, opt = StepRecorder(), OptimizerSteps()
        _run(threestudio, _config(tiny_models, rgba, run_dir / f"run{i}", steps=(1, 2, 1)), run_dir, max_steps=3,
             callbacks=[rec, opt])
        runs.append((rec.steps, opt.counts))
    (first, counts), (second, _) = runs
    assert [s["stage"] for s in first] == ["static", "dynamic", "dynamic"]
    assert [s["losses"] for s in first] == [s["losses"] for s in second]  # bit-identical terms, step by step
    print("step losses", [(s["loss"], s["losses"]) for s in first])
    for name, value in PINNED_STATIC_TERMS.items():
        assert first[0]["losses"][name] == pytest.approx(value, rel=1e-4), name
    assert set(first[1]["losses"]) == {"video:sds_video", "time_smoothness"}  # step 1 does not anchor
    assert first[1]["losses"]["time_smoothness"] == pytest.approx(PINNED_TIME_SMOOTHNESS, rel=1e-3)
    # total = 1.0 * video SDS + 0.001 * time smoothness (the config's weights)
    assert first[1]["loss"] == pytest.approx(first[1]["losses"]["video:sds_video"] + 1e-3 * PINNED_TIME_SMOOTHNESS,
                                             rel=1e-6)
    if not torch.cuda.is_available():  # pinned on the CPU; CUDA kernels sum in another order
        assert first[1]["loss"] == pytest.approx(PINNED_DYNAMIC_LOSS[_stack()], rel=1e-4)
    assert counts == [1, 1, 2]  # Adam's step count restarts at the first dynamic step
    with_carry = OptimizerSteps()
    cfg_text = _config(tiny_models, rgba, run_dir / "carry", steps=(1, 2, 1))
    _run(threestudio, cfg_text.replace("anchor_interval: 2", "anchor_interval: 2\n  fresh_optimizer_per_stage: false"),
         run_dir, max_steps=3, callbacks=[with_carry])
    assert with_carry.counts == [1, 2, 3]


def test_training_rays_made_after_the_transfer_match_the_collated_ones(threestudio, tiny_models, example_rgba, run_dir):
    """The loader leaves the training rays to the data module's on_after_batch_transfer (made on the training
    device); they equal the rays the collate makes itself from the same seeded draws, reference-view noise included."""
    from animate124.components.data import RAYS_PENDING, complete_rays

    text = _config(tiny_models, example_rgba, run_dir)  # ray noise 2e-3 (default)
    deferred_dm, direct_dm = _datamodule(threestudio, text), _datamodule(threestudio, text)
    deferred_dm.setup("fit")
    direct_dm.setup("fit")
    loader_batch = next(iter(deferred_dm.train_dataloader()))
    assert all(RAYS_PENDING in loader_batch[view] and "rays_o" not in loader_batch[view]
               for view in ("ref", "random", "video"))
    assert loader_batch["ref"][RAYS_PENDING].shape == (2, 3)  # the reference view's noise, drawn in the collate
    batch = deferred_dm.on_after_batch_transfer(loader_batch, 0)
    direct = direct_dm.train_dataset.collate(None)  # same seed, same draws, rays made at once
    for view in ("ref", "random", "video"):
        assert RAYS_PENDING not in batch[view]
        for key in ("rays_o", "rays_d"):
            torch.testing.assert_close(batch[view][key], direct[view][key], rtol=0, atol=0)
        assert batch[view]["rays_o"].shape[:3] == (batch[view]["c2w"].shape[0], batch[view]["height"],
                                                  batch[view]["width"])
    assert complete_rays(batch) is batch  # a batch with rays is left as it is


def test_compile_denoisers_choice_and_which_networks_each_slot_compiles(threestudio, tiny_models, example_rgba,
                                                                         run_dir):
    """system.compile_denoisers: a bad value fails when the system is built, one line naming the allowed values; on
    the CPU a loaded slot stays eager; on CUDA (called directly here: the compilation itself waits for the first call)
    exactly the slot's U-Nets get a compiled forward, in the host's guidances and ours."""
    from threestudio.utils.config import load_config

    from animate124.components.guidance_slots import GuidanceSlots
    from animate124.core.training.step_plan import parse_slots

    text = _config(tiny_models, example_rgba, run_dir)
    cfg = load_config(text.replace("  anchor_interval: 2", "  anchor_interval: 2\n  compile_denoisers: fast", 1),
                      from_string=True)
    with pytest.raises(ValueError, match=r"^a124-system: compile_denoisers='fast' is not allowed; choose one of "
                                         r"cuda-graphs, default, max-autotune-no-cudagraphs, null$"):
        threestudio.find(cfg.system_type)(cfg.system)
    cfg = load_config(text.replace("  anchor_interval: 2", "  anchor_interval: 2\n  compile_denoisers: cuda-graphs\n"
                                   "  compile_vae_encoder: true", 1), from_string=True)
    with pytest.raises(ValueError, match=r"^a124-system: compile_vae_encoder=true needs a torch.compile mode .*: set "
                                         r"compile_denoisers=default, or compile_vae_encoder=false$"):
        threestudio.find(cfg.system_type)(cfg.system)
    cfg = load_config(text.replace("  anchor_interval: 2", "  anchor_interval: 2\n  compile_vae_encoder: true", 1),
                      from_string=True)  # on its own it would do nothing: said before anything loads
    with pytest.raises(ValueError, match=r"^a124-system: compile_vae_encoder=true compiles nothing while "
                                         r"compile_denoisers is null: set compile_denoisers=default, or "
                                         r"compile_vae_encoder=false$"):
        threestudio.find(cfg.system_type)(cfg.system)

    cfg = load_config(text, from_string=True)
    slots = GuidanceSlots(parse_slots(cfg.system.guidances), "max-autotune-no-cudagraphs")
    slots.keep_only(["sd", "zero123", "video"], torch.device("cpu"), 0, 0)
    assert {n: _compiled_networks(g) for n, g in slots.guidances.items()} == {"sd": [], "zero123": [], "video": []}
    for name in ("sd", "zero123", "video"):
        slots._compile(name, torch.device("cuda"))
    assert {n: _compiled_networks(g) for n, g in slots.guidances.items()} == {
        "sd": ["UNet2DConditionModel"], "zero123": ["UNet2DConditionModel"], "video": ["UNet3DConditionModel"]}


def test_cuda_graphs_through_the_system_give_the_eager_losses(threestudio, tiny_models, example_rgba, run_dir,
                                                              monkeypatch):
    """compile_denoisers: cuda-graphs in a whole run (the host's SD and Zero123 guidances, ours for video and
    ControlNet-Tile), on the CPU with ``checks.ReplayingGraph`` standing in for CUDA graphs: every denoiser of every
    slot replays (the guidances' calls are recordable: tensor timesteps, no gradient) and every step's losses equal
    an eager run's, bit for bit."""
    from checks import ReplayingGraph
    from safetensors.torch import save_file

    from animate124.components.guidance_slots import GuidanceSlots
    from animate124.core.guidance import cuda_graphs
    from animate124.core.guidance.diffusion_networks import find_networks

    for root in ("eager", "graphs"):
        (run_dir / root).mkdir()
        save_file({"_tiny_tok_": torch.randn(32, generator=torch.Generator().manual_seed(0))},
                  str(run_dir / root / "embeds.safetensors"))
    text = _config(tiny_models, example_rgba, run_dir / "eager", steps=(3, 3, 3), with_cn=True)
    eager = StepRecorder()
    _run(threestudio, text, run_dir, callbacks=[eager])

    monkeypatch.setattr(cuda_graphs, "CudaGraph", ReplayingGraph)
    wrapped = []

    real_compile = GuidanceSlots._compile

    def compile_on_cpu(self, name, device):  # the slots skip a CPU device; the stand-in records on the CPU
        real_compile(self, name, torch.device("cuda"))
        wrapped.extend((name, type(m).__name__, vars(m)["forward"])
                       for m in find_networks([self.guidances[name]]).denoisers)

    monkeypatch.setattr(GuidanceSlots, "_compile", compile_on_cpu)
    text = _config(tiny_models, example_rgba, run_dir / "graphs", steps=(3, 3, 3), with_cn=True)
    graphed = StepRecorder()
    _run(threestudio, text.replace("  anchor_interval: 2", "  anchor_interval: 2\n  compile_denoisers: cuda-graphs", 1),
         run_dir, callbacks=[graphed])
    assert len(wrapped) == 5 and {(n, kind) for n, kind, _ in wrapped} == {
        ("sd", "UNet2DConditionModel"), ("zero123", "UNet2DConditionModel"), ("video", "UNet3DConditionModel"),
        ("cn", "UNet2DConditionModel"), ("cn", "ControlNetModel")}
    replays = {(n, kind): f.replays for n, kind, f in wrapped}
    assert all(r >= 1 for r in replays.values()), replays
    assert len({id(f.pool) for _, _, f in wrapped}) == 1  # every slot's graphs in one memory pool
    assert len(eager.steps) == 9 and [s["stage"] for s in graphed.steps] == [s["stage"] for s in eager.steps]
    assert [s["losses"] for s in graphed.steps] == [s["losses"] for s in eager.steps]


def _compiled_networks(guidance) -> list:
    from animate124.core.guidance.diffusion_networks import find_networks

    return sorted(type(m).__name__ for m in find_networks([guidance]).all()
                  if getattr(vars(m).get("forward"), "_a124_compiled", False))


def test_normal_frames_through_the_system_score_only_the_frames_with_normals(threestudio, tiny_models, example_rgba,
                                                                            run_dir, monkeypatch):
    """renderer.normal_frames in a real run: each video step renders normals on 2 of the 4 frames, the normal
    smoothness is taken on those 2 only, and it still trains the 4-D grid."""
    import dataclasses

    from animate124.core.training import losses

    cfg_text = _config(tiny_models, example_rgba, run_dir, steps=(1, 3, 1)).replace(
        "    implementation: torch\n  guidances:",
        "    implementation: torch\n    normal_frames: 2\n    normal_weight_min: 0.001\n  guidances:").replace(
        "time_smoothness: 0.001}", "time_smoothness: 0.001, normal_smoothness_2d: 10.0}", 1)
    assert "normal_frames: 2" in cfg_text and cfg_text.count("normal_smoothness_2d") == 2
    seen = []
    entry = losses.LOSSES["normal_smoothness_2d"]

    def recording(inputs):
        out = inputs.out
        mask = out.get("normal_frame_mask")
        seen.append(None if mask is None else mask.tolist())
        if mask is not None:  # the frames left out really have no normals: (0.5, 0.5, 0.5) * opacity
            rest = out["comp_normal"][~mask]
            torch.testing.assert_close(rest, 0.5 * out["opacity"][~mask].expand_as(rest))
        value = entry.compute(inputs)
        if mask is not None:  # it scores the frames with normals, and only those
            grad, = torch.autograd.grad(value, out["comp_normal"], retain_graph=True)
            assert float(grad[~mask].abs().max()) == 0.0 and float(grad[mask].abs().max()) > 0.0
            assert out["comp_normal"].grad_fn is not None  # and reaches the field
        return value

    monkeypatch.setitem(losses.LOSSES, "normal_smoothness_2d", dataclasses.replace(entry, compute=recording))
    rec = StepRecorder()
    _run(threestudio, cfg_text, run_dir, callbacks=[rec])
    assert [s["stage"] for s in rec.steps] == ["static", "dynamic", "dynamic", "dynamic", "refine"]
    assert seen[0] is None  # the static random view: one image, every sample
    assert len(seen) == 4 and all(sum(m) == 2 and len(m) == 4 for m in seen[1:])  # each video step: 2 of 4 frames
    for info in rec.steps[1:4]:
        assert info["losses"]["normal_smoothness_2d"] > 0 and _grad(info, "field.encoding_time.")
