"""The route of one training step through the package's files, traced, not written down by hand.

Runs the smoke config (tiny random models, made on first use) through the real host on this machine, and traces
one training step of the chosen stage (not its first step, which loads models) with ``sys.setprofile``: every
Python call whose code lies in ``animate124/``, in order. Prints the files entered, how often each was entered from
another file, and the file-to-file hops (all of them, and the distinct file pairs) (a call from code in one package file into code in another; calls through
the host, Lightning or torch count from the nearest package frame below them).

    THREESTUDIO_ROOT=/path/to/threestudio python benchmarks/step_route.py [--stage dynamic] [--json route.json]

``A124_TINY_MODELS=DIR`` reuses tiny models made there before.

Without CUDA the step runs on the CPU, where the hash grid takes its torch path (on CUDA the Triton kernels'
file is entered too) and the occupancy grid marches in torch instead of nerfacc.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGE = str(REPO / "animate124") + os.sep
sys.path.insert(0, str(Path(__file__).resolve().parent))


class RouteTracer:
    """Records the package files entered by calls between ``start()`` and ``stop()``."""

    def __init__(self, package: str = PACKAGE):
        self.package = package
        self.calls: list[tuple[str, str, str | None]] = []  # (file, function, calling package file or None)

    def start(self) -> None:
        sys.setprofile(self._profile)

    def stop(self) -> None:
        sys.setprofile(None)

    def _profile(self, frame, event, arg) -> None:
        if event != "call" or not frame.f_code.co_filename.startswith(self.package):
            return
        caller = frame.f_back
        while caller is not None and not caller.f_code.co_filename.startswith(self.package):
            caller = caller.f_back
        self.calls.append((self._short(frame.f_code.co_filename), frame.f_code.co_name,
                           None if caller is None else self._short(caller.f_code.co_filename)))

    def _short(self, path: str) -> str:
        return "animate124/" + path[len(self.package):].replace(os.sep, "/")

    def summary(self) -> dict:
        """Files in order of first entry, entries per file (calls in from another file or from outside), hops."""
        files = list(dict.fromkeys(f for f, _, _ in self.calls))
        hops = [(src, dst) for dst, _, src in self.calls if src is not None and src != dst]
        entries = Counter(dst for dst, _, src in self.calls if src != dst)
        return {"files": files, "n_files": len(files), "n_hops": len(hops), "n_edges": len(set(hops)),
                "entries": {f: entries[f] for f in files},
                "hops_core_components": sum(1 for s, d in hops if {_layer(s), _layer(d)} == {"core", "components"}),
                "route": [f"{s} -> {d}" for s, d in hops]}


def _layer(path: str) -> str:
    return path.split("/")[1] if path.count("/") > 1 else "package"


def trace_step(stage: str, workdir: Path) -> dict:
    """Train the smoke config up to one step inside ``stage`` and trace that step."""
    from step_benchmark.runner import load_host

    load_host()  # threestudio from THREESTUDIO_ROOT (or the working directory), the extension through its loader
    import pytorch_lightning as pl
    import threestudio
    from threestudio.utils.config import load_config

    from animate124.core.training.stages import parse_stages, stage_starts

    config = REPO / "configs" / "animate124-smoke.yaml"
    models = os.environ.get("A124_TINY_MODELS") or workdir / "tiny-models"  # reuse made models when set
    cfg = load_config(str(config), cli_args=[f"exp_root_dir={workdir / 'outputs'}", f"system.tiny_models_dir={models}"])
    stages = parse_stages(cfg.system.stages)
    names = [s.name for s in stages]
    if stage not in names:
        raise SystemExit(f"step_route: --stage {stage!r} is not one of the smoke config's stages {names}")
    index = names.index(stage)
    target = stage_starts(stages)[index] + min(2, stages[index].steps - 1)  # past the stage's loading step
    tracer = RouteTracer()

    class TraceOneStep(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if pl_module.true_global_step == target:
                tracer.start()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            tracer.stop()

    pl.seed_everything(cfg.seed)
    dm = threestudio.find(cfg.data_type)(cfg.data)
    system = threestudio.find(cfg.system_type)(cfg.system)
    system.set_save_dir(str(workdir / "save"))
    trainer = pl.Trainer(accelerator="auto", devices=1, max_steps=target + 1, logger=False, callbacks=[TraceOneStep()],
                         enable_checkpointing=False, enable_progress_bar=False, limit_val_batches=0,
                         num_sanity_val_steps=0, inference_mode=False)
    trainer.fit(system, datamodule=dm)
    return {"stage": stage, "global_step": target, **tracer.summary()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stage", default="dynamic", help="the smoke config's stage to trace (default: dynamic)")
    parser.add_argument("--json", type=Path, default=None, help="also write the result here")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="a124-route-") as tmp:
        result = trace_step(args.stage, Path(tmp))
    print(f"{result['stage']} step {result['global_step']}: {result['n_files']} package files, "
          f"{result['n_hops']} file-to-file hops over {result['n_edges']} distinct file pairs "
          f"({result['hops_core_components']} hops between core/ and components/)")
    for path, n in result["entries"].items():
        print(f"  {n:3d}x  {path}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
