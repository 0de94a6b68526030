"""One benchmark run: the config loaded through the host with every stage shortened, the model ids pointed at the
random models, each stage timed, then validation, test and export timed and the whole run projected."""

from __future__ import annotations

import os
import statistics
import sys
import time
from pathlib import Path

from step_benchmark import NOTE
from step_benchmark.floor import CallRecorder, autocast_for
from step_benchmark.start_shape import StartShape
from step_benchmark.timer import Profiles, StepTimer, StopOnSigterm


def load_host() -> None:
    """Load threestudio from ``$THREESTUDIO_ROOT`` or the working directory (a checkout: ``launch.py`` there) and the
    extension through launch.py's own loader (``animate124.tools.host``); the working directory becomes the
    checkout, as for ``launch.py``. Without CUDA the host runs on the CPU (tests)."""
    from animate124.tools.cli import ToolError

    if "threestudio" in sys.modules and "animate124.components" in sys.modules:
        return
    root = Path(os.environ.get("THREESTUDIO_ROOT") or os.getcwd()).resolve()
    if not (root / "launch.py").is_file():
        raise ToolError(f"no threestudio checkout at {root} (no launch.py): run from one or set THREESTUDIO_ROOT")
    from animate124.tools.host import load_extension, use_cpu

    os.chdir(root)  # the host resolves extern/ and its prompt cache against the working directory
    try:
        load_extension(root)
    except RuntimeError as error:
        raise ToolError(str(error).splitlines()[0]) from error
    use_cpu()


def benchmark_config(
    config: str | Path,
    *,
    models_dir: str | Path | None,
    overrides: list[str] = (),
    warmup: int = 3,
    steps: int = 8,
    replays: int = 3,
    eval_images: int = 4,
    export_times: int = 2,
    workdir: str | Path,
    started: float | None = None,
    on_progress=None,
    profile_to: str | Path | None = None,
    start_shape: str = "blob",
) -> dict:
    """Benchmark ``config`` in this process (threestudio already imported, ``a124-*`` registered); see the module
    docstring for what is measured. Returns the result as a JSON-ready dict; ``on_progress(result)``, when given, gets
    the result so far after training and after each evaluation piece (``eval`` entries not yet timed say
    ``"pending"``). ``profile_to``: write torch.profiler tables of warm-up steps 1.. of each stage and of one
    validation image there, and on CUDA the memory table of each stage's trailing step. ``start_shape``: ``blob``
    (the config's initial density) or ``blobs`` (the field fitted to the synthetic 4-D scene first, see
    ``start_shape``)."""
    import pytorch_lightning as pl
    import threestudio
    import torch
    from threestudio.utils.config import load_config
    from threestudio.utils.misc import get_device

    from animate124.core.training.stages import stage_entries

    started = time.perf_counter() if started is None else started
    device = get_device()
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("no CUDA GPU, and threestudio still places models on cuda: load it with animate124.tools.host "
                         "(use_cpu) to run on the CPU")
    workdir = Path(workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    overhead: dict = {"warm_caches": _cache_state()}
    overhead["nerfacc_build_s"] = _nerfacc_build_s(device)
    # 1. the config, pointed at the models, stages shortened to warm-up + timed + 1 trailing step
    cli = list(overrides) + _model_overrides(config, models_dir, overrides, workdir)
    cfg = load_config(str(config), cli_args=cli + [f"exp_root_dir={workdir / 'outputs'}"])
    full_steps = [int(s.steps) for s in stage_entries(cfg.system.stages)]
    per_stage = warmup + steps + 1
    for stage in stage_entries(cfg.system.stages):
        stage.steps = per_stage
    trainer_cfg = dict(cfg.trainer)
    val_every = trainer_cfg.get("val_check_interval") or 0
    val_every = int(val_every) if val_every >= 1 else 0  # threestudio runs validate every N steps (an int)
    for key in ("max_steps", "val_check_interval", "enable_progress_bar", "limit_val_batches", "num_sanity_val_steps",
                "logger", "callbacks", "enable_checkpointing"):
        trainer_cfg.pop(key, None)
    # 2. the real system, datamodule and trainer (launch.py's loggers)
    pl.seed_everything(cfg.seed)
    t0 = time.perf_counter()
    dm = threestudio.find(cfg.data_type)(cfg.data)
    system = threestudio.find(cfg.system_type)(cfg.system)
    system.set_save_dir(os.path.join(cfg.trial_dir, "save"))
    overhead["system_build_s"] = round(time.perf_counter() - t0, 3)
    recorder = CallRecorder(device)
    profiler = Profiles(profile_to) if profile_to else None
    timer = StepTimer(recorder, system, warmup=warmup, steps=steps, replays=replays, profiler=profiler)
    shape = StartShape(start_shape)
    overhead["start_shape"] = shape.info
    trainer = pl.Trainer(
        accelerator="gpu" if device.type == "cuda" else "cpu", devices=1, logger=_loggers(cfg.trial_dir),
        callbacks=[shape, timer], inference_mode=False, enable_progress_bar=False, enable_checkpointing=False,
        limit_val_batches=0, num_sanity_val_steps=0, max_steps=per_stage * len(full_steps), **trainer_cfg,
    )
    fit_error = None
    stopped = StopOnSigterm()
    try:
        with stopped:
            trainer.fit(system, datamodule=dm)
    except Exception as error:  # noqa: BLE001  e.g. out of memory in a late stage: keep the stages measured so far
        fit_error = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
        print(f"animate124 benchmark: training stopped at step {system.true_global_step} ({fit_error})",
              file=sys.stderr)
        recorder.active = False
        recorder.samples.clear()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    overhead["to_first_step_s"] = round((timer.first_step_start or time.perf_counter()) - started, 3)
    overhead["slot_load_s"] = {k: round(v, 3) for k, v in timer.load_s.items()}
    stages = timer.stage_results(full_steps)
    overhead["first_step_excess_s"] = stages[0].get("switch_s")
    # 3. validation, test videos, export: a few images / times, scaled to the config; on the training device (the
    # trainer's teardown moved the system to the CPU, where launch.py's own validation never runs)
    system.to(device)
    autocast = autocast_for(device, str(cfg.trainer.get("precision", "32")))
    evals = {name: {"pending": True} for name in ("validation", "test", "export")}
    context = dict(config=config, device=device, cfg=cfg, cli=cli, warmup=warmup, steps=steps, stages=stages,
                   full_steps=full_steps, val_every=val_every, overhead=overhead, fit_error=fit_error)
    pieces = {
        "validation": (_time_eval, system, dm, "validate", eval_images, autocast, profiler),
        "test": (_time_eval, system, dm, "test", eval_images, autocast),
        "export": (_time_export, system, export_times),
    }
    for name, (measure, *margs) in pieces.items():
        if on_progress is not None:
            on_progress(_assemble(evals=evals, **context))
        if stopped.signalled:  # `timeout` (or kill) asked us to stop: the stages measured so far are saved above
            break
        t0 = time.perf_counter()
        evals[name] = _guarded(measure, *margs)
        print(f"animate124 benchmark: {name} timed in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    return _assemble(evals=evals, **context)


def _assemble(*, config, device, cfg, cli, warmup, steps, stages, full_steps, val_every, overhead, fit_error,
              evals) -> dict:
    """The JSON result from what has been measured so far (projection pieces not measured are listed as missing)."""
    import torch

    n_val_runs = sum(full_steps) // val_every if val_every else 0
    projected = {
        "train_s": sum(st["steps_in_config"] * st["step_ms"]["mean"] / 1000 + st["switch_s"]
                       for st in stages if "step_ms" in st),
        "validation_s": n_val_runs * evals["validation"].get("projected_s", 0.0),
        "test_s": evals["test"].get("projected_s", 0.0),
        "export_s": evals["export"].get("projected_s", 0.0),
        "overhead_s": overhead["to_first_step_s"],
    }
    projected["total_s"] = sum(projected.values())
    projected = {k: round(v, 1) for k, v in projected.items()}
    projected["total_min"] = round(projected["total_s"] / 60, 1)
    projected["validation_runs"] = n_val_runs
    projected["missing"] = [st["name"] for st in stages if "step_ms" not in st] + [
        name for name, ev in evals.items() if "projected_s" not in ev]
    return {
        "config": str(config),
        "note": NOTE,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "precision": str(cfg.trainer.get("precision", "32")),
        "overrides": cli,
        "warmup": warmup,
        "measured_steps": steps,
        "stages": stages,
        "eval": evals,
        "projected": projected,
        "overhead": overhead,
        "peak_allocated_gb": max(st.get("peak_allocated_gb") or 0.0 for st in stages) if device.type == "cuda" else None,
        "error": fit_error,
    }


def _guarded(measure, *args) -> dict:
    """``measure(*args)``, or ``{"error": reason}`` printed on one line: one failing piece never loses the rest."""
    try:
        return measure(*args)
    except Exception as error:  # noqa: BLE001  reported in the JSON and on stderr
        reason = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
        print(f"animate124 benchmark: {measure.__name__.lstrip('_')} skipped ({reason})", file=sys.stderr)
        return {"error": reason}


def _time_eval(system, dm, split: str, images: int, autocast, profiler=None) -> dict:
    """Render ``images`` views of the split through the system's own step, then its epoch end (the video), and scale
    the per-image times to the split's size. In eval mode, as Lightning's loops run them (``fit`` leaves the system
    training: jittered, unchunked renders without normals)."""
    import torch
    from pytorch_lightning.utilities import move_data_to_device

    dm.setup(split)
    loader = dm.val_dataloader() if split == "validate" else dm.test_dataloader()
    step = system.validation_step if split == "validate" else system.test_step
    epoch_end = system.on_validation_epoch_end if split == "validate" else system.on_test_epoch_end
    total = len(loader.dataset)
    times = []
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    was_training = system.training
    system.eval()
    try:
        with torch.no_grad(), autocast():
            for index, batch in enumerate(loader):
                if index >= images:
                    break
                batch = move_data_to_device(batch, system.device)
                sync()
                t0 = time.perf_counter()
                step(batch, index)
                sync()
                times.append((time.perf_counter() - t0) * 1000)
                if profiler is not None and index == 0:  # profiled apart from the timed images
                    profiler.start()
                    step(batch, index)
                    profiler.stop(f"{split} image ({len(times)} timed apart)")
        t0 = time.perf_counter()
        epoch_end()
        video_ms = (time.perf_counter() - t0) * 1000
    finally:
        system.train(was_training)
    per_image = statistics.median(times[1:] if len(times) > 1 else times)
    per_frame = video_ms / max(len(times), 1)
    return {"images": total, "timed_images": len(times), "ms_per_image": round(per_image, 3),
            "video_ms_per_frame": round(per_frame, 3), "projected_s": round(total * (per_image + per_frame) / 1000, 3)}


def _time_export(system, times: int) -> dict:
    """The system's export (meshes per time + animated glb, no videos) on ``times`` of the exporter's times, evenly
    spread, scaled linearly to all of them; at the "auto" density threshold (a few benchmark steps leave the field
    far from a trained one's level)."""
    import torch

    cfg = system.cfg.exporter  # the exporter reads its times when built: change the config, then build it
    n_full = len(cfg.times) if cfg.get("times") else int(cfg.get("n_times", 0) or 0)
    if times <= 0 or n_full <= 0:
        return {"skipped": "--export-times 0" if times <= 0 else "the exporter config has no times / n_times"}
    used = min(times, n_full)
    timed = {"times": None, "n_times": used, "save_video": False, "threshold": "auto"}
    saved = {key: cfg[key] for key in timed if key in cfg}
    for key, value in timed.items():
        cfg[key] = value
    try:
        t0 = time.perf_counter()
        system.on_predict_start()  # builds the exporter, as trainer.predict does
        system.on_predict_epoch_end()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        ms = (time.perf_counter() - t0) * 1000
    finally:
        for key in timed:
            if key in saved:
                cfg[key] = saved[key]
            else:
                del cfg[key]
    return {"times": n_full, "timed_times": used, "ms": round(ms, 3), "projected_s": round(ms * n_full / used / 1000, 3)}


def _model_overrides(config, models_dir, overrides: list[str], workdir: Path) -> list[str]:
    """``--set`` lines pointing every known hub id of the config's guidance slots at ``models_dir/<kind>``, and the
    missing inputs (``???``: image, textual-inversion embedding) at generated ones."""
    from omegaconf import OmegaConf

    from animate124.testing.full_size_models import COMPLETE, FULL_SIZE_KINDS, REPO_IDS, make_full_size_models

    raw = OmegaConf.merge(OmegaConf.load(str(config)), OmegaConf.from_dotlist(list(overrides)))
    slots = OmegaConf.to_container(raw.system.get("guidances") or {}, resolve=False)  # '???' inputs stay unresolved
    out: list[str] = []
    needed = set()
    for slot, entry in slots.items():
        for part, key in (("guidance", "pretrained_model_name_or_path"), ("guidance", "controlnet_name_or_path"),
                          ("prompt_processor", "pretrained_model_name_or_path")):
            value = (entry.get(part) or {}).get(key)
            if isinstance(value, str) and value in REPO_IDS:
                if models_dir is None:
                    raise ValueError(f"system.guidances.{slot}.{part}.{key}={value!r} is a hub id: pass --models DIR "
                                     "(full-size random models are made there when missing)")
                needed.add(REPO_IDS[value])
                out.append(f"system.guidances.{slot}.{part}.{key}={Path(models_dir).resolve() / REPO_IDS[value]}")
    if needed:
        missing = [k for k in FULL_SIZE_KINDS if k in needed and not (Path(models_dir) / k / COMPLETE).is_file()]
        if missing:
            make_full_size_models(models_dir, kinds=missing)
    if OmegaConf.is_missing(raw.data, "image_path"):
        image = workdir / "bench_rgba.png"
        _write_image(image)
        out.append(f"data.image_path={image}")
    if OmegaConf.is_missing(raw.system, "learned_embeds_path"):
        embeds = workdir / "bench_embeds.safetensors"
        sd = _slot_sd_folder(raw, slots, out)
        if sd is None:
            raise ValueError("system.learned_embeds_path is ??? and no textual-inversion slot names an SD 1.5 folder "
                             "to size an embedding for: set system.learned_embeds_path")
        from animate124.testing.smoke_assets import write_smoke_embedding

        write_smoke_embedding(str(embeds), sd)
        out.append(f"system.learned_embeds_path={embeds}")
    return out


def _slot_sd_folder(raw, slots: dict, out: list[str]) -> str | None:
    """The SD 1.5 folder of the textual-inversion prompt processor's slot (after the overrides above)."""
    from omegaconf import OmegaConf

    for slot, entry in slots.items():
        if entry.get("prompt_processor_type") != "a124-textual-inversion-prompt-processor":
            continue
        key = f"system.guidances.{slot}.prompt_processor.pretrained_model_name_or_path"
        value = next((line.split("=", 1)[1] for line in out if line.startswith(key + "=")), None)
        if value is None:
            value = OmegaConf.select(raw, key, default=None)
        if isinstance(value, str) and Path(value, "text_encoder").is_dir():
            return value
    return None


def _write_image(path: Path) -> None:
    from animate124.testing.smoke_assets import write_smoke_image

    path.parent.mkdir(parents=True, exist_ok=True)
    write_smoke_image(str(path), size=256)


def _loggers(trial_dir: str) -> list:
    """launch.py's loggers (TensorBoard when installed, CSV): their per-step cost is part of a real step."""
    from pytorch_lightning.loggers import CSVLogger

    loggers = [CSVLogger(trial_dir, name="csv_logs")]
    try:
        from pytorch_lightning.loggers import TensorBoardLogger

        os.makedirs(os.path.join(trial_dir, "tb_logs"), exist_ok=True)
        loggers.insert(0, TensorBoardLogger(trial_dir, name="tb_logs"))
    except (ImportError, ModuleNotFoundError):
        pass
    return loggers


def _nerfacc_build_s(device) -> float | None:
    """Seconds to load (on a fresh machine: compile) nerfacc's CUDA backend; None on CPU or without nerfacc."""
    if device.type != "cuda":
        return None
    t0 = time.perf_counter()
    try:
        from nerfacc.cuda._backend import _C  # noqa: F401
    except Exception as error:  # noqa: BLE001  a failed build is reported, the run goes on (torch marching)
        print(f"animate124 benchmark: nerfacc's CUDA backend did not load ({error})", file=sys.stderr)
        return None
    return round(time.perf_counter() - t0, 3)


def _cache_state() -> dict:
    """Whether the compile caches that make a second run start faster already had files (fresh machine: no)."""
    home = Path.home()
    dirs = {
        "triton": Path(os.environ.get("TRITON_CACHE_DIR", home / ".triton" / "cache")),
        "torch_extensions": Path(os.environ.get("TORCH_EXTENSIONS_DIR", home / ".cache" / "torch_extensions")),
    }
    return {name: path.is_dir() and any(path.iterdir()) for name, path in dirs.items()}
