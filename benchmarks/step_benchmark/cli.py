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
- ``work`` (means over the timed steps; ``animate124.core.field.work_counters``): rays, samples after the occupancy
  grid (``samples_marched``) and after the alpha threshold (``samples``) and per ray, normal samples and their
  density queries, points through each hash grid's forward and backward (``grid3d_fwd`` ...), Triton launches;
- ``launches``: the kernels one whole (trailing, untimed) step ran: CUDA kernels by torch.profiler on a GPU, ATen
  operators dispatched on the CPU;

then the projected wall time of the whole config (steps x mean step + stage switches + validations + test videos +
export, each timed on a few images / times and scaled) and the overhead before step 1 of a run (imports, nerfacc
build, system build); model loads and Triton / torch.compile compilation are in each stage's first step, counted in
its ``switch_s``.

Models: ``--models DIR`` holds ``animate124 make-tiny-models DIR --full-size`` folders (made there when missing);
every hub id the config names (SD 1.5, ControlNet-Tile, Zero123-XL, ModelScope, ZeroScope) is pointed at them.
``--start-shape blobs`` fits the field to the synthetic 4-D scene's density before step 0 (surfaces, as a run's
dynamic and refine stages start from) instead of the config's soft initial blob, the marcher's worst case.
Random weights: the numbers are honest for time and memory, never for quality.
Run from a threestudio checkout (or set THREESTUDIO_ROOT); real configs need a CUDA GPU (the CPU path is for tests).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from animate124.core.io.atomic_io import write_json

from step_benchmark import NOTE


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
    parser.add_argument("--start-shape", choices=("blob", "blobs"), default="blob",
                        help="blob: the config's initial density (a soft ball, the marcher's worst case); blobs: the "
                             "field first fitted to the synthetic 4-D scene's density, occupancy grid filled from it "
                             "(surfaces, as a run's dynamic and refine stages see)")
    parser.add_argument("--workdir", type=Path, default=None,
                        help="where the short run writes its trial folder (default: a temporary folder)")
    parser.add_argument("--out", type=Path, default=None, help="write the JSON here (default: print it)")


def run(args: argparse.Namespace) -> int:
    from animate124.tools.cli import ToolError

    from step_benchmark.runner import benchmark_config, load_host  # Lightning and torch: only to run

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
            start_shape=args.start_shape,
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


def summary_table(result: dict) -> str:
    """One line per stage (step ms, floor ms, ratio, peak GB) and the projection."""
    lines = [f"{Path(result['config']).name} on {result['device']} ({result['precision']}; {NOTE})",
             f"{'stage':10s} {'step ms':>9s} {'floor ms':>9s} {'ratio':>6s} {'peak GB':>8s} {'steps':>7s} "
             f"{'smp/ray':>7s} {'grid4d f/b':>15s} {'launches':>8s}"]
    for st in result["stages"]:
        if "step_ms" not in st:
            lines.append(f"{st['name']:10s} {st['error']}")
            continue
        peak = f"{st['peak_allocated_gb']:.1f}" if st["peak_allocated_gb"] is not None else "-"
        work, launches = st.get("work") or {}, st.get("launches") or {}
        grid = f"{work.get('grid4d_fwd', 0) / 1e6:.2f}/{work.get('grid4d_bwd', 0) / 1e6:.2f} M"
        n_launch = launches.get("cuda_kernels", launches.get("aten_ops", "-"))
        lines.append(f"{st['name']:10s} {st['step_ms']['median']:9.1f} {st['floor_ms']['median']:9.1f} "
                     f"{st['ratio']:6.2f} {peak:>8s} {st['steps_in_config']:7d} "
                     f"{work.get('samples_per_ray', '-'):>7} {grid:>15s} {n_launch:>8}")
    p = result["projected"]
    lines.append(f"projected {p['total_min']} min = train {p['train_s']} s + {p['validation_runs']} validations "
                 f"{p['validation_s']} s + test {p['test_s']} s + export {p['export_s']} s + start {p['overhead_s']} s"
                 + (f" (missing: {', '.join(p['missing'])})" if p["missing"] else ""))
    return "\n".join(lines)
