"""``animate124 benchmark`` through the real a124-system on CPU: the shipped default config with tiny models."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def tiny_overrides(tiny: dict) -> list[str]:
    """The default config pointed at the tiny models and shrunk to CPU sizes (the code path is the GPU one)."""
    g = "system.guidances"
    return [
        f"{g}.sd.guidance.pretrained_model_name_or_path={tiny['sd']}", f"{g}.sd.guidance.half_precision_weights=false",
        f"{g}.sd.prompt_processor.pretrained_model_name_or_path={tiny['sd']}",
        f"{g}.zero123.guidance.pretrained_model_name_or_path={tiny['zero123']}",
        f"{g}.zero123.guidance.half_precision_weights=false",
        f"{g}.video.guidance.pretrained_model_name_or_path={tiny['text-to-video']}",
        f"{g}.video.guidance.model_size=[64,64]", f"{g}.video.guidance.half_precision_weights=false",
        f"{g}.video.prompt_processor.pretrained_model_name_or_path={tiny['text-to-video']}",
        f"{g}.cn.guidance.pretrained_model_name_or_path={tiny['sd']}",
        f"{g}.cn.guidance.controlnet_name_or_path={tiny['controlnet-tile']}", f"{g}.cn.guidance.fixed_size=64",
        f"{g}.cn.guidance.half_precision_weights=false",
        f"{g}.cn.prompt_processor.pretrained_model_name_or_path={tiny['sd']}",
        "data.height=16", "data.width=16", "data.random_camera.height=16", "data.random_camera.width=16",
        "data.video.num_frames=4", "data.video.height=16", "data.video.width=16", "data.eval_height=16",
        "data.eval_width=16", "data.n_val_frames=3", "data.n_test_views=2", "data.n_test_frames=2",
        "system.geometry.pos_encoding_config.n_levels=4", "system.geometry.pos_encoding_config.log2_hashmap_size=12",
        "system.geometry.pos_encoding_config.implementation=torch", "system.renderer.num_samples_per_ray=16",
        "system.renderer.occ_grid_res=8", "system.renderer.occ_n_time_slices=4", "system.renderer.implementation=torch",
        "system.exporter.resolution=24", "system.exporter.threshold=auto", "trainer.precision=32",
    ]


@pytest.fixture()
def run_dir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the host's prompt cache is relative to the working directory
    return tmp_path


@pytest.fixture()
def one_thread():
    """On the CPU a step and its floor are both the process's CPU time; with several threads on a loaded machine,
    threads waiting for work add CPU time to either side at random, so the comparison runs on one thread."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_benchmark_default_config_every_stage(threestudio, tiny_models, run_dir, one_thread):
    from step_benchmark.cli import summary_table
    from step_benchmark.runner import benchmark_config

    progress = []
    result = benchmark_config(REPO / "configs" / "animate124.yaml", models_dir=None,
                              overrides=tiny_overrides(tiny_models), warmup=2, steps=2, replays=1, eval_images=2,
                              export_times=1, workdir=run_dir / "bench", on_progress=lambda r: progress.append(json.dumps(r)),
                              profile_to=run_dir / "bench.profile.txt")
    json.dumps(result)  # JSON-ready
    # --profile: warm-up step 1 of each stage and one validation image; no memory tables without CUDA
    profile = (run_dir / "bench.profile.txt").read_text()
    titles = [line for line in profile.splitlines() if line.startswith("=====")]
    assert titles == [f"===== stage {s}: warm-up steps 1..1 (after its first) =====" for s in ("static", "dynamic",
                      "refine")] + ["===== validate image (1 timed apart) ====="], titles
    assert profile.count("-- operators by self device time") == 4 and "memory at the window" not in profile
    # the result so far after training and after each evaluation piece (a run cut short keeps its step numbers)
    partial = [json.loads(text) for text in progress]
    assert [[name for name, ev in r["eval"].items() if ev.get("pending")] for r in partial] == [
        ["validation", "test", "export"], ["test", "export"], ["export"]]
    assert partial[0]["projected"]["missing"] == ["validation", "test", "export"]
    assert partial[0]["stages"] == json.loads(json.dumps(result["stages"]))
    assert result["error"] is None and result["projected"]["missing"] == [], (result["error"], result["eval"])
    stages = {st["name"]: st for st in result["stages"]}
    assert list(stages) == ["static", "dynamic", "refine"]
    assert [st["steps_in_config"] for st in result["stages"]] == [10000, 10000, 5000]
    # the slots each stage holds, and nothing of an earlier stage left alive
    assert stages["static"]["loaded_guidances"] == ["sd", "zero123"]
    assert stages["dynamic"]["loaded_guidances"] == ["video", "zero123"]
    assert stages["refine"]["loaded_guidances"] == ["cn", "video", "zero123"]
    assert all(st["stale_guidances"] == [] for st in result["stages"])
    # the floor holds the networks each stage runs, VAE encodes with their backward
    whats = {name: " | ".join(c["what"] for c in st["floor_calls"]) for name, st in stages.items()}
    assert "UNet2DConditionModel forward" in whats["static"] and "UNet3DConditionModel" not in whats["static"]
    assert "AutoencoderKL encode" in whats["static"] and "+ backward" in whats["static"]
    assert "UNet3DConditionModel forward" in whats["dynamic"] and "ControlNetModel" not in whats["dynamic"]
    assert "ControlNetModel forward" in whats["refine"] and "UNet3DConditionModel forward" in whats["refine"]
    for st in result["stages"]:
        assert len(st["step_ms"]["all"]) == 2 and len(st["floor_ms"]["all"]) == 2
        assert st["step_ms"]["min"] > 0 and st["floor_ms"]["min"] > 0 and st["nonfinite_steps"] == 0
        # ratio of the same run's medians; a whole step holds its floor plus rendering, losses and the optimiser (on the
        # CPU both are the process's CPU time, so other load on the machine cannot invert them)
        assert st["ratio"] == pytest.approx(st["step_ms"]["median"] / st["floor_ms"]["median"], rel=1e-2)
        assert st["ratio"] > 1.0, {k: st[k] for k in ("name", "step_ms", "floor_ms", "floor_calls", "breakdown_ms")}
        b = st["breakdown_ms"]
        assert b["render"] > 0 and b["unets"] > 0 and b["encode"] > 0 and b["backward"] > 0
        # the field's work per step: 16 x 16 views, at most 16 samples per ray marched, central-difference normals
        w = st["work"]
        assert w["rays"] >= 256 and w["rays"] % 256 == 0, w
        assert 0 < w["samples"] <= w["samples_marched"] <= 16 * w["rays"], w
        assert w["normal_queries"] == 6 * w["normal_samples"] > 0, w
        assert w["grid3d_fwd"] >= w["samples"] + w["normal_queries"] and w["grid3d_bwd"] > 0, w
        assert w["samples_per_ray"] == round(w["samples"] / w["rays"], 3)
        assert st["launches"]["aten_ops"] > 1000, st["launches"]  # the trailing step's operators (no CUDA here)
        assert sum(b.values()) == pytest.approx(st["step_ms"]["mean"], rel=1e-3)
    # projection: steps x mean step + switches, 10 validations (25000 // 1000 ... capped by the config) + test + export
    p = result["projected"]
    assert p["validation_runs"] == 25000 // 1000
    train = sum(st["steps_in_config"] * st["step_ms"]["mean"] / 1000 + st["switch_s"] for st in result["stages"])
    assert p["train_s"] == pytest.approx(train, abs=0.1)
    assert p["total_s"] == pytest.approx(p["train_s"] + p["validation_s"] + p["test_s"] + p["export_s"]
                                         + p["overhead_s"], abs=0.5)
    ev = result["eval"]
    assert ev["validation"]["images"] == 3 and ev["test"]["images"] == 3 * 2 + 2 + 2
    assert ev["export"]["times"] == 16 and ev["export"]["timed_times"] == 1 and ev["export"]["ms"] > 0
    assert result["overhead"]["to_first_step_s"] > 0 and set(result["overhead"]["slot_load_s"]) == {
        "sd", "zero123", "video", "cn"}
    assert "static" in summary_table(result)


def test_benchmark_stopped_by_sigterm_keeps_the_stages_measured(threestudio, tiny_models, run_dir, one_thread,
                                                                monkeypatch):
    """`timeout` sends SIGTERM: the benchmark stops training there, keeps the stages it finished and still writes its
    result (before, the process died with nothing written, so a slow compile run lost every stage)."""
    import os
    import signal

    from step_benchmark import runner as benchmark_steps

    make_timer = benchmark_steps.StepTimer

    def stopping_timer(*args, **kwargs):
        timer = make_timer(*args, **kwargs)
        start = timer.on_train_batch_start

        def on_train_batch_start(trainer, pl_module, batch, batch_idx):
            start(trainer, pl_module, batch, batch_idx)
            if pl_module.true_global_step == 5:  # the dynamic stage's second step (stages of 1 + 2 + 1 steps)
                os.kill(os.getpid(), signal.SIGTERM)

        timer.on_train_batch_start = on_train_batch_start
        return timer

    monkeypatch.setattr(benchmark_steps, "StepTimer", stopping_timer)
    handler_before = signal.getsignal(signal.SIGTERM)
    progress = []
    result = benchmark_steps.benchmark_config(
        REPO / "configs" / "animate124.yaml", models_dir=None, overrides=tiny_overrides(tiny_models), warmup=1,
        steps=2, replays=1, eval_images=2, export_times=1, workdir=run_dir / "bench",
        on_progress=lambda r: progress.append(json.loads(json.dumps(r))))
    assert result["error"] == "BenchmarkStopped: stopped by SIGTERM"
    stages = {st["name"]: st for st in result["stages"]}
    assert len(stages["static"]["step_ms"]["all"]) == 2 and stages["static"]["floor_ms"]["median"] > 0
    assert "step_ms" not in stages["dynamic"] and "not measured" in stages["dynamic"]["error"]
    assert "step_ms" not in stages["refine"]
    assert result["projected"]["missing"][:2] == ["dynamic", "refine"]
    # saved once (what `animate124 benchmark --out` writes), with no evaluation piece started after the signal
    assert len(progress) == 1 and progress[0]["stages"] == result["stages"]
    assert all(ev.get("pending") for ev in result["eval"].values())
    assert signal.getsignal(signal.SIGTERM) is handler_before  # our handler is gone again
