"""Our guidances and prompt processors through real threestudio (tiny models, CPU), beside the host's SD guidance."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from test_system_integration import StepRecorder, _config, _run

T, H, W = 4, 16, 16


DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # where the host puts its components


def _cameras(n: int) -> dict:
    return {"elevation": torch.full((n,), 10.0, device=DEVICE), "azimuth": torch.linspace(-30, 30, n, device=DEVICE),
            "camera_distances": torch.full((n,), 2.5, device=DEVICE)}


def _write_embeds(path) -> None:
    from safetensors.torch import save_file

    save_file({"_tiny_tok_": torch.randn(32, generator=torch.Generator().manual_seed(0))}, str(path))


@pytest.fixture()
def cwd(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the host's prompt cache is relative to the working directory
    return tmp_path


def _cn_parts(threestudio, tiny, root, n_frames=2):
    _write_embeds(root / "embeds.safetensors")
    processor = threestudio.find("a124-textual-inversion-prompt-processor")({
        "pretrained_model_name_or_path": str(tiny["sd"]), "prompt": "a <token> is dancing",
        "learned_embeds_path": str(root / "embeds.safetensors"),
    })
    guidance = threestudio.find("a124-controlnet-tile-guidance")({
        "pretrained_model_name_or_path": str(tiny["sd"]), "controlnet_name_or_path": str(tiny["controlnet-tile"]),
        "fixed_size": 64, "n_frames": n_frames, "seed": 0,
    })
    return processor, guidance


def test_controlnet_tile_guidance_host_signature(threestudio, tiny_models, cwd):
    processor, guidance = _cn_parts(threestudio, tiny_models, cwd)
    assert processor.cfg.prompt == "a _tiny_tok_ is dancing"
    prompt_utils = processor()
    torch.manual_seed(0)
    rgb = torch.rand(T, H, W, 3, device=DEVICE, requires_grad=True)
    frozen = torch.rand(T, H, W, 3, device=DEVICE)

    def call(cond_rgb):
        guidance.generator.manual_seed(0)
        return guidance(rgb, prompt_utils, **_cameras(T), cond_rgb=cond_rgb, rgb_as_latents=False)

    out = call(None)
    assert torch.isfinite(out["loss_sds_cn"]) and out["loss_sds_cn"] > 0
    assert (out["min_step"], out["max_step"]) == (20, 980)
    assert out["timestep"].shape == (2,) and ((out["timestep"] >= 20) & (out["timestep"] <= 980)).all()
    out["loss_sds_cn"].backward()
    # the gradient reaches exactly the two scored frames
    touched = (rgb.grad.abs().flatten(1).sum(1) > 0).nonzero().flatten()
    assert sorted(touched.tolist()) == sorted(out["frame_indices"].tolist())

    # cond_rgb=None is the detached current render; a frozen render is another condition -> another loss
    current = call(rgb.detach())
    torch.testing.assert_close(current["loss_sds_cn"], out["loss_sds_cn"].detach())
    other = call(frozen)
    assert torch.equal(other["timestep"], out["timestep"])
    assert not torch.allclose(other["loss_sds_cn"], out["loss_sds_cn"].detach(), rtol=1e-4)

    # text wiring: prompt_utils' cond / uncond embeddings (not their order in the concatenation) reach the core
    guidance.generator.manual_seed(0)
    direct = guidance.model(
        rgb, cond_rgb=frozen, cond_embeddings=prompt_utils.text_embeddings,
        uncond_embeddings=prompt_utils.uncond_text_embeddings, controlnet_embeddings=guidance.controlnet_embeddings,
        num_frames=2, fixed_size=64, guidance_scale=7.5, min_step=20, max_step=980, generator=guidance.generator,
    )
    torch.testing.assert_close(direct["loss_sds_cn"], other["loss_sds_cn"])

    # the timestep range follows update_step (C-schedules on the percentages)
    scheduled = threestudio.find("a124-controlnet-tile-guidance")({
        "pretrained_model_name_or_path": str(tiny_models["sd"]),
        "controlnet_name_or_path": str(tiny_models["controlnet-tile"]), "max_step_percent": [0, 0.98, 0.5, 10]})
    assert (scheduled.min_step, scheduled.max_step) == (20, 980)
    scheduled.update_step(0, 5)
    assert (scheduled.min_step, scheduled.max_step) == (20, 740)
    scheduled.update_step(0, 10)
    assert (scheduled.min_step, scheduled.max_step) == (20, 500)
    with pytest.raises(ValueError, match="rgb_as_latents=False"):
        guidance(rgb, prompt_utils, **_cameras(T), rgb_as_latents=True)


def test_video_guidance_beside_host_sd_guidance(threestudio, tiny_models, cwd):
    torch.manual_seed(0)
    video_pp = threestudio.find("a124-video-prompt-processor")({
        "pretrained_model_name_or_path": str(tiny_models["text-to-video"]), "prompt": "a panda is dancing"})
    video = threestudio.find("a124-video-sds-guidance")({
        "pretrained_model_name_or_path": str(tiny_models["text-to-video"]), "model_size": [64, 64], "seed": 0})
    clip = torch.rand(T, H, W, 3, device=DEVICE, requires_grad=True)
    out = video(clip, video_pp(), **_cameras(T))
    assert torch.isfinite(out["loss_sds_video"]) and out["loss_sds_video"] > 0
    out["loss_sds_video"].backward()
    assert clip.grad.abs().sum() > 0 and torch.isfinite(clip.grad).all()

    # the host's own SD guidance in the same process, with our registrations loaded
    sd_pp = threestudio.find("stable-diffusion-prompt-processor")({
        "pretrained_model_name_or_path": str(tiny_models["sd"]), "prompt": "a panda", "spawn": False})
    sd = threestudio.find("stable-diffusion-guidance")({
        "pretrained_model_name_or_path": str(tiny_models["sd"]), "guidance_scale": 100.0,
        "half_precision_weights": False})
    image = torch.rand(1, H, W, 3, device=DEVICE, requires_grad=True)
    host = sd(image, sd_pp(), **_cameras(1), rgb_as_latents=False)
    assert torch.isfinite(host["loss_sds"]) and host["loss_sds"] > 0
    host["loss_sds"].backward()
    assert image.grad.abs().sum() > 0 and torch.isfinite(image.grad).all()


def test_video_prompt_cache_files_appear_whole_or_not_at_all(threestudio, tiny_models, cwd, monkeypatch, tmp_path):
    # Two runs in one checkout share .threestudio_cache and the host loads any file that exists: a writer that
    # dies (or is still writing) must not leave a partial file under the final name.
    processor = threestudio.find("a124-video-prompt-processor")
    model = str(tiny_models["text-to-video"])
    real_save = torch.save

    def dies_half_way(obj, path, *args, **kwargs):
        with open(path, "wb") as f:
            f.write(b"PK\x03\x04 half")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", dies_half_way)
    with pytest.raises(OSError, match="disk full"):
        processor.spawn_func(model, ["a panda is dancing"], str(tmp_path))
    assert list(tmp_path.iterdir()) == []
    monkeypatch.setattr(torch, "save", real_save)
    processor.spawn_func(model, ["a panda is dancing"], str(tmp_path))
    (cached,) = tmp_path.iterdir()
    assert torch.load(cached, weights_only=True).shape[-1] > 0


def _StateAtStepStart():
    """A StepRecorder that also keeps the geometry's parameters as they were when each step began."""
    rec = StepRecorder()
    rec.states = {}

    def on_train_batch_start(trainer, pl_module, batch, batch_idx):
        rec.states[pl_module.true_global_step] = {
            k: v.detach().clone() for k, v in pl_module.geometry.state_dict().items()}

    rec.on_train_batch_start = on_train_batch_start
    return rec


def test_system_refine_with_controlnet_slot(threestudio, tiny_models, example_rgba, cwd):
    rgba = example_rgba
    _write_embeds(cwd / "embeds.safetensors")
    rec = _StateAtStepStart()
    cfg, system, trainer = _run(threestudio, _config(tiny_models, rgba, cwd, steps=(1, 1, 2), with_cn=True), cwd,
                                callbacks=[rec])
    assert [s["stage"] for s in rec.steps] == ["static", "dynamic", "refine", "refine"]
    for info in rec.steps:
        assert ("cn" in info["guidances"]) == (info["stage"] == "refine"), info
    # the ControlNet condition came from a copy frozen when refine began (step 2), untouched by the refine steps
    frozen = system.frozen_geometry
    assert frozen is not None and not any(p.requires_grad for p in frozen.parameters())
    at_refine_start = rec.states[2]
    for key, value in frozen.state_dict().items():
        # Lightning moves the module back to the CPU when fit ends on a GPU: compare on one device
        torch.testing.assert_close(value, at_refine_start[key].to(value.device), msg=key)
    live = system.geometry.state_dict()
    assert not torch.equal(live["field.encoding_time.embeddings"],
                           frozen.state_dict()["field.encoding_time.embeddings"])


STATIC_SD_CONFIGS = ("animate124.yaml", "animate124-static.yaml", "animate124-zeroscope.yaml", "animate124-smoke.yaml",
                     "animate124-fast.yaml", "animate124-lowvram.yaml")


def _sd15_alphas_cumprod(scheduler_dir: Path) -> torch.Tensor:
    """alpha_bar_t by hand from the scheduler config: SD 1.5's scaled-linear betas, sqrt-spaced from beta_start to
    beta_end, alpha_bar_t = prod_{s <= t} (1 - beta_s)."""
    cfg = json.loads((scheduler_dir / "scheduler_config.json").read_text())
    assert cfg["beta_schedule"] == "scaled_linear"
    betas = torch.linspace(cfg["beta_start"] ** 0.5, cfg["beta_end"] ** 0.5, cfg["num_train_timesteps"],
                           dtype=torch.float64) ** 2
    return torch.cumprod(1 - betas, 0)


def test_static_sd_slot_weights_as_upstream(threestudio, tiny_models, cwd):
    """The stage-1 SD term of every config that has one: the host's unified guidance with w(t) = 1 - sqrt(alpha_bar)
    (upstream's stage-1 config), no HiFA image loss, CFG 100, t in [200, 600]."""
    from omegaconf import OmegaConf

    configs = Path(__file__).resolve().parents[2] / "configs"
    settings = []
    for name in STATIC_SD_CONFIGS:
        slot = OmegaConf.load(configs / name).system.guidances.sd
        assert slot.guidance_type == "stable-diffusion-unified-guidance", name
        guidance_cfg = OmegaConf.to_container(slot.guidance)
        guidance_cfg.pop("pretrained_model_name_or_path")
        guidance_cfg.pop("half_precision_weights", None)
        settings.append(guidance_cfg)
    assert all(s == settings[0] for s in settings)
    assert settings[0] == {"guidance_scale": 100.0, "min_step_percent": 0.2, "max_step_percent": 0.6,
                           "weighting_strategy": "dreamfusion", "use_img_loss": False}
    guidance = threestudio.find("stable-diffusion-unified-guidance")(
        {**settings[0], "pretrained_model_name_or_path": str(tiny_models["sd"]), "half_precision_weights": False})
    processor = threestudio.find("stable-diffusion-prompt-processor")({
        "pretrained_model_name_or_path": str(tiny_models["sd"]), "prompt": "a panda", "spawn": False})
    guidance.update_step(0, 0)
    assert (guidance.min_step, guidance.max_step) == (200, 600)

    alpha_bar = _sd15_alphas_cumprod(Path(tiny_models["sd"]) / "scheduler")
    torch.testing.assert_close(guidance.alphas_cumprod.double().cpu(), alpha_bar, rtol=1e-6, atol=0)
    w = 1 - alpha_bar.sqrt()
    assert w[200].item() == pytest.approx(0.1318456, abs=1e-6) and w[600].item() == pytest.approx(0.5990230, abs=1e-6)
    # the host's stable-diffusion-guidance (weighting "sds", w = 1 - alpha_bar) is 1 + sqrt(alpha_bar) times stronger
    ratio = (1 - alpha_bar[200:601]) / w[200:601]
    assert ratio.min().item() == pytest.approx(1.401, abs=1e-3) and ratio.max().item() == pytest.approx(1.868, abs=1e-3)

    b = 2
    cams = {**_cameras(b), "mvp_mtx": torch.eye(4, device=DEVICE).repeat(b, 1, 1),
            "c2w": torch.eye(4, device=DEVICE).repeat(b, 1, 1)}
    # 1. the real tiny U-Net: the weights it applied are w(t) of its timestep, and loss = 0.5 |g|^2 / B
    torch.manual_seed(0)
    image = torch.rand(b, H, W, 3, device=DEVICE, requires_grad=True)
    out = guidance(image, processor(), **cams, rgb_as_latents=False)
    t = out["timesteps"].cpu()
    assert [k for k in out if k.startswith("loss_")] == ["loss_sd"] and 200 <= t[0] <= 600 and (t == t[0]).all()
    torch.testing.assert_close(out["weights"].flatten().double().cpu(), w[t], rtol=1e-5, atol=0)
    torch.testing.assert_close(out["loss_sd"], 0.5 * out["grad_norm"] ** 2 / b, rtol=1e-4, atol=0)
    out["loss_sd"].backward()
    assert image.grad.abs().sum() > 0

    # 2. the gradient itself, with a predictor known by hand (eps_hat = 0): d loss / d latents = -w(t) eps / B, eps
    # read back from the noisy latents the predictor sees (z_t = sqrt(alpha_bar) z + sqrt(1 - alpha_bar) eps)
    seen = {}

    def zero_prediction(latents_noisy, t, *args, **kwargs):
        seen.update(noisy=latents_noisy.detach().clone(), t=t.detach().clone())
        return torch.zeros_like(latents_noisy)

    guidance.get_eps_pretrain = zero_prediction
    latents = torch.randn(b, 64, 64, 4, device=DEVICE, requires_grad=True)  # 64x64 latents: resized as is
    out = guidance(latents, processor(), **cams, rgb_as_latents=True)
    out["loss_sd"].backward()
    t = seen["t"].cpu()
    a = alpha_bar[t].view(-1, 1, 1, 1)
    z = latents.detach().permute(0, 3, 1, 2).double().cpu()
    eps = (seen["noisy"].double().cpu() - a.sqrt() * z) / (1 - a).sqrt()
    want = -(1 - a.sqrt()) * eps / b
    torch.testing.assert_close(latents.grad.double().cpu(), want.permute(0, 2, 3, 1), rtol=1e-4, atol=1e-6)
    assert eps.std().item() == pytest.approx(1.0, abs=0.05)  # it really was the standard normal noise
