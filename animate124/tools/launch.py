"""Run threestudio's own launch.py, here, with what this machine lacks filled in (CPU or GPU).

    cd threestudio && animate124 launch --config custom/threestudio-animate124/configs/animate124-smoke.yaml --train

Every argument goes to launch.py unchanged (--config, --train/--validate/--test/--export, --gpu, key=value ...).
Before it runs, the host's own start-up errors are checked (``animate124.tools.launch_checks``: the config file, its
YAML, the overrides, resume=, exp_root_dir, --gpu), each reported as one line with the fix and nothing written; a run
the extension's checks stop leaves no empty trial folder behind. ``--gpu`` takes effect here as in launch.py (it must
be applied before torch initialises CUDA). Two things differ from `python launch.py`, and only where this machine needs
them:

* threestudio imports tinycudann, nvdiffrast, wandb, controlnet_aux, libigl and IPython at module level. Each one
  that is missing or cannot import here gets an import stand-in (our components use none of them; a host feature
  that does fails with a line naming the package).
* Without CUDA, launch.py's Trainer (hard-coded ``accelerator="gpu"``) runs on the CPU with one device, and every
  threestudio component is put on the CPU. Use it for the smoke config (SMOKE_TIME); real configs need a GPU.

A training run ends by printing its export command (with this launcher).
"""
from __future__ import annotations

import argparse
import os
import runpy
import sys
from pathlib import Path

from animate124.tools.host_check import SMOKE_CPU_TIME, tool

__doc__ = __doc__.replace("SMOKE_TIME", SMOKE_CPU_TIME)  # one measured figure, stated the same everywhere


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("launch_args", nargs=argparse.REMAINDER, help="launch.py's arguments, unchanged")


def run(args: argparse.Namespace) -> int:
    argv = list(args.launch_args)
    return launch(argv[1:] if argv[:1] == ["--"] else argv)


def launch(argv: list[str]) -> int:
    from animate124.tools.cli import ToolError
    from animate124.tools.launch_checks import check_launch, existing, remove_new_empty_folders, select_gpus

    root = Path.cwd()
    if not (root / "launch.py").is_file() or not (root / "threestudio" / "__init__.py").is_file():
        raise ToolError(f"{root} is not a threestudio checkout (no launch.py): cd into threestudio first, as for launch.py")
    if not (root / "custom" / "threestudio-animate124").exists():
        raise ToolError("custom/threestudio-animate124 is missing: run install.sh PATH_TO_THREESTUDIO first")
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    select_gpus(argv)  # before torch, as launch.py does
    import torch

    from animate124.tools.host import install_stand_ins

    sys.path.insert(0, str(root))
    replaced = install_stand_ins()
    if replaced:
        print(f"animate124 launch: import stand-ins for {', '.join(replaced)} (not used by a124 components)",
              file=sys.stderr)
    _register_config_resolvers()
    problems, folders = check_launch(argv, visible=visible)  # the host's start-up errors, before it writes anything
    if problems:
        for problem in problems:
            print(f"animate124 launch: error: {problem}", file=sys.stderr)
        if visible is None:  # as it was (launch.py did not run)
            os.environ.pop("CUDA_VISIBLE_DEVICES", None)
        return 1
    before = existing(folders)
    if not torch.cuda.is_available():
        _run_on_cpu()
    sys.argv = ["launch.py", *argv]
    os.environ.setdefault("A124_LAUNCHER", f"{tool()} launch")  # the export command printed after training
    try:
        runpy.run_path(str(root / "launch.py"), run_name="__main__")
    except SystemExit as done:
        return int(done.code or 0) if not isinstance(done.code, str) else 1
    except ValueError as error:
        if not _ours(error):
            raise
        # the preflight's list (or one a124 component's line) says everything: no traceback around it; the (empty)
        # trial folder launch.py made before the checks ran goes too
        remove_new_empty_folders(folders, before)
        print(f"animate124 launch: {error}", file=sys.stderr)
        return 1
    return 0


def _register_config_resolvers() -> None:
    """The host's config resolvers and ours, so the checks resolve the config as launch.py will (without threestudio
    importable here, launch.py itself reports that)."""
    try:
        import threestudio.utils.config  # noqa: F401  (registers the host's resolvers)

        from animate124.components.host_compat import register_config_resolvers
    except Exception:  # noqa: BLE001 - launch.py imports them again and shows the real error
        return
    register_config_resolvers()


def _ours(error: ValueError) -> bool:
    """A bad-input error of this extension: the preflight's problem list or an ``a124-...: ...`` config line."""
    return type(error).__name__ == "PreflightError" or str(error).startswith("a124-")


def _run_on_cpu() -> None:
    """launch.py builds ``Trainer(accelerator="gpu", devices=-1, ...)``: on a machine without CUDA, CPU and 1 device."""
    import pytorch_lightning as pl
    import threestudio  # noqa: F401  (loads every host module, so use_cpu reaches each get_device reference)

    from animate124.tools.host import use_cpu

    use_cpu()
    gpu_trainer = pl.Trainer

    class CPUTrainer(gpu_trainer):
        def __init__(self, *args, **kwargs):
            kwargs.update(accelerator="cpu", devices=1)
            super().__init__(*args, **kwargs)

    pl.Trainer = CPUTrainer
    print("animate124 launch: no CUDA here: running launch.py on the CPU (1 device)", file=sys.stderr)
