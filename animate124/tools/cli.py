"""The ``animate124`` command: one entry point, one sub-command per tool.

    animate124 preprocess IMAGE --out DIR         background removal, recentring, depth
    animate124 invert IMAGE --token T --init W    textual inversion on Stable Diffusion 1.5
    animate124 evaluate RUN_DIR | --batch DIR     CLIP-T, CLIP-I, temporal consistency, retrieval
    animate124 run-benchmark DATA_DIR             the 24-case benchmark, resumable and shardable
    animate124 make-tiny-models DIR               tiny random models for tests (no download); --full-size
    animate124 models CONFIG                      the models a config loads, what is cached, the fetch command
    animate124 launch --config ... --train        threestudio's launch.py, on the CPU where there is no CUDA
    animate124 benchmark CONFIG --models DIR      step time vs diffusion floor, peak VRAM, projected run time
    animate124 report TRIAL_DIR                   the results page: TRIAL_DIR/report.html

Importing this module is cheap: every tool imports torch, diffusers and transformers only inside the function that
runs it, so ``animate124 --help`` answers at once. User errors raise :class:`ToolError`; :func:`main` prints them as one
line (``animate124 <command>: error: ...``) and returns exit status 1. Usage errors exit with status 2 (argparse).
"""

from __future__ import annotations

import argparse
import importlib
import os
import re
import sys
import tempfile
from pathlib import Path
from typing import Sequence

__all__ = ["ToolError", "build_parser", "main", "check_writable", "check_out_folder", "natural_key"]

# sub-command -> module under animate124.tools that defines add_arguments(parser) and run(args)
_TOOLS = {
    "preprocess": "animate124.tools.preprocess",
    "invert": "animate124.tools.invert",
    "evaluate": "animate124.tools.evaluate",
    "run-benchmark": "animate124.tools.run_benchmark",
    "launch": "animate124.tools.launch",
    "report": "animate124.tools.report",
    "models": "animate124.tools.models",
    "benchmark": "step_benchmark.cli",  # measuring equipment, kept in the checkout's benchmarks/ (see _import_tool)
}
BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


class ToolError(ValueError):
    """A user error (bad input, missing file or package): printed as one line by :func:`main`, without a traceback."""


def main(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv`` (default ``sys.argv[1:]``), run the chosen sub-command and return its exit status."""
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["launch"] and argv[1:2] not in (["-h"], ["--help"]):
        argv = ["launch", "--", *argv[1:]]  # every argument belongs to launch.py, options included
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    try:
        status = args.run(args)
    except ToolError as error:
        print(f"animate124 {args.command}: error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"animate124 {args.command}: interrupted", file=sys.stderr)
        return 130
    return int(status or 0)


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with one sub-parser per tool (each tool adds its own arguments)."""
    parser = argparse.ArgumentParser(
        prog="animate124",
        description="Animate124 tools: prepare an image, learn its token, run and evaluate the benchmark.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    from animate124 import __version__

    parser.add_argument("--version", action="version", version=f"animate124 {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", title="commands")
    for name, module_name in _TOOLS.items():
        module = _import_tool(module_name)
        doc = (module.__doc__ or "").strip()
        tool_parser = sub.add_parser(
            name,
            help=doc.splitlines()[0] if doc else name,
            description=doc,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        module.add_arguments(tool_parser)
        tool_parser.set_defaults(run=module.run)
    _add_make_tiny_models(sub)
    return parser


def _import_tool(module_name: str):
    """The tool's module; ``step_benchmark`` is imported from the checkout's ``benchmarks/`` folder, which is not part
    of the installed package."""
    if module_name.startswith("step_benchmark") and str(BENCHMARKS) not in sys.path:
        sys.path.insert(0, str(BENCHMARKS))
    return importlib.import_module(module_name)


def check_writable(paths: Sequence[Path], overwrite: bool) -> None:
    """Raise :class:`ToolError` before any work when ``paths`` could not be written at the end.

    Refused: a path that exists while ``overwrite`` is False (never clobber a user's file), and a folder that cannot
    be made or written (a file in the way, no permission, a read-only disk), probed with a temporary file in its
    nearest existing ancestor, so nothing is left behind.
    """
    existing = [str(p) for p in paths if Path(p).exists()]
    if existing and not overwrite:
        raise ToolError(f"{', '.join(existing)} already exist(s): pass --overwrite to replace, or choose another --out")
    for folder in sorted({Path(p).parent for p in paths}):
        ancestor = folder
        while not ancestor.exists() and ancestor != ancestor.parent:
            ancestor = ancestor.parent
        try:
            if not ancestor.is_dir():
                raise NotADirectoryError(f"{ancestor} is a file")
            with tempfile.TemporaryFile(dir=ancestor):
                pass
        except OSError as error:
            raise ToolError(f"cannot write into {folder} ({error}): choose another --out") from error


def natural_key(path) -> list:
    """Sort key that orders digit runs by value: "it2000-test" before "it15000-test", "2.png" before "10.png".

    Ours rather than the natsort package: two lines do not warrant a dependency."""
    return [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", str(path))]


def check_out_folder(out: Path, names, overwrite: bool) -> None:
    """--out is a folder (or can be made one) and none of our files there is replaced without --overwrite; the
    user's other files in it are never touched."""
    if out.exists() and not out.is_dir():
        raise ToolError(f"--out {str(out)!r} is a file: give a folder for {', '.join(names)}")
    parent = next((p for p in [out, *out.parents] if p.exists()), None)
    if parent is not None and (not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK)):
        raise ToolError(f"--out {str(out)!r} cannot be created or written ({str(parent)!r} is not a writable folder): "
                        "choose another --out")
    check_writable([out / n for n in names], overwrite)


def _add_make_tiny_models(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "make-tiny-models",
        help="write tiny random models (SD, CLIP, video U-Nets, ...) for tests; downloads nothing",
        description=(
            "Write tiny randomly initialised models, each in its own folder under DIR, saved with save_pretrained so\n"
            "they load with the real from_pretrained. They share a real CLIP tokenizer built offline from\n"
            "open_clip's merges file (needs the testing extra: bash install.sh THREESTUDIO testing). For tests and\n"
            "smoke runs only: their outputs are noise. Each model is written in the weight format its repository\n"
            "publishes (.bin pickles for ZeroScope and ControlNet-Tile, safetensors with fp16 variants elsewhere)."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("dir", type=Path, metavar="DIR", help="output folder (created if missing)")
    parser.add_argument(
        "--kinds",
        default=None,
        help="comma-separated kinds to write, e.g. sd,clip (default: all that tiny_models knows: text-to-video, "
        "zeroscope, sd, controlnet-tile, zero123, clip)",
    )
    parser.add_argument("--full-size", action="store_true",
                        help="the real architectures with random fp16 weights (about 9 GB; for timing and memory)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace DIR/<kind> folders that this command did not make (e.g. a downloaded model)")
    parser.set_defaults(run=_run_make_tiny_models)


def _run_make_tiny_models(args: argparse.Namespace) -> int:
    from animate124.core.io.safe_files import foreign_folders, mark_made
    from animate124.testing.tiny_models import ALL_KINDS, make_tiny_models

    if args.full_size:  # the real architectures with random weights, in the same folder layouts
        from animate124.testing.full_size_models import FULL_SIZE_KINDS as ALL_KINDS
        from animate124.testing.full_size_models import make_full_size_models as make_tiny_models
    kinds = [k.strip() for k in args.kinds.split(",") if k.strip()] if args.kinds else list(ALL_KINDS)
    if args.dir.exists() and not args.dir.is_dir():
        raise ToolError(f"DIR {str(args.dir)!r} is a file: give a folder (the models go into DIR/<kind>/)")
    foreign = foreign_folders([args.dir / k for k in kinds])
    if foreign and not args.overwrite:  # a user's model there would be rewritten by save_pretrained
        raise ToolError(f"{', '.join(map(str, foreign))} already exist(s) and were not made by make-tiny-models: "
                        "choose another DIR, or pass --overwrite to replace them")
    try:
        written = make_tiny_models(args.dir, kinds=kinds)
    except (ValueError, TypeError, ImportError) as error:  # unknown kind, or open_clip_torch missing
        raise ToolError(str(error)) from error
    for kind, path in written.items():
        mark_made(path)
        print(f"{kind}\t{path}")
    return 0


if __name__ == "__main__":
    # `python -m animate124.tools.cli` runs this file as __main__, whose ToolError is not the one the tools import:
    # go through the package module so errors are caught (run-benchmark starts its steps this way).
    from animate124.tools.cli import main as _main

    sys.exit(_main())
