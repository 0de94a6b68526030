"""Run the image-to-4D benchmark: per case preprocess -> invert -> train (+ test renders) -> evaluate.

DATA_DIR holds benchmark.json ([{"name": ..., "caption": ..., optional "init": one-token word}, ...]) and one folder
per case with image.jpg. A case folder (or --reuse-from DIR/<case>) that already has rgba.png + depth.png skips
preprocessing, and one with learned_embeds.bin (or .safetensors) skips inversion (e.g. ../shared/data/examples).

Every step runs as its own subprocess, logs to OUT/<case>/logs/<step>.log and, on success, writes
OUT/<case>/.done/<step>.json (command, outputs, seconds). A step whose .done file exists and whose outputs all
exist is skipped, so re-running the same command resumes where it stopped. A failing step stops its case only;
the others go on and the exit status is 1 at the end.

  OUT/<case>/prep/        rgba.png, depth.png, preview.png          (animate124 preprocess)
  OUT/<case>/invert/      learned_embeds.{safetensors,bin}          (animate124 invert)
  OUT/<case>/threestudio/ threestudio's exp_root_dir for this case  (launch.py --train, which also runs the test)
  OUT/<case>/run.json     prompt, reference image, test frames glob (written when evaluate succeeds)
  OUT/<case>/metrics.*    this case's CLIP metrics                  (animate124 evaluate)
  OUT/metrics.{csv,md}    the table over every finished case, with retrieval accuracy

Spreading the 24 cases: --shard i/n keeps the cases whose index in benchmark.json is i modulo n (0 <= i < n);
the n shards are disjoint and cover every case. Start one process per shard, each with its own GPU, e.g. a SLURM
array job (`--shard $SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT`; SLURM sets CUDA_VISIBLE_DEVICES, which is kept)
or `for i in 0 1 2 3; do animate124 run-benchmark DATA --out OUT --shard $i/4 --gpu $i & done`. Each shard writes
the table of the cases finished so far; run once more with --summarize after all shards end for the full table.
--gpu G sets CUDA_VISIBLE_DEVICES=G for every step unless it is already set, and passes --gpu G to launch.py.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from animate124.core.io.atomic_io import write_text
from animate124.tools.cli import ToolError, natural_key

__all__ = [
    "TRAIN_KEYS",
    "INIT_WORDS",
    "Case",
    "Step",
    "load_cases",
    "parse_shard",
    "select_cases",
    "plan_case",
    "run_steps",
    "add_arguments",
    "run",
]

# The ONE place that names threestudio config keys (those of configs/animate124.yaml). The train step passes
# `TRAIN_KEYS[k]=<value of k>` for each k whose key is not None.
TRAIN_KEYS: dict[str, str | None] = {
    "image_path": "data.image_path",  # the recentred RGBA
    "depth_path": "data.depth_path",  # its depth.png (enables the depth loss)
    "prompt": "system.motion_prompt",  # the benchmark caption (text-to-video guidance)
    "static_prompt": "system.prompt",  # STATIC_PROMPT below (SD guidance of the static stage)
    "cn_prompt": "system.refine_prompt",  # caption with the subject replaced by "<token>" (ControlNet-Tile stage)
    "learned_embeds_path": "system.learned_embeds_path",
    "tag": "tag",  # threestudio's own ExperimentConfig keys: a fixed trial folder per case, for resuming
    "use_timestamp": "use_timestamp",
    "exp_root_dir": "exp_root_dir",
}
DEFAULT_CONFIG = "custom/threestudio-animate124/configs/animate124.yaml"
STATIC_PROMPT = "a high-resolution DSLR image of {article} {init}"
# What evaluate scores, relative to exp_root_dir: the test's fixed front view over time, written by a124-system as
# <name>/<tag>/save/it<step>-test/front-over-time/<i>.png grids [rgb | normal | opacity]; panel 0 is the RGB.
TEST_FRAMES_GLOB = "*/{tag}/save/it*-test/front-over-time/*.png"
TEST_FRAMES_PANEL = "0"

# One-token subject words for the 24 benchmark cases (checked against the CLIP tokenizer in the tests);
# benchmark.json's "init" wins, then this table, then the case name's first word.
INIT_WORDS = {
    "astronaut-horse": "astronaut", "cat-sing": "cat", "cat-wave": "cat", "chimpanzee-accordion": "chimp",
    "crab-crawl": "crab", "crocodile-drum": "crocodile", "eagle-fly": "eagle", "flag-wave": "flag",
    "fox-game": "fox", "kangaroo-accordion": "kangaroo", "lighting-candle": "candle", "lion-roar": "lion",
    "messi": "messi", "monkey-bike": "monkey", "panda-dance": "panda", "robot-laptop": "robot",
    "rose-flowerpot": "rose", "skeleton-wine": "skeleton", "space-shuttle": "shuttle", "squirrel-nut": "squirrel",
    "squirrel-saxophone": "squirrel", "tiger-violin": "tiger", "tiger-guitar": "tiger", "fish": "fish",
}

Runner = Callable[[Sequence[str], Path, dict, Path], int]


@dataclass
class Case:
    """One benchmark entry."""

    index: int
    name: str
    caption: str
    image: Path
    init: str
    folder: Path

    @property
    def token(self) -> str:
        return "_" + re.sub(r"[^0-9a-zA-Z]+", "_", self.name).strip("_").lower() + "_"


@dataclass
class Step:
    """One step of one case: a command (None when reused), where it runs, and the files it must leave behind."""

    case: str
    name: str
    command: list[str] | None
    cwd: Path
    outputs: list[Path]
    reused: bool = False
    extra: dict = field(default_factory=dict)


def load_cases(data_dir: Path) -> list[Case]:
    """benchmark.json's entries in file order (their index is what --shard uses)."""
    listing = Path(data_dir) / "benchmark.json"
    if not listing.is_file():
        raise ToolError(f"{listing} does not exist: DATA_DIR must hold benchmark.json and one folder per case")
    try:
        entries = json.loads(listing.read_text())
    except json.JSONDecodeError as error:
        raise ToolError(f"{listing} is not valid JSON ({error})") from error
    cases = []
    for index, entry in enumerate(entries):
        if not isinstance(entry, dict) or "name" not in entry or "caption" not in entry:
            raise ToolError(f"{listing} entry {index} needs 'name' and 'caption', got {entry!r}")
        name = str(entry["name"])
        init = entry.get("init") or INIT_WORDS.get(name) or re.split(r"[-_ ]", name)[0]
        folder = Path(data_dir).resolve() / name  # absolute: the steps run in other folders
        cases.append(Case(index, name, str(entry["caption"]), folder / "image.jpg", init, folder))
    return cases


def parse_shard(text: str) -> tuple[int, int]:
    """'i/n' -> (i, n) with 0 <= i < n; anything else is a ToolError naming the fix."""
    match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text or "")
    if not match or int(match.group(2)) < 1 or int(match.group(1)) >= int(match.group(2)):
        raise ToolError(f"--shard {text!r} is not valid: use i/n with 0 <= i < n (e.g. --shard 0/4 ... 3/4)")
    return int(match.group(1)), int(match.group(2))


def select_cases(cases: Sequence[Case], shard: tuple[int, int] = (0, 1), names: Sequence[str] | None = None):
    """The cases of shard (i, n) (index modulo n == i), optionally only those named."""
    if names:
        unknown = sorted(set(names) - {c.name for c in cases})
        if unknown:
            raise ToolError(f"--cases {','.join(unknown)} not in benchmark.json: choose from {[c.name for c in cases]}")
    i, n = shard
    return [c for c in cases if c.index % n == i and (not names or c.name in names)]


def plan_case(case: Case, options: argparse.Namespace) -> list[Step]:
    """The four steps of one case with their exact commands (nothing is run or written here)."""
    out = Path(options.out).resolve() / case.name
    py = [sys.executable, "-m", "animate124.tools.cli"]
    steps = []
    # 1. preprocess (or reuse rgba.png + depth.png)
    reuse = _find_reusable(case, options.reuse_from, ("rgba.png", "depth.png"))
    if reuse:
        rgba, depth = reuse
        steps.append(Step(case.name, "preprocess", None, out, [rgba, depth], reused=True))
    else:
        prep = out / "prep"
        rgba, depth = prep / "rgba.png", prep / "depth.png"
        command = py + ["preprocess", str(case.image), "--out", str(prep), "--size", str(options.size),
                        "--border-ratio", str(options.border_ratio), "--overwrite"]
        if options.depth_model:
            command += ["--depth-model", _local_or_id(options.depth_model)]
        steps.append(Step(case.name, "preprocess", command, out, [rgba, depth]))
    # 2. invert (or reuse learned_embeds.bin)
    reuse = _find_reusable(case, options.reuse_from, ("learned_embeds.bin",)) or _find_reusable(
        case, options.reuse_from, ("learned_embeds.safetensors",))
    if reuse:
        embeds = reuse[0]
        steps.append(Step(case.name, "invert", None, out, [embeds], reused=True))
    else:
        embeds = out / "invert" / "learned_embeds.bin"
        command = py + ["invert", str(case.image), "--token", case.token, "--init", case.init, "--out",
                        str(embeds.parent), "--steps", str(options.invert_steps), "--batch-size",
                        str(options.invert_batch_size), "--resolution", str(options.invert_resolution), "--overwrite"]
        if options.sd_model:
            command += ["--model", _local_or_id(options.sd_model)]
        steps.append(Step(case.name, "invert", command, out, [embeds, embeds.with_suffix(".safetensors")]))
    # 3. train: launch.py from the threestudio root; its --train also runs the test renders
    exp_root = out / "threestudio"
    values = {
        "image_path": str(rgba), "depth_path": str(depth), "prompt": case.caption,
        "static_prompt": STATIC_PROMPT.format(init=case.init, article="an" if case.init[0] in "aeiou" else "a"),
        "cn_prompt": _cn_prompt(case.caption, [case.init, case.name.split("-")[0]]),
        "learned_embeds_path": str(embeds), "tag": case.name, "use_timestamp": "false", "exp_root_dir": str(exp_root),
    }
    overrides = [f"{key}={values[k]}" for k, key in TRAIN_KEYS.items() if key is not None]
    command = [sys.executable, "launch.py", "--config", options.config, "--train", "--gpu", options.gpu]
    command += overrides + list(options.extra or [])
    frames_glob = str(exp_root / TEST_FRAMES_GLOB.format(tag=case.name))
    root = Path(options.threestudio or _default_threestudio())
    steps.append(Step(case.name, "train", command, root, [], extra={"frames_glob": frames_glob}))
    # 4. evaluate this case; run.json (which marks the folder as a run for the batch table) is written on success
    frames = str(Path("threestudio") / TEST_FRAMES_GLOB.format(tag=case.name))
    command = py + ["evaluate", str(out), "--image", str(rgba), "--prompt", case.caption, "--frames-glob", frames,
                    "--panel", TEST_FRAMES_PANEL, "--clip-model", _local_or_id(options.clip_model), "--overwrite"]
    run_json = {"prompt": case.caption, "image": str(rgba), "frames": frames, "panel": TEST_FRAMES_PANEL}
    steps.append(Step(case.name, "evaluate", command, out, [out / "metrics.csv", out / "metrics.md"],
                      extra={"run_json": run_json}))
    return steps


def run_steps(steps: Sequence[Step], runner: Runner, env: dict, progress: Callable[[str], None] = print) -> bool:
    """Run (or skip) the steps of one case in order; False at the first failure."""
    for step in steps:
        done = _case_dir(steps) / ".done" / f"{step.name}.json"
        if _is_done(done):
            progress(f"[{step.case}] {step.name}: done before, skipped")
            continue
        if step.reused:
            missing = [str(p) for p in step.outputs if not p.exists()]
            if missing:
                progress(f"[{step.case}] {step.name}: reused files missing: {missing}")
                return False
            _write_done(done, step, None, 0.0)
            progress(f"[{step.case}] {step.name}: reusing {', '.join(str(p) for p in step.outputs)}")
            continue
        log = _case_dir(steps) / "logs" / f"{step.name}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        progress(f"[{step.case}] {step.name}: running (log {log})")
        start = time.time()
        status = runner(step.command, step.cwd, env, log)
        outputs = list(step.outputs)
        if "frames_glob" in step.extra:
            frames = sorted(_abs_glob(step.extra["frames_glob"]), key=natural_key)
            outputs += frames[-1:]
            if not frames and status == 0:
                progress(f"[{step.case}] {step.name}: finished but no test frame matches {step.extra['frames_glob']}")
                return False
        if status == 0 and "run_json" in step.extra:
            write_text(step.cwd / "run.json", json.dumps(step.extra["run_json"], indent=1))
            outputs.append(step.cwd / "run.json")
        missing = [str(p) for p in outputs if not p.exists()]
        if status != 0 or missing:
            why = f"exit status {status}" if status != 0 else f"missing outputs {missing}"
            progress(f"[{step.case}] {step.name}: FAILED ({why}); see {log}")
            return False
        finished = Step(step.case, step.name, step.command, step.cwd, outputs)
        _write_done(done, finished, step.command, time.time() - start)
    return True


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("data_dir", type=Path, metavar="DATA_DIR", help="folder with benchmark.json and the cases")
    parser.add_argument("--out", type=Path, default=Path("benchmark-out"), help="output folder (default benchmark-out)")
    parser.add_argument(
        "--threestudio", type=Path, default=None,
        help="threestudio root holding launch.py (default $THREESTUDIO_ROOT, else two folders above this extension)",
    )
    parser.add_argument("--config", default=DEFAULT_CONFIG, help=f"relative to the root (default {DEFAULT_CONFIG})")
    parser.add_argument("--shard", default="0/1", help="i/n: run the cases whose index %% n == i (default 0/1 = all)")
    parser.add_argument("--cases", default=None, help="comma-separated case names to run (default all in the shard)")
    parser.add_argument("--dry-run", action="store_true", help="list the cases and exact commands; run nothing")
    parser.add_argument("--summarize", action="store_true", help="only write OUT/metrics.{csv,md} over finished cases")
    parser.add_argument("--gpu", default="0", help="GPU index(es) for this process (default 0)")
    parser.add_argument(
        "--extra", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
        help="more config overrides for launch.py, e.g. --extra trainer.max_steps=100 (repeatable; after DATA_DIR)",
    )
    parser.add_argument("--reuse-from", type=Path, action="append", default=[], metavar="DIR",
                        help="also look for <case>/rgba.png, depth.png, learned_embeds.bin under DIR (repeatable)")
    parser.add_argument("--size", type=int, default=512, help="preprocess --size (default 512)")
    parser.add_argument("--border-ratio", type=float, default=0.2, help="preprocess --border-ratio (default 0.2)")
    parser.add_argument("--depth-model", default=None, help="preprocess --depth-model (default: its default)")
    parser.add_argument("--sd-model", default=None, help="invert --model (default: its default)")
    parser.add_argument("--invert-steps", type=int, default=3000, help="invert --steps (default 3000)")
    parser.add_argument("--invert-batch-size", type=int, default=16, help="invert --batch-size (default 16)")
    parser.add_argument("--invert-resolution", type=int, default=512, help="invert --resolution (default 512)")
    parser.add_argument("--clip-model", default="openai/clip-vit-large-patch14", help="evaluate --clip-model")


def run(args: argparse.Namespace) -> int:
    return execute(args, runner=_subprocess_runner)


def execute(args: argparse.Namespace, runner: Runner) -> int:
    """The sub-command with a pluggable ``runner(command, cwd, env, log_path) -> exit status``."""
    from tqdm import tqdm

    shard = parse_shard(args.shard)
    names = [n.strip() for n in args.cases.split(",") if n.strip()] if args.cases else None
    for kv in args.extra or []:
        if "=" not in kv:
            raise ToolError(f"--extra {kv!r} is not KEY=VALUE: write e.g. --extra trainer.max_steps=100")
    args.threestudio = Path(args.threestudio or os.environ.get("THREESTUDIO_ROOT") or _default_threestudio()).resolve()
    cases = select_cases(load_cases(args.data_dir), shard, names)
    plans = [plan_case(case, args) for case in cases]
    summary = _summary_command(args)
    if args.dry_run:
        _print_plan(cases, plans, summary, args)
        return 0
    if args.summarize:
        return _summarize(args, runner, summary)
    if not (args.threestudio / "launch.py").is_file():
        raise ToolError(f"no launch.py in --threestudio {str(args.threestudio)!r}: give the threestudio root folder")
    env = _step_env()
    env.setdefault("CUDA_VISIBLE_DEVICES", str(args.gpu))
    failed = []
    for case, steps in tqdm(list(zip(cases, plans, strict=True)), desc=f"benchmark shard {args.shard}", unit="case"):
        if not run_steps(steps, runner, env, progress=tqdm.write):
            failed.append(case.name)
    status = _summarize(args, runner, summary)
    if failed:
        print(f"{len(failed)} case(s) failed: {', '.join(failed)} (logs under {args.out}/<case>/logs)", file=sys.stderr)
        return 1
    return status


def _summarize(args, runner: Runner, command: list[str]) -> int:
    finished = sorted(d.name for d in Path(args.out).glob("*") if _is_done(d / ".done" / "evaluate.json"))
    if not finished:
        print("no finished case yet: no table written")
        return 0
    status = runner(command, Path(args.out).resolve(), _step_env(), Path(args.out) / "logs" / "summary.log")
    if status == 0 and (Path(args.out) / "metrics.md").is_file():
        print((Path(args.out) / "metrics.md").read_text(), end="")
    return 0 if status == 0 else 1


def _summary_command(args) -> list[str]:
    out = str(Path(args.out).resolve())
    return [sys.executable, "-m", "animate124.tools.cli", "evaluate", "--batch", out, "--out", out,
            "--clip-model", _local_or_id(args.clip_model), "--overwrite"]


def _print_plan(cases, plans, summary, args) -> None:
    print(f"{len(cases)} case(s) in shard {args.shard} of {args.data_dir}:")
    for case, steps in zip(cases, plans, strict=True):
        print(f"\n== {case.index:2d} {case.name}: {case.caption!r} (token {case.token}, init {case.init!r})")
        for step in steps:
            if step.reused:
                print(f"  {step.name}: reuse {' '.join(str(p) for p in step.outputs)}")
                continue
            print(f"  {step.name}: (cd {shlex.quote(str(step.cwd))} && {shlex.join(step.command)})")
            if "run_json" in step.extra:
                print(f"  {step.name}: then write {step.cwd / 'run.json'} {json.dumps(step.extra['run_json'])}")
    print(f"\n== table: {shlex.join(summary)}")


def _subprocess_runner(command: Sequence[str], cwd: Path, env: dict, log: Path) -> int:
    log.parent.mkdir(parents=True, exist_ok=True)
    cwd.mkdir(parents=True, exist_ok=True)
    with open(log, "a") as handle:
        handle.write(f"\n$ (cd {cwd} && {shlex.join(command)})\n")
        handle.flush()
        return subprocess.run(list(command), cwd=cwd, env=env, stdout=handle, stderr=subprocess.STDOUT).returncode


def _local_or_id(model: str) -> str:
    """A model folder given relative to the cwd, made absolute (steps run elsewhere); hub ids unchanged."""
    return str(Path(model).resolve()) if Path(model).exists() else model


def _step_env() -> dict:
    """This process's environment, with the folder that holds this animate124 package first on PYTHONPATH, so the
    `python -m animate124.tools.cli` steps import the same code even when the package is not pip-installed."""
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join([root] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    return env


def _find_reusable(case: Case, roots: Sequence[Path], names: Sequence[str]) -> list[Path] | None:
    for folder in [case.folder] + [Path(r) / case.name for r in roots or []]:
        if all((folder / n).is_file() for n in names):
            return [(folder / n).resolve() for n in names]
    return None


def _cn_prompt(caption: str, subjects: Sequence[str]) -> str:
    """The caption with its first word containing a subject (the init word, else the case name's first word; so
    "chimp" finds "chimpanzee" and "fish" "Clownfish") replaced by "<token>"; "a <token>, <caption>" if none does."""
    for subject in subjects:
        pattern = rf"\b\w*{re.escape(subject)}\w*\b"
        replaced, count = re.subn(pattern, "<token>", caption, count=1, flags=re.IGNORECASE)
        if count:
            return replaced
    return f"a <token>, {caption}"


def _default_threestudio() -> Path:
    # this file: <root>/custom/threestudio-animate124/animate124/tools/run_benchmark.py
    return Path(__file__).resolve().parents[4]


def _case_dir(steps: Sequence[Step]) -> Path:
    return next(s.cwd for s in steps if s.name == "evaluate")


def _is_done(path: Path) -> bool:
    if not path.is_file():
        return False
    try:
        record = json.loads(path.read_text())
    except json.JSONDecodeError:
        return False
    return all(Path(p).exists() for p in record.get("outputs", []))


def _write_done(path: Path, step: Step, command, seconds: float) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    record = {"step": step.name, "command": command, "outputs": [str(p) for p in step.outputs],
              "reused": command is None, "seconds": round(seconds, 1), "finished": time.strftime("%Y-%m-%d %H:%M:%S")}
    write_text(path, json.dumps(record, indent=1))


def _abs_glob(pattern: str) -> list[Path]:
    import glob

    return [Path(p) for p in glob.glob(pattern)]
