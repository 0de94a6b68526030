"""Time whole training steps of a config per stage against their diffusion floor (JSON out)

    animate124 benchmark CONFIG --models DIR [--warmup 3] [--steps 8] [--out bench.json] [--set key=value ...]

Runs the config's real ``a124-system`` under threestudio (its ``load_config``, ``find``, a Lightning ``Trainer`` and
the host's loggers) with every stage shortened to warm-up + measured steps (+ one trailing step), and reports per
stage:

- ``step_ms``: whole optimisation steps (forward, backward, optimiser, Lightning's bookkeeping and logging, data),
  timed from one step's start to the next with the GPU synchronised there;
- ``floor_ms``: the diffusion floor of the same steps, measured in the same run: every U-Net / ControlNet forward and
  every VAE encode the steps made (recorded during the measured steps with their exact inputs, shapes, dtypes, grad
  and autocast state) is replayed alone, VAE encodes that carried gradient with their backward;
  ``ratio`` = median step / median floor (``ratio_mean`` with means, the one the projected time follows);
- ``breakdown_ms`` (means): render forward, VAE encode forward, U-Net forwards, backward (all of it: renderer, VAE),
  rest (losses, optimiser, bookkeeping);
- ``first_step_ms`` and ``switch_s`` (the first step's excess over the mean step: model loads, Triton and
  ``torch.compile`` compilation; plus the excess of any later step in which ``torch.compile`` built a graph or
  ``cuda-graphs`` recorded one, those steps listed by offset in ``compile_steps`` and left out of ``step_ms``),
  counted once in the projection;
- ``peak_allocated_gb`` / ``peak_reserved_gb`` over the stage (model loads included), ``resident_gb`` after its first
  step, and ``stale_guidances``: slots of earlier stages whose networks are still alive (should be none);

then the projected wall time of the whole config (steps x mean step + stage switches + validations + test videos +
export, each timed on a few images / times and scaled) and the overhead before step 1 of a run (imports, nerfacc
build, system build); model loads and Triton / torch.compile compilation are in each stage's first step, counted in
its ``switch_s``.

Models: ``--models DIR`` holds ``animate124 make-tiny-models DIR --full-size`` folders (made there when missing);
every hub id the config names (SD 1.5, ControlNet-Tile, Zero123-XL, ModelScope, ZeroScope) is pointed at them.
Random weights: the numbers are honest for time and memory, never for quality.
Run from a threestudio checkout (or set THREESTUDIO_ROOT); real configs need a CUDA GPU (the CPU path is for tests).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import signal
import statistics
import sys
import threading
import time
import weakref
from contextlib import contextmanager, nullcontext
from pathlib import Path

from animate124.core.atomic_io import write_json

NOTE = "random weights: honest for time and memory, never for quality"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", type=Path, help="a training config (e.g. configs/animate124.yaml)")
    parser.add_argument("--models", type=Path, default=None,
                        help="folder of full-size random models (made here when missing); hub ids in the config "
                             "are pointed at its sub-folders")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps at the start of every stage")
    parser.add_argument("--steps", type=int, default=8, help="timed steps per stage (median / mean over them)")
    parser.add_argument("--replays", type=int, default=3, help="timed replays of each floor call (median)")
    parser.add_argument("--eval-images", type=int, default=4,
                        help="validation / test images rendered to time them (the first is a warm-up)")
    parser.add_argument("--export-times", type=int, default=2,
                        help="mesh times exported to time the export, scaled to the config's n_times (0: skip)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="config override, as on launch.py's command line (repeatable)")
    parser.add_argument("--profile", action="store_true",
                        help="also profile (torch.profiler) the warm-up steps after each stage's first, and one "
                             "validation image, into OUT.profile.txt: the operators by GPU and CPU time and the "
                             "Python functions by cumulative time (cProfile); on CUDA also the memory live at the peak "
                             "of each stage's trailing (untimed) step, by the code that allocated it; the timed steps "
                             "stay unprofiled; needs --warmup >= 2 and --out")
    parser.add_argument("--workdir", type=Path, default=None,
                        help="where the short run writes its trial folder (default: a temporary folder)")
    parser.add_argument("--out", type=Path, default=None, help="write the JSON here (default: print it)")


def run(args: argparse.Namespace) -> int:
    from animate124.tools.cli import ToolError

    started = time.perf_counter()
    if not args.config.is_file():
        raise ToolError(f"config {args.config} does not exist")
    if args.warmup < 1 or args.steps < 2:
        raise ToolError(f"--warmup {args.warmup} / --steps {args.steps}: need at least 1 warm-up and 2 timed steps")
    if args.profile and (args.warmup < 2 or args.out is None):
        raise ToolError("--profile needs --warmup 2 or more (the first step of a stage loads and compiles) and --out")
    if args.out is not None and args.out.exists():
        raise ToolError(f"{args.out} already exists: choose another --out (results are never overwritten)")
    config = args.config.resolve()
    t0 = time.perf_counter()
    load_host()
    import_s = time.perf_counter() - t0
    import tempfile

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="a124-bench-"))

    def save(result: dict) -> None:  # after training and after each evaluation piece: a run cut short keeps its numbers
        result["overhead"]["import_s"] = round(import_s, 3)
        if args.out is not None:
            write_json(args.out, result, indent=2)

    try:
        result = benchmark_config(
            config, models_dir=args.models, overrides=args.overrides, warmup=args.warmup, steps=args.steps,
            replays=args.replays, eval_images=args.eval_images, export_times=args.export_times, workdir=workdir,
            started=started, on_progress=save, profile_to=_profile_path(args.out) if args.profile else None,
        )
    except (ValueError, FileNotFoundError) as error:
        raise ToolError(str(error).splitlines()[0]) from error
    save(result)
    if args.out is None:
        print(json.dumps(result, indent=2))
    print(summary_table(result), file=sys.stderr)
    return 0


def _profile_path(out: Path) -> Path:
    return out.with_name(out.stem + ".profile.txt")


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
) -> dict:
    """Benchmark ``config`` in this process (threestudio already imported, ``a124-*`` registered); see the module
    docstring for what is measured. Returns the result as a JSON-ready dict; ``on_progress(result)``, when given, gets
    the result so far after training and after each evaluation piece (``eval`` entries not yet timed say
    ``"pending"``). ``profile_to``: write torch.profiler tables of warm-up steps 1.. of each stage and of one
    validation image there, and on CUDA the memory table of each stage's trailing step."""
    import pytorch_lightning as pl
    import threestudio
    import torch
    from threestudio.utils.config import load_config
    from threestudio.utils.misc import get_device

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
    full_steps = [int(s.steps) for s in cfg.system.stages]
    per_stage = warmup + steps + 1
    for stage in cfg.system.stages:
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
    trainer = pl.Trainer(
        accelerator="gpu" if device.type == "cuda" else "cpu", devices=1, logger=_loggers(cfg.trial_dir),
        callbacks=[timer], inference_mode=False, enable_progress_bar=False, enable_checkpointing=False,
        limit_val_batches=0, num_sanity_val_steps=0, max_steps=per_stage * len(full_steps), **trainer_cfg,
    )
    fit_error = None
    stopped = _StopOnSigterm()
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
    autocast = _autocast(device, str(cfg.trainer.get("precision", "32")))
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


def summary_table(result: dict) -> str:
    """One line per stage (step ms, floor ms, ratio, peak GB) and the projection."""
    lines = [f"{Path(result['config']).name} on {result['device']} ({result['precision']}; {NOTE})",
             f"{'stage':10s} {'step ms':>9s} {'floor ms':>9s} {'ratio':>6s} {'peak GB':>8s} {'steps':>7s}"]
    for st in result["stages"]:
        if "step_ms" not in st:
            lines.append(f"{st['name']:10s} {st['error']}")
            continue
        peak = f"{st['peak_allocated_gb']:.1f}" if st["peak_allocated_gb"] is not None else "-"
        lines.append(f"{st['name']:10s} {st['step_ms']['median']:9.1f} {st['floor_ms']['median']:9.1f} "
                     f"{st['ratio']:6.2f} {peak:>8s} {st['steps_in_config']:7d}")
    p = result["projected"]
    lines.append(f"projected {p['total_min']} min = train {p['train_s']} s + {p['validation_runs']} validations "
                 f"{p['validation_s']} s + test {p['test_s']} s + export {p['export_s']} s + start {p['overhead_s']} s"
                 + (f" (missing: {', '.join(p['missing'])})" if p["missing"] else ""))
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------------------
# recording calls and steps


class CallRecorder:
    """Wraps the renderer's ``forward``, every U-Net / ControlNet ``forward`` and every VAE ``encode`` of the loaded
    guidances. While ``active`` it times each call (CUDA events; wall clock on CPU) and keeps the first call of each
    distinct signature (module, input shapes and dtypes, grad, autocast and attention-kernel state) with a detached
    copy of its inputs, to replay it alone for the floor, in the same states."""

    def __init__(self, device):
        self.device = device
        self.active = False
        self.pending: list[tuple] = []  # (category, key, start, end) of the current step
        self.samples: dict = {}  # key -> (call, (args, kwargs), grad, (autocast, attention), backward, label)
        self.modules: dict[str, list] = {}  # slot -> weak references to its networks

    def mark(self):
        import torch

        if self.device.type == "cuda":
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return self.clock()

    def clock(self) -> float:
        """Seconds for whole steps: wall clock on a GPU; on the CPU (tests) the process's CPU time, so that other load
        on a shared machine cannot make a step look cheaper than its own floor."""
        return time.perf_counter() if self.device.type == "cuda" else time.process_time()

    def elapsed_ms(self, start, end) -> float:
        if self.device.type == "cuda":
            return start.elapsed_time(end)
        return (end - start) * 1000

    def wrap(self, module, method: str, category: str) -> None:
        call = getattr(module, method)
        if getattr(call, "_a124_bench", False):
            return
        recorder, label = self, type(module).__name__

        def timed(*args, **kwargs):
            if not recorder.active:
                return call(*args, **kwargs)
            start = recorder.mark()
            out = call(*args, **kwargs)
            end = recorder.mark()
            key = None
            if category != "render":
                key = recorder._remember(module, method, label, category, args, kwargs)
            recorder.pending.append((category, key, start, end))
            return out

        timed._a124_bench = True
        setattr(module, method, timed)

    def attach_slot(self, name: str, *objects) -> None:
        """Wrap the networks found in a loaded slot's guidance / prompt processor (attributes, 4 levels deep)."""
        from animate124.core.diffusion_networks import find_networks

        found = find_networks(objects, depth=4)
        for module in found.denoisers:
            self.wrap(module, "forward", "unets")
        for module in found.vaes:
            self.wrap(module, "encode", "encode")
        self.modules[name] = [weakref.ref(m) for m in found.all()]

    def _remember(self, module, method, label, category, args, kwargs):
        import torch

        from animate124.core.cuda_graphs import autocast_state

        grad = torch.is_grad_enabled()
        # the attention kernels allowed (sds picks the math kernel for half VAEs): part of what the call costs
        states = (autocast_state(self.device), _attention_state())
        backward = category == "encode" and grad and _first_tensor_arg(args, kwargs).requires_grad
        key = (id(module), category, _signature((args, kwargs)), grad, states, backward)
        if key not in self.samples:
            shapes = [list(t.shape) for t in _tensors((args, kwargs))][:2]
            what = f"{label} {'encode' if category == 'encode' else 'forward'} {shapes}"
            what += " + backward" if backward else ""
            # replayed through the module's own __call__ / method (its hooks run, this wrapper passes through)
            call = module if method == "forward" else getattr(module, method)
            self.samples[key] = (call, _detached((args, kwargs)), grad, states, backward, what)
        return key

    def replay(self, replays: int) -> dict:
        """Median milliseconds of each remembered call replayed alone (after one warm-up); forgets the inputs."""
        import torch

        self.active = False
        timings = {}
        for key, (call, (args, kwargs), grad, (autocast, attention), backward, what) in self.samples.items():
            def once():
                with torch.set_grad_enabled(grad), _autocast_ctx(self.device, autocast), _attention_ctx(attention):
                    if backward:
                        x = _first_tensor_arg(args, kwargs).detach().requires_grad_(True)
                        a = (x,) + tuple(args[1:]) if args else args
                        out = call(*a, **kwargs)
                        _output_tensor(out).float().sum().backward()
                    else:
                        call(*args, **kwargs)

            try:
                once()
            except Exception as error:  # noqa: BLE001  reported: that call is left out of the floor
                print(f"animate124 benchmark: replay of {what} failed ({type(error).__name__}: {error})",
                      file=sys.stderr)
                continue
            times = []
            for _ in range(replays):
                start = self.mark()
                once()
                end = self.mark()
                self.sync()
                times.append(self.elapsed_ms(start, end))
            timings[key] = (statistics.median(times), what)
        self.samples.clear()
        return timings

    def sync(self) -> None:
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


class Profiles:
    """Profiled windows written one after another to a text file: per window the operators by self device and by self
    CPU time (torch.profiler) and the Python functions by cumulative time (cProfile), to find what a step spends
    beyond its floor. On CUDA, apart from those windows (recording every allocation's Python stack would inflate their
    CPU times), the memory live at a window's peak by the code that allocated it (``memory_peak``)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(f"animate124 benchmark --profile ({NOTE})\n")
        self.current = None
        self.memory = None

    def start(self) -> None:
        import cProfile

        import torch
        from torch.profiler import ProfilerActivity, profile

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
        self.current = (profile(activities=activities), cProfile.Profile())
        self.current[0].__enter__()
        self.current[1].enable()

    def stop(self, title: str) -> None:
        import torch

        if self.current is None:
            return
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        import io
        import pstats

        (prof, python), self.current = self.current, None
        python.disable()
        prof.__exit__(None, None, None)
        events = prof.key_averages()
        stream = io.StringIO()
        pstats.Stats(python, stream=stream).sort_stats("cumulative").print_stats(
            r"animate124|threestudio|lightning|diffusers|torch/(optim|nn/functional)", 40)
        cuda_key = "self_cuda_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
        self._write([f"\n===== {title} =====", "-- operators by self device time",
                     events.table(sort_by=cuda_key, row_limit=25),
                     "-- operators by self CPU time", events.table(sort_by="self_cpu_time_total", row_limit=25),
                     "-- Python functions by cumulative time (cProfile)", stream.getvalue().split("\n", 4)[-1]])

    def start_memory(self) -> None:
        from animate124.tools.memory_peak import MemoryWindow

        self.memory = MemoryWindow()
        self.memory.start()

    def stop_memory(self, title: str) -> None:
        if self.memory is None:
            return
        table, self.memory = self.memory.stop(), None
        if table is not None:  # None without CUDA
            self._write([f"\n===== {title} =====", "-- memory at the window's peak, by allocating code", table])

    def _write(self, parts: list[str]) -> None:
        with open(self.path, "a") as f:
            f.write("\n".join(parts) + "\n")


def StepTimer(recorder: CallRecorder, system, *, warmup: int, steps: int, replays: int, profiler=None):
    """A Lightning callback timing every step of the shortened run (built on call: Lightning is imported late)."""
    import pytorch_lightning as pl
    import torch

    from animate124.core.stages import stage_at

    class _StepTimer(pl.Callback):
        def __init__(self):
            super().__init__()
            self.records: list[dict] = []
            self.floors: dict[str, dict] = {}  # stage -> {key: (ms, what)}
            self.stage_memory: dict[str, dict] = {}
            self.load_s: dict[str, float] = {}
            self.current = None
            self.first_step_start = None
            self._wrap_system()

        def _wrap_system(self):
            recorder.wrap(system.renderer, "forward", "render")
            slots = system.guidance_slots
            keep_only = slots.keep_only

            def timed_keep_only(names, *args, **kwargs):
                before = set(slots.guidances)
                recorder.sync()
                t0 = time.perf_counter()
                keep_only(names, *args, **kwargs)
                recorder.sync()
                new = [n for n in slots.guidances if n not in before]
                for name in new:  # the loads of one stage start, shared between its new slots
                    self.load_s[name] = (time.perf_counter() - t0) / len(new)
                    recorder.attach_slot(name, slots.guidances.get(name), slots.prompt_processors.get(name))

            slots.keep_only = timed_keep_only

        def _role(self, step: int):
            pos = stage_at(system.stages, step)
            offset = step - sum(s.steps for s in system.stages[: pos.index])
            role = "warmup" if offset < warmup else "measure" if offset < warmup + steps else "trailing"
            return pos.stage.name, role, offset

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            recorder.sync()
            now = recorder.clock()
            step = pl_module.true_global_step
            name, role, offset = self._role(step)
            if profiler is not None and offset == warmup:  # the profiled warm-up steps of this stage are over
                profiler.stop(f"stage {name}: warm-up steps 1..{warmup - 1} (after its first)")
                recorder.sync()
                now = recorder.clock()
            self._close(now)
            if self.first_step_start is None:
                self.first_step_start = time.perf_counter()
            if role == "trailing":  # the stage's timed window is over: its floor, while its networks are loaded
                self.floors[name] = recorder.replay(replays)
                if profiler is not None:  # and what its memory peak is made of, in this untimed step
                    profiler.start_memory()
            recorder.active = role == "measure"
            recorder.pending = []
            if profiler is not None and offset == 1 and warmup >= 2:
                profiler.start()
            self.current = {"step": step, "stage": name, "role": role, "offset": offset, "t0": now,
                            "fwd0": recorder.mark(), "fwd1": None, "bwd1": None, "finite": None,
                            "graphs0": _compiled_graphs()}

        def on_before_backward(self, trainer, pl_module, loss):
            self.current["fwd1"] = recorder.mark()
            self.current["finite"] = torch.isfinite(loss.detach()).all()

        def on_after_backward(self, trainer, pl_module):
            self.current["bwd1"] = recorder.mark()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            recorder.sync()
            cur = self.current
            if profiler is not None and cur["role"] == "trailing":
                profiler.stop_memory(f"stage {cur['stage']}: its trailing step (after the timed ones)")
            cur["end"] = recorder.clock()
            cur["categories"] = {c: 0.0 for c in ("render", "encode", "unets")}
            cur["floor_keys"] = []
            for category, key, start, end in recorder.pending:
                cur["categories"][category] += recorder.elapsed_ms(start, end)
                if key is not None:
                    cur["floor_keys"].append(key)
            recorder.pending = []
            if cur["fwd1"] is not None and cur["bwd1"] is not None:
                cur["forward_ms"] = recorder.elapsed_ms(cur["fwd0"], cur["fwd1"])
                cur["backward_ms"] = recorder.elapsed_ms(cur["fwd1"], cur["bwd1"])
            cur["finite"] = bool(cur["finite"]) if cur["finite"] is not None else True
            cur["compiles"] = _compiled_graphs() - cur.pop("graphs0")  # graphs compiled / recorded in this step
            for k in ("fwd0", "fwd1", "bwd1"):
                cur.pop(k)
            memory = self.stage_memory.setdefault(cur["stage"], {})
            if cur["offset"] == 0:
                gc.collect()
                memory["stale_guidances"] = sorted(
                    slot for slot, refs in recorder.modules.items()
                    if slot not in system.guidance_slots.guidances and any(r() is not None for r in refs)
                )
                memory["guidances"] = sorted(system.guidance_slots.guidances)
                memory["resident_gb"] = _gb(torch.cuda.memory_allocated()) if torch.cuda.is_available() else None
            if cur["role"] == "measure" and cur["offset"] == warmup + steps - 1 and torch.cuda.is_available():
                memory["peak_allocated_gb"] = _gb(torch.cuda.max_memory_allocated())
                memory["peak_reserved_gb"] = _gb(torch.cuda.max_memory_reserved())

        def on_train_end(self, trainer, pl_module):
            self._close(self.current["end"] if self.current else recorder.clock())
            recorder.active = False

        def _close(self, now):
            if self.current is not None:
                self.current["wall_ms"] = (now - self.current.pop("t0")) * 1000
                self.current.pop("end", None)
                self.records.append(self.current)
                self.current = None

        def stage_results(self, full_steps: list[int]) -> list[dict]:
            out = []
            for index, stage in enumerate(system.stages):
                rows = [r for r in self.records if r["stage"] == stage.name]
                timed = [r for r in rows if r["role"] == "measure"]
                if not timed or stage.name not in self.floors:
                    out.append({"name": stage.name, "steps_in_config": full_steps[index],
                                "error": "not measured (training stopped before this stage's timed steps ended)"})
                    continue
                floors = self.floors.get(stage.name, {})
                # a step that compiled (a network first called in it, or a new shape) is a one-time cost: out of the
                # step statistics (unless every timed step compiled) and into switch_s below, as the first step is
                timed = [r for r in timed if not r.get("compiles")] or timed
                step_ms = [r["wall_ms"] for r in timed]
                floor_ms = [sum(floors[k][0] for k in r["floor_keys"] if k in floors) for r in timed]
                mean_step, mean_floor = statistics.mean(step_ms), statistics.mean(floor_ms)
                breakdown = {c: statistics.mean(r["categories"][c] for r in timed) for c in ("render", "encode", "unets")}
                breakdown["backward"] = statistics.mean(r.get("backward_ms", 0.0) for r in timed)
                breakdown["rest"] = mean_step - sum(breakdown.values())
                calls = {}
                for r in timed:
                    for k in r["floor_keys"]:
                        if k in floors:
                            ms, what = floors[k]
                            calls.setdefault(what, {"what": what, "ms": round(ms, 3), "calls_per_step": 0})
                            calls[what]["calls_per_step"] += 1 / len(timed)
                memory = self.stage_memory.get(stage.name, {})
                first = rows[0]["wall_ms"] if rows else 0.0
                late_compiles = sum(max(r["wall_ms"] - mean_step, 0.0) for r in rows[1:] if r.get("compiles"))
                out.append({
                    "name": stage.name,
                    "steps_in_config": full_steps[index],
                    "guidances": list(stage.guidances),
                    "step_ms": _stats(step_ms),
                    "floor_ms": _stats(floor_ms),
                    "ratio": round(statistics.median(step_ms) / max(statistics.median(floor_ms), 1e-9), 3),
                    "ratio_mean": round(mean_step / max(mean_floor, 1e-9), 3),
                    "breakdown_ms": {k: round(v, 3) for k, v in breakdown.items()},
                    "floor_calls": [dict(c, calls_per_step=round(c["calls_per_step"], 3)) for c in calls.values()],
                    "first_step_ms": round(first, 3),
                    "switch_s": round((max(first - mean_step, 0.0) + late_compiles) / 1000, 3),
                    "compile_steps": [r["offset"] for r in rows if r.get("compiles")],
                    "nonfinite_steps": sum(not r["finite"] for r in rows),
                    "peak_allocated_gb": memory.get("peak_allocated_gb"),
                    "peak_reserved_gb": memory.get("peak_reserved_gb"),
                    "resident_gb": memory.get("resident_gb"),
                    "loaded_guidances": memory.get("guidances", []),
                    "stale_guidances": memory.get("stale_guidances", []),
                })
            return out

    return _StepTimer()


# ----------------------------------------------------------------------------------------------------------------------
# validation, test, export


class BenchmarkStopped(Exception):
    """SIGTERM during training (e.g. from ``timeout``): raised inside the training loop so that Lightning tears down
    and the stages already measured are kept, instead of the process dying with nothing written."""


class _StopOnSigterm:
    """Context manager: SIGTERM raises :class:`BenchmarkStopped` (main thread only; elsewhere it does nothing)."""

    def __init__(self) -> None:
        self.signalled = False
        self._previous = None

    def _raise(self, signum, frame) -> None:
        self.signalled = True
        raise BenchmarkStopped(f"stopped by {signal.Signals(signum).name}")

    def __enter__(self) -> "_StopOnSigterm":
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._raise)
        return self

    def __exit__(self, *exc) -> bool:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
        return False


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


# ----------------------------------------------------------------------------------------------------------------------
# helpers


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
        from animate124.tools.smoke_assets import write_smoke_embedding

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
    from animate124.tools.smoke_assets import write_smoke_image

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


def _compiled_graphs() -> int:
    """Graphs torch.compile has built (0 while torch._dynamo was never imported) and CUDA graphs ``cuda-graphs``
    has recorded so far in this process."""
    from animate124.core.cuda_graphs import records_total

    dynamo_utils = sys.modules.get("torch._dynamo.utils")
    return (int(dynamo_utils.counters["stats"]["unique_graphs"]) if dynamo_utils is not None else 0) + records_total()


def _tensors(obj):
    import torch

    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _tensors(v)
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _tensors(v)


def _signature(obj):
    import torch

    if isinstance(obj, torch.Tensor):
        return ("T", tuple(obj.shape), str(obj.dtype), obj.requires_grad)
    if isinstance(obj, (list, tuple)):
        return tuple(_signature(v) for v in obj)
    if isinstance(obj, dict):
        return tuple((k, _signature(v)) for k, v in sorted(obj.items()))
    return repr(obj)[:80]


def _detached(obj):
    import torch

    if isinstance(obj, torch.Tensor):
        return obj.detach().clone()
    if isinstance(obj, tuple):
        return tuple(_detached(v) for v in obj)
    if isinstance(obj, list):
        return [_detached(v) for v in obj]
    if isinstance(obj, dict):
        return {k: _detached(v) for k, v in obj.items()}
    return obj


def _first_tensor_arg(args, kwargs):
    for t in _tensors((args, kwargs)):
        return t
    raise ValueError("a recorded VAE encode had no tensor input")


def _output_tensor(out):
    """The tensor a VAE encode returns (the posterior's parameters, or AutoencoderTiny's latents)."""
    import torch

    if isinstance(out, torch.Tensor):
        return out
    dist = getattr(out, "latent_dist", None)
    if dist is not None:
        return dist.parameters
    if getattr(out, "latents", None) is not None:
        return out.latents
    return out[0] if not hasattr(out[0], "parameters") else out[0].parameters


_ATTENTION_FLAGS = (  # (getter, setter) in torch.backends.cuda; those this torch lacks are skipped
    ("flash_sdp_enabled", "enable_flash_sdp"), ("mem_efficient_sdp_enabled", "enable_mem_efficient_sdp"),
    ("math_sdp_enabled", "enable_math_sdp"), ("cudnn_sdp_enabled", "enable_cudnn_sdp"),
    ("fp16_bf16_reduction_math_sdp_allowed", "allow_fp16_bf16_reduction_math_sdp"),
)


def _attention_state() -> tuple:
    """Which scaled-dot-product attention kernels are allowed now (global flags, as ``sdpa_kernel`` sets them)."""
    import torch

    backends = torch.backends.cuda
    return tuple((setter, getattr(backends, getter)()) for getter, setter in _ATTENTION_FLAGS
                 if hasattr(backends, getter) and hasattr(backends, setter))


@contextmanager
def _attention_ctx(state: tuple):
    import torch

    backends = torch.backends.cuda
    before = _attention_state()
    try:
        for setter, value in state:
            getattr(backends, setter)(value)
        yield
    finally:
        for setter, value in before:
            getattr(backends, setter)(value)


def _autocast_ctx(device, state):
    import torch

    enabled, dtype = state
    return torch.autocast(device.type, dtype=dtype) if enabled else nullcontext()


def _autocast(device, precision: str):
    """The trainer's precision context for evaluation renders (Lightning applies it in validation / test)."""
    import torch

    def ctx():
        if precision.startswith("16") and device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.float16)
        if precision.startswith("bf16"):
            return torch.autocast(device.type, dtype=torch.bfloat16)
        return nullcontext()

    return ctx


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


def _stats(values: list[float]) -> dict:
    return {"median": round(statistics.median(values), 3), "mean": round(statistics.mean(values), 3),
            "min": round(min(values), 3), "max": round(max(values), 3), "all": [round(v, 3) for v in values]}


def _gb(n_bytes: int) -> float:
    return round(n_bytes / 2**30, 3)

