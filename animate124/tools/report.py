"""Write a trial folder's results page: TRIAL_DIR/report.html (+ report_files/).

    animate124 report outputs/animate124/a_panda_is_dancing@20261205-101500

The page shows the input image, the stage table (steps, wall time, median step, peak VRAM; the test and export
passes), the loss curves per term and stage (csv_logs), the validation and test videos and the exported .glb in an
interactive viewer (play / pause, time slider). Training, testing and exporting write it too; this rewrites it, e.g.
after copying a trial folder. Open it from disk or serve the folder with any static server: it loads nothing from
the network.
"""
from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("trial_dir", type=Path, metavar="TRIAL_DIR",
                        help="the run's trial folder (outputs/<name>/<tag>, holding save/ and stages.json)")
    parser.add_argument("--image", type=Path, default=None,
                        help="the input image, when configs/parsed.yaml's data.image_path does not point at it")


def run(args: argparse.Namespace) -> int:
    from animate124.core.report.page import write_report
    from animate124.tools.cli import ToolError

    trial = args.trial_dir
    if not trial.is_dir():
        raise ToolError(f"{str(trial)!r} is not a folder: pass a trial folder (outputs/<name>/<tag>)")
    if not (trial / "save").is_dir() and not (trial / "stages.json").is_file():
        raise ToolError(f"{str(trial)!r} holds neither save/ nor stages.json: pass a trial folder "
                        "(outputs/<name>/<tag>) of a run")
    if args.image is not None and not args.image.is_file():
        raise ToolError(f"--image {str(args.image)!r} is not a file")
    try:
        path = write_report(trial, image_path=args.image)
    except OSError as error:
        raise ToolError(f"cannot write the page into {str(trial)!r} ({error}): check the folder's permissions") from error
    print(path)
    return 0
