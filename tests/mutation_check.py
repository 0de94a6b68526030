"""Mutation check of the recipe's glue: plausible bugs planted one at a time, each of which the tests must catch.

    python tests/mutation_check.py              # every mutant (about 10 minutes on 2 idle cores)
    python tests/mutation_check.py step_plan    # the mutants whose name or file contains "step_plan"
    python tests/mutation_check.py --list       # the mutants, without running anything

Each mutant replaces one exact piece of text in one file of a temporary copy of the repository (the text must occur
there exactly once, else the script stops: the code moved and the mutant needs updating), then runs the tests named
for it (fast unit tests where they can catch it; the system's loss assembly needs the integration tier, so a
threestudio checkout as for ``pytest tests/integration``). A mutant is killed when those tests fail. The table lists
each mutant, the first test that failed and the seconds it took; the exit status is 1 when a mutant survives. Run it
with either venv (``.venv/bin/python tests/mutation_check.py``); nothing in the repository is changed.
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LOSSES = "animate124/core/training/losses.py"
PLAN = "animate124/core/training/step_plan.py"
STAGES = "animate124/core/training/stages.py"
FRAMES = "animate124/core/render/frame_times.py"
CAMERAS = "animate124/core/render/cameras.py"
SYSTEM = "animate124/components/system.py"

T_LOSSES = ("tests/unit/test_losses.py",)
T_PLAN = ("tests/unit/test_step_plan.py",)
T_STAGES = ("tests/unit/test_stages.py",)
T_FRAMES = ("tests/unit/test_frame_times.py",)
T_CAMERAS = ("tests/unit/test_cameras.py",)
T_ASSEMBLY = ("tests/integration/test_loss_assembly_integration.py",)
T_GROUPS = ("tests/integration/test_loss_assembly_integration.py", "-k", "groups or controlnet_slot")


@dataclass(frozen=True)
class Mutant:
    name: str
    path: str
    old: str
    new: str
    tests: tuple[str, ...]


MUTANTS = [
    # the table of own losses
    Mutant("rgb computed on the main render", LOSSES, 'OwnLoss("rgb", "reference",', 'OwnLoss("rgb", "main",',
           T_PLAN + T_LOSSES),
    Mutant("sparsity allowed on any main render", LOSSES, 'OwnLoss("sparsity", "image_stage"',
           'OwnLoss("sparsity", "main"', T_PLAN),
    Mutant("normal smoothness rendered without normals", LOSSES, '_normal_smoothness_term, normals=True)',
           "_normal_smoothness_term)", T_PLAN),
    Mutant("depth without needing a reference depth", LOSSES, 'x.batch["mask"]),\n            needs_ref_depth=True),',
           'x.batch["mask"])),', T_PLAN + T_LOSSES),
    Mutant("time smoothness reaching no group", LOSSES, 'trains="field_4d")', "trains=None)", T_PLAN),
    Mutant("normal smoothness over frames without normals", LOSSES, "normal if mask is None else normal[mask]",
           "normal", T_LOSSES),
    Mutant("time smoothness settings swapped", LOSSES,
           "x.settings.time_smoothness_points, x.settings.time_smoothness_dt",
           "x.settings.time_smoothness_dt, x.settings.time_smoothness_points", T_LOSSES),
    Mutant("mask term against the render's own opacity", LOSSES, 'mask_bce(x.out["opacity"], x.batch["mask"])',
           'mask_bce(x.out["opacity"], x.out["opacity"] > 0.5)', T_LOSSES),
    Mutant("rgb composited on white, not the rendered background", LOSSES,
           'x.batch["mask"], x.out["comp_rgb_bg"])', 'x.batch["mask"], torch.ones_like(x.out["comp_rgb_bg"]))',
           T_LOSSES),
    # the step plan
    Mutant("reference terms on every step", PLAN, "if runs and on(name):", "if on(name):", T_PLAN),
    Mutant("zero weights computed", PLAN, "return float(weights.get(key, 0.0)) > 0",
           "return float(weights.get(key, 0.0)) >= 0", T_PLAN),
    Mutant("image slots of video stages on plain steps", PLAN, "if slots[g].view == main_view or anchor]",
           "if slots[g].view == main_view or not anchor]", T_PLAN),
    Mutant("slot weight before the <slot>_<key> weight", PLAN,
           'weights.get(f"{slot}_{key}", weights.get(slot, 0.0))',
           'weights.get(slot, weights.get(f"{slot}_{key}", 0.0))', T_PLAN),
    Mutant("shortest slot name owns a weight key", PLAN, "max(owners, key=len)", "min(owners, key=len)", T_PLAN),
    Mutant("image-stage terms accepted in video stages", PLAN, 'if loss.view == "image_stage" and video:',
           'if loss.view == "image_stage" and not video:', T_PLAN),
    Mutant("normals on every render", PLAN, "renders = {v: v in normals", "renders = {v: True", T_PLAN),
    Mutant("image slots fed the clip", PLAN, 'return "random" if self.input == "image" else "video"',
           'return "video"', T_PLAN),
    Mutant("anchor interval off by one", PLAN, "step % anchor_interval == 0", "(step + 1) % anchor_interval == 0",
           T_PLAN),
    Mutant("static_ref_interval ignored", PLAN,
           "return static_ref_interval > 0 and step % static_ref_interval == 0", "return static_ref_interval > 0",
           T_PLAN),
    Mutant("a term's trained group checked against field_3d", PLAN, "not stage.trains(loss.trains)",
           'not stage.trains("field_3d")', T_PLAN),
    Mutant("depth accepted without a reference depth", PLAN, "loss.needs_ref_depth and has_ref_depth is False",
           "loss.needs_ref_depth and has_ref_depth is None", T_PLAN),
    # the stages
    Mutant("stage boundary off by one", STAGES, "if global_step < start + stage.steps:",
           "if global_step <= start + stage.steps:", T_STAGES),
    Mutant("optimizer reset at the first stage's start", STAGES, "return pos.index > 0 and pos.step_in_stage == 0",
           "return pos.index >= 0 and pos.step_in_stage == 0", T_STAGES),
    Mutant("trainable list ignored", STAGES, "return self.trainable is None or group in self.trainable",
           "return True", T_STAGES + T_PLAN),
    Mutant("field_4d group mapped to the 3-D grid", STAGES, 'ParamGroup("geometry.encoding_time"',
           'ParamGroup("geometry.encoding"', T_GROUPS),
    # the frame-time sampler
    Mutant("clip start range one short", FRAMES, "_randint(0, precision - span + 1, generator)",
           "_randint(0, precision - span, generator)", T_FRAMES),
    Mutant("stride range one short", FRAMES, "_randint(num_frames, precision + 1, generator)",
           "_randint(num_frames, precision, generator)", T_FRAMES),
    Mutant("mirror off by one lattice step", FRAMES, "torch.flip(precision - index", "torch.flip(precision - 1 - index",
           T_FRAMES),
    Mutant("mirrored clip keeps the anchoring flag", FRAMES, "        start_from_zero = False\n", "        pass\n",
           T_FRAMES),
    Mutant("start-at-zero coin boundary", FRAMES, "_uniform(generator) < zero_rate", "_uniform(generator) <= zero_rate",
           T_FRAMES),
    # the random cameras
    Mutant("elevation coin boundary", CAMERAS, "if coin >= uniform_sphere_prob:", "if coin > uniform_sphere_prob:",
           T_CAMERAS),
    Mutant("azimuth strata over n + 1", CAMERAS, "u = (u + torch.arange(n, dtype=torch.float64)) / n",
           "u = (u + torch.arange(n, dtype=torch.float64)) / (n + 1)", T_CAMERAS),
    Mutant("uniform ranges scaled by their high end", CAMERAS, "return lo + _rand(n, generator) * (hi - lo)",
           "return lo + _rand(n, generator) * hi", T_CAMERAS),
    Mutant("azimuth drifting by the elevation delta", CAMERAS, "azimuth = a0.double() + s * da.double()",
           "azimuth = a0.double() + s * de.double()", T_CAMERAS),
    Mutant("total drift divided by the frame count", CAMERAS, "s = s / max(n - 1, 1)", "s = s / n", T_CAMERAS),
    Mutant("fixed-camera coin boundary", CAMERAS, "< fixed_camera_prob:", "<= fixed_camera_prob:", T_CAMERAS),
    # the system's loss assembly
    Mutant("terms summed without their weights", SYSTEM, "sum((value * weight for value, weight in terms.values())",
           "sum((value for value, weight in terms.values())", T_ASSEMBLY),
    Mutant("own terms weighed 1", SYSTEM, "terms[name] = (losses.LOSSES[name].compute(inputs), weight)",
           "terms[name] = (losses.LOSSES[name].compute(inputs), 1.0)", T_ASSEMBLY),
    Mutant("slot outputs weighed by the slot weight only", SYSTEM, "slot_weight(weights, name, key)",
           "weights.get(name, 0.0)", T_ASSEMBLY),
    Mutant("own terms on the reference render when there is one", SYSTEM,
           "losses.LossInputs(outs.get(view), batch.get(view)", 'losses.LossInputs(outs.get("ref", outs.get(view)), '
           "batch.get(view)", T_ASSEMBLY),
    Mutant("lambdas logged as 1", SYSTEM, 'self.log(f"train_params/lambda_{name}", weight)',
           'self.log(f"train_params/lambda_{name}", 1.0)', T_ASSEMBLY),
    Mutant("frozen groups still get gradient", SYSTEM,
           "module.requires_grad_(stage.trains(group) or self._ddp_grad_masking)", "module.requires_grad_(True)",
           T_GROUPS),
    Mutant("frozen groups keep their learning rate", SYSTEM,
           'if stage.trains(pg["name"]) else 0.0', "if True else 0.0", T_GROUPS),
    Mutant("ControlNet condition carrying gradient", SYSTEM, "else rgb.detach()", "else rgb", T_GROUPS),
]


def _copy_repo(dest: Path) -> Path:
    """The repository's code and tests in ``dest``, beside a ``shared`` link as the tests expect."""
    shared = REPO.parent / "shared"
    if shared.is_dir():
        (dest / "shared").symlink_to(shared, target_is_directory=True)
    copy = dest / REPO.name
    shutil.copytree(REPO, copy, ignore=shutil.ignore_patterns(
        ".git", ".venv*", "__pycache__", "*.egg-info", ".threestudio_root", "results", "outputs", ".deps", "custom"))
    return copy


def _copy_threestudio(dest: Path) -> Path | None:
    """A private copy of the threestudio the integration tier would use, for THREESTUDIO_ROOT."""
    sys.path.insert(0, str(REPO / "tests"))
    from threestudio_env import threestudio_root

    root = threestudio_root()
    if root is None:
        return None
    copy = dest / "threestudio"  # without the extension links, runs, data and model folders
    shutil.copytree(root, copy, ignore=shutil.ignore_patterns(".git", "__pycache__", "custom", "outputs", "load"))
    for path in copy.rglob("*"):
        path.chmod(path.stat().st_mode | 0o200)
    return copy


def _run_tests(copy: Path, tests: tuple[str, ...], env: dict, timeout: float) -> tuple[bool, str, float]:
    """(the tests failed, the first failing test's id and how many others failed, seconds). The integration tier
    stops at the first failure; the unit tests all run, so the table shows every test that sees the mutant."""
    stop = ["-x"] if any("integration" in t for t in tests) else []
    start = time.monotonic()
    try:
        proc = subprocess.run([sys.executable, "-m", "pytest", *stop, "-q", "-rfE", "-p", "no:cacheprovider",
                               "-W", "ignore", *tests], cwd=copy, env=env, capture_output=True, text=True,
                              timeout=timeout)
    except subprocess.TimeoutExpired:
        return False, f"timed out after {timeout:.0f} s", time.monotonic() - start
    seconds = time.monotonic() - start
    if proc.returncode == 5 or "integration tier skipped" in proc.stdout:
        raise SystemExit(f"mutation check: {' '.join(tests)} selected no runnable test:\n{proc.stdout[-2000:]}")
    if proc.returncode == 0:
        return False, "", seconds
    failed = re.findall(r"^(?:FAILED|ERROR) (\S+)", proc.stdout, re.M)
    if not failed:
        return True, f"exit status {proc.returncode}", seconds
    more = f" (+{len(failed) - 1} more)" if len(failed) > 1 else ""
    return True, failed[0].removeprefix("tests/") + more, seconds


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("select", nargs="?", default="", help="run the mutants whose name or file contains this")
    parser.add_argument("--list", action="store_true", help="list the mutants and exit")
    parser.add_argument("--timeout", type=float, default=900, help="seconds per mutant (default 900)")
    args = parser.parse_args(argv)
    chosen = [m for m in MUTANTS if args.select in m.name or args.select in m.path]
    if args.list or not chosen:
        for m in chosen or MUTANTS:
            print(f"{m.path}: {m.name}  [{' '.join(m.tests)}]")
        return 0 if chosen else 1
    for m in chosen:
        count = (REPO / m.path).read_text().count(m.old)
        if count != 1:
            raise SystemExit(f"mutation check: {m.name!r}: {m.old!r} occurs {count} times in {m.path}; update the "
                             "mutant")
    with tempfile.TemporaryDirectory(prefix="a124-mutants-") as tmp:
        copy = _copy_repo(Path(tmp))
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(copy), os.environ.get("PYTHONPATH", "")]),
               "PYTHONDONTWRITEBYTECODE": "1"}
        if any("integration" in t for m in chosen for t in m.tests):
            threestudio = _copy_threestudio(Path(tmp))
            if threestudio is None:
                raise SystemExit("mutation check: the system's mutants need a threestudio checkout (see "
                                 "tests/threestudio_env.py); run the others with a selection, e.g. 'core/'")
            env["THREESTUDIO_ROOT"] = str(threestudio)
        suites = sorted({m.tests for m in chosen})
        print(f"baseline: {len(suites)} test selections on the unchanged copy")
        for tests in suites:
            failed, where, seconds = _run_tests(copy, tests, env, args.timeout)
            if failed:
                raise SystemExit(f"mutation check: {' '.join(tests)} fails without any mutant ({where}); fix that "
                                 "first")
        rows = []
        for m in chosen:
            path = copy / m.path
            original = path.read_text()
            path.write_text(original.replace(m.old, m.new, 1))
            try:
                killed, where, seconds = _run_tests(copy, m.tests, env, args.timeout)
            finally:
                path.write_text(original)
            rows.append((m, killed, where, seconds))
            print(f"{'killed  ' if killed else 'SURVIVED'} {seconds:6.1f} s  {m.name}  ({where or 'no test failed'})",
                  flush=True)
    print()
    print("| mutant | file | killed by | s |")
    print("|---|---|---|---|")
    for m, killed, where, seconds in rows:
        print(f"| {m.name} | {Path(m.path).name} | {where if killed else '**survived**'} | {seconds:.1f} |")
    survived = sum(not killed for _, killed, _, _ in rows)
    print(f"\n{len(rows) - survived} of {len(rows)} mutants killed")
    return 1 if survived else 0


if __name__ == "__main__":
    sys.exit(main())
