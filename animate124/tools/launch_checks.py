"""What ``animate124 launch`` checks before threestudio's launch.py runs, each problem one line naming the fix.

launch.py reports these itself as tracebacks, some after it has made the trial folder: a missing config file, a YAML
syntax error, an override it cannot read (Hydra's ``+key=``, ``~key``, ``--key=value``, a value without ``key=``), a
``resume=`` or ``exp_root_dir`` that cannot work, a ``--gpu`` this machine does not have. Checking reads the config and
the command line only: nothing is written, no model loads, and the asset-making ``${a124_smoke_assets:...}`` resolver
is not run.
"""
from __future__ import annotations

import argparse
import ctypes
import difflib
import os
import re
import warnings
import zipfile
from pathlib import Path
from typing import Any, Optional

__all__ = ["launch_parser", "launch_problems", "check_launch", "gpu_problems", "override_problems", "nvidia_gpu_count",
           "select_gpus", "remove_new_empty_folders"]

# launch.py's top-level config (threestudio.utils.config.ExperimentConfig): the keys an override may start with
TOP_LEVEL_KEYS = ("name", "description", "tag", "seed", "use_timestamp", "timestamp", "exp_root_dir", "exp_dir",
                  "trial_name", "trial_dir", "n_gpus", "resume", "data_type", "data", "system_type", "system",
                  "trainer", "checkpoint")
# what to pass for a mandatory value (??? in a config) that is not set
MISSING_HINTS = {
    "data.image_path": "the rgba.png of `animate124 preprocess PHOTO --out DIR`",
    "system.learned_embeds_path": "the learned_embeds.safetensors of `animate124 invert PHOTO --token _name_ --init "
                                  "word --out DIR`",
    "system.weights": "the ckpts/last.ckpt of the earlier stage's run",
}
_KEY = re.compile(r"^[A-Za-z_][\w-]*(\.[\w-]+)*$")


def launch_parser() -> argparse.ArgumentParser:
    """launch.py's own arguments (``--config``, ``--gpu``, one mode, ``--gradio``, ``--verbose``, ``--typecheck``)."""
    parser = argparse.ArgumentParser(prog="launch.py", add_help=False)
    parser.add_argument("--config")
    parser.add_argument("--gpu", default="0")
    for flag in ("--train", "--validate", "--test", "--export", "--gradio", "--verbose", "--typecheck"):
        parser.add_argument(flag, action="store_true")
    return parser


_FROM_ENV = object()


def launch_problems(argv: list[str], gpu_count: Optional[int] = None, visible: Any = _FROM_ENV) -> list[str]:
    """Every problem of launch.py's command line ``argv`` found before it runs (empty: let it run)."""
    return check_launch(argv, gpu_count, visible)[0]


def check_launch(argv: list[str], gpu_count: Optional[int] = None,
                 visible: Any = _FROM_ENV) -> tuple[list[str], list[Path]]:
    """(the problems of launch.py's command line ``argv``, the folders the host will make while loading the config:
    exp_root_dir and exp_root_dir/name, when known).

    ``gpu_count``: the machine's NVIDIA GPUs (None: asked of the driver, see :func:`nvidia_gpu_count`); ``visible``:
    CUDA_VISIBLE_DEVICES as the user set it (default: the environment's)."""
    try:
        args, extras = launch_parser().parse_known_args(argv)
    except SystemExit:  # launch.py prints its own usage line for these
        return [], []
    if not args.config:
        return [], []  # launch.py: "the following arguments are required: --config"
    explicit_gpu = any(a == "--gpu" or a.startswith("--gpu=") for a in argv)
    problems = override_problems(extras)
    problems += gpu_problems(args.gpu, explicit_gpu,
                             os.environ.get("CUDA_VISIBLE_DEVICES") if visible is _FROM_ENV else visible,
                             nvidia_gpu_count() if gpu_count is None else gpu_count)
    config, problem = _load_yaml(args.config)
    if problem or problems:
        return problems + ([problem] if problem else []), []
    merged, problem = _merge(config, extras, args.config)
    if problem:
        return [problem], []
    problems += _missing_values(merged, args.config)
    problems += _top_level_keys(merged)
    if problems:
        return problems, []  # what follows resolves values, which the problems above would stop
    resolved, problem = _resolve(merged)
    if problem:
        return [problem], []
    problems += _tag_problems(resolved)
    problems += _resume_problems(resolved.get("resume"), args)
    problems += _folder_problems(resolved)
    root = Path(str(resolved.get("exp_root_dir", "outputs")))
    return problems, [root, root / str(resolved.get("name", "default"))]


# ---- the command line ------------------------------------------------------------------------------------------------


def override_problems(extras: list[str]) -> list[str]:
    """launch.py passes every argument it does not know to OmegaConf as ``key=value``; anything else is silently
    misread (``+system.x=1`` becomes a top-level key ``+system``, ``system.prompt`` without ``=`` sets it to null)."""
    problems = []
    for i, arg in enumerate(extras):
        key, eq, value = arg.partition("=")
        if arg.startswith(("+", "~")):
            bare = arg.lstrip("+~")
            fix = (f"write {bare} (launch.py adds a new key as it is)" if eq else
                   f"write {bare}=null to clear a value")
            problems.append(f"{arg!r} is Hydra override syntax, which launch.py does not read: {fix}")
        elif arg.startswith("-"):
            problems.append(f"{arg!r} is not an option of launch.py (--config, --gpu, --train/--validate/--test/"
                            "--export, --gradio, --verbose, --typecheck): settings are key=value without dashes, e.g. "
                            "system.prompt=\"a panda\"")
        elif not eq:
            after = i > 0 and "=" in extras[i - 1] and "." not in arg  # a word of an unquoted value, not a key
            fix = (f"quote a value with spaces: {extras[i - 1].partition('=')[0]}=\"{extras[i - 1].partition('=')[2]} "
                   f"{arg} ...\"" if after else f"write {arg}=VALUE (without '=' OmegaConf sets it to null)")
            problems.append(f"{arg!r} is not key=value: {fix}")
        elif not _KEY.match(key):
            problems.append(f"{arg!r}: {key!r} is not a config key (dotted names, e.g. "
                            "system.stages.dynamic.steps=2000)")
        else:
            problem = _value_problem(key, value)
            if problem:
                problems.append(problem)
    return problems


def _value_problem(key: str, value: str) -> Optional[str]:
    from omegaconf import OmegaConf

    try:
        OmegaConf.from_dotlist([f"{key}={value}"])
    except Exception as error:  # noqa: BLE001 - a YAML error in the value
        return (f"{key}={value!r}: the value is not valid YAML ({_first_line(error)}): quote it, e.g. "
                f"{key}=\"'{value}'\"")
    return None


def _first_line(error: BaseException) -> str:  # preflight.first_line's twin: these checks run before threestudio loads
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__


# ---- the GPUs --------------------------------------------------------------------------------------------------------


def nvidia_gpu_count() -> int:
    """The NVIDIA GPUs of this machine as the driver (NVML) counts them: CUDA_VISIBLE_DEVICES does not hide any and
    CUDA is not initialised (torch reads CUDA_VISIBLE_DEVICES once, when it first initialises). 0 without a driver."""
    try:
        nvml = ctypes.CDLL("libnvidia-ml.so.1")
    except OSError:
        return 0
    count = ctypes.c_uint(0)
    if nvml.nvmlInit_v2() != 0 or nvml.nvmlDeviceGetCount_v2(ctypes.byref(count)) != 0:
        return 0
    nvml.nvmlShutdown()
    return int(count.value)


def gpu_problems(gpu: str, explicit: bool, visible: Optional[str], count: int) -> list[str]:
    """``--gpu`` (indices of this machine's GPUs, as launch.py sets CUDA_VISIBLE_DEVICES from it) or, when set,
    CUDA_VISIBLE_DEVICES (then launch.py ignores --gpu and uses every GPU listed there)."""
    indices = ", ".join(map(str, range(count)))
    have = f"this machine has {count} GPU{'s' if count != 1 else ''} ({indices})" if count else \
        "this machine has no NVIDIA GPU"
    if visible:
        wanted = [v.strip() for v in visible.split(",") if v.strip()]
        bad = [v for v in wanted if v.isdigit() and int(v) >= count]
        if count and bad:
            return [f"CUDA_VISIBLE_DEVICES={visible} names GPU {', '.join(bad)} but {have}: set it to indices shown by "
                    "`nvidia-smi -L`, or unset it and pick with --gpu"]
        if explicit and gpu != "0" and gpu != visible:
            return [f"--gpu {gpu} is ignored by launch.py while CUDA_VISIBLE_DEVICES={visible} is set (it uses every "
                    "GPU listed there): unset CUDA_VISIBLE_DEVICES to choose with --gpu, or drop --gpu"]
        return []
    wanted = [v.strip() for v in gpu.split(",")]
    if not all(v.isdigit() for v in wanted) or len(set(wanted)) != len(wanted):
        return [f"--gpu {gpu!r} is not a list of distinct GPU indices: pass e.g. --gpu 0 or --gpu 0,1"]
    if not count:
        if explicit and gpu != "0":
            return [f"--gpu {gpu}: {have} (animate124 launch runs launch.py on the CPU): drop --gpu"]
        return []
    bad = [v for v in wanted if int(v) >= count]
    if bad:
        return [f"--gpu {gpu} names GPU {', '.join(bad)} but {have}: pass --gpu "
                f"{','.join(v for v in wanted if int(v) < count) or '0'} (indices as `nvidia-smi -L` lists them)"]
    return []


# ---- the config ------------------------------------------------------------------------------------------------------


def _load_yaml(path: str) -> tuple[Any, Optional[str]]:
    from omegaconf import OmegaConf

    if os.path.isdir(path):
        return None, f"--config {path} is a folder: give the config file, e.g. {Path(path) / 'animate124.yaml'}"
    if not os.path.isfile(path):
        here = Path("custom/threestudio-animate124/configs")
        hint = (f"; the configs are in {here}/ (e.g. --config {here / 'animate124.yaml'})" if here.is_dir() else "")
        return None, f"--config {path} does not exist: give the path of a config file{hint}"
    try:
        config = OmegaConf.load(path)
    except Exception as error:  # noqa: BLE001 - yaml.YAMLError and OmegaConf's own
        def at(mark) -> str:
            return f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""

        context = getattr(error, "context", None)
        what = (f"{context}{at(getattr(error, 'context_mark', None))}: " if context else "") + (
            (getattr(error, "problem", None) or _first_line(error)) + at(getattr(error, "problem_mark", None)))
        return None, f"--config {path} is not valid YAML ({what}): fix it there"
    if not OmegaConf.is_dict(config):
        return None, f"--config {path} holds a {type(config).__name__}, not a mapping of settings: give a config file"
    return config, None


def _merge(config: Any, extras: list[str], path: str) -> tuple[Any, Optional[str]]:
    """The host's merge (OmegaConf.from_cli, then merge); a failing override is found and named. Stage overrides are
    checked against the stages the config has."""
    from omegaconf import OmegaConf

    stages = OmegaConf.select(config, "system.stages", default=None)
    for arg in extras:
        key = arg.partition("=")[0]
        if not key.startswith("system.stages.") or stages is None:
            continue
        name = key.split(".")[2]
        if OmegaConf.is_list(stages):
            return None, (f"{arg}: {path} lists its stages (the older list form), which overrides cannot reach: key "
                          "them by name in the config as the shipped configs do (stages: {static: {steps: ...}, ...}), "
                          f"then write system.stages.<name>.{'.'.join(key.split('.')[3:]) or 'steps'}=...")
        if name not in stages and not (key.count(".") == 2 and arg.partition("=")[2] not in ("null", "~", "")):
            names = [str(k) for k in stages]
            guess = (names[int(name)] if name.isdigit() and int(name) < len(names)
                     else next(iter(difflib.get_close_matches(name, names, n=1, cutoff=0.6)), None))
            hint = f"did you mean system.stages.{guess}.{'.'.join(key.split('.')[3:])}? " if guess else ""
            return None, (f"{arg}: {path} has no stage {name!r} ({hint}its stages: {names}); a new stage needs its "
                          "guidances and loss weights: add it to a copy of the config")
    try:
        return OmegaConf.merge(config, OmegaConf.from_cli(list(extras))), None
    except Exception as error:  # noqa: BLE001 - name the override that does not fit
        for arg in extras:
            try:
                OmegaConf.merge(config, OmegaConf.from_cli([arg]))
            except Exception:  # noqa: BLE001
                return None, (f"{arg} does not fit the config ({_first_line(error)}): check the key against {path} "
                              "(a list is replaced whole: key=[a, b])")
        return None, f"the overrides do not merge with {path} ({_first_line(error)})"


def _missing_values(cfg: Any, path: str, prefix: str = "") -> list[str]:
    """Every ``???`` left unset (the host would stop at the first one with a traceback, after making the trial
    folder)."""
    from omegaconf import OmegaConf

    problems = []
    for key in cfg:
        full = f"{prefix}{key}"
        if OmegaConf.is_missing(cfg, key):
            hint = MISSING_HINTS.get(full, "its value")
            problems.append(f"{full} is not set ({path} leaves it ???): pass {full}=... on the command line ({hint})")
        elif not OmegaConf.is_interpolation(cfg, key) and OmegaConf.is_dict(cfg[key]):
            problems += _missing_values(cfg[key], path, f"{full}.")
    return problems


def _top_level_keys(cfg: Any) -> list[str]:
    unknown = [str(k) for k in cfg if str(k) not in TOP_LEVEL_KEYS]
    problems = []
    for key in unknown:
        close = difflib.get_close_matches(key, TOP_LEVEL_KEYS, n=1, cutoff=0.6)
        hint = f"did you mean {close[0]!r}?" if close else f"the top-level keys are {list(TOP_LEVEL_KEYS)}"
        problems.append(f"{key!r} is not a top-level key of launch.py's config: {hint}")
    return problems


def _resolve(cfg: Any) -> tuple[Any, Optional[str]]:
    """A resolved copy, as the host resolves it. The smoke assets' resolver answers its argument instead of writing the
    tiny models, and a resolver not registered here (the host's, when threestudio could not be imported) answers a
    placeholder, so only interpolations that cannot work are reported."""
    from omegaconf import OmegaConf
    from omegaconf.basecontainer import BaseContainer

    copy = OmegaConf.create(OmegaConf.to_container(cfg, resolve=False))
    names = set(re.findall(r"\$\{([\w.-]+):", OmegaConf.to_yaml(copy)))
    saved = dict(BaseContainer._resolvers)  # OmegaConf has no public way to swap a resolver and put it back
    try:
        with warnings.catch_warnings():  # omegaconf 2.4 deprecates register_new_resolver; 2.3 has nothing else
            warnings.simplefilter("ignore")
            OmegaConf.register_new_resolver("a124_smoke_assets", lambda folder: folder, replace=True)
            for name in names - {"a124_smoke_assets"}:
                if not OmegaConf.has_resolver(name):
                    OmegaConf.register_new_resolver(name, lambda *args: "resolved-by-launch.py", replace=True)
        OmegaConf.resolve(copy)
    except Exception as error:  # noqa: BLE001 - InterpolationKeyError, a resolver's error, ...
        key = getattr(error, "full_key", None) or _failing_key(copy)  # omegaconf 2.3 leaves full_key unset here
        return None, (f"{key or 'the config'}: {_first_line(error)}: fix the ${{...}} interpolation or the key it "
                      "names")
    finally:
        BaseContainer._resolvers.clear()
        BaseContainer._resolvers.update(saved)
    return copy, None


def _failing_key(cfg: Any, prefix: str = "") -> Optional[str]:
    """The dotted key of the first value of ``cfg`` whose interpolation does not resolve."""
    from omegaconf import OmegaConf

    for key in cfg:
        full = f"{prefix}{key}"
        if OmegaConf.is_interpolation(cfg, key):
            try:
                cfg[key]
            except Exception:  # noqa: BLE001
                return full
        elif OmegaConf.is_dict(cfg[key]):
            found = _failing_key(cfg[key], f"{full}.")
            if found:
                return found
    return None


def _tag_problems(cfg: Any) -> list[str]:
    if not cfg.get("tag") and cfg.get("use_timestamp", True) is False:
        return ["tag is empty and use_timestamp=false, so the run has no folder name: pass tag=NAME or "
                "use_timestamp=true"]
    return []


def _resume_problems(resume: Any, args: argparse.Namespace) -> list[str]:
    if resume is None:
        if args.validate or args.test or args.export:
            mode = next(m for m in ("validate", "test", "export") if getattr(args, m))
            return [f"--{mode} without resume= would use an untrained model: pass resume=outputs/<name>/<trial>/ckpts/"
                    "last.ckpt"]
        return []
    path = Path(str(resume))
    if path.is_dir():
        found = [p for p in (path / "ckpts" / "last.ckpt", path / "last.ckpt") if p.is_file()]
        use = found[0] if found else path / "ckpts" / "last.ckpt"
        return [f"resume={resume} is a folder: give its checkpoint file, e.g. resume={use}"]
    if not path.is_file():
        near = sorted(path.parent.glob("*.ckpt")) if path.parent.is_dir() else []
        hint = f" ({path.parent} holds {', '.join(p.name for p in near[-3:])})" if near else ""
        return [f"resume={resume} does not exist{hint}: give the checkpoint to continue from, e.g. "
                "resume=outputs/<name>/<trial>/ckpts/last.ckpt"]
    with open(path, "rb") as f:
        head = f.read(2)
    if not zipfile.is_zipfile(path) and head[:1] != b"\x80":  # torch.save writes a zip (or, long ago, a pickle)
        return [f"resume={resume} is not a checkpoint (threestudio writes them as ckpts/*.ckpt in the trial folder)"]
    return []


def _folder_problems(cfg: Any) -> list[str]:
    """The folders the host makes while it loads the config: exp_root_dir, exp_root_dir/name, and without a timestamp
    the trial folder itself."""
    root = Path(str(cfg.get("exp_root_dir", "outputs")))
    chain = [root, root / str(cfg.get("name", "default"))]
    if cfg.get("use_timestamp", True) is False:
        chain.append(chain[-1] / str(cfg.get("tag", "")))
    for folder in chain:
        if folder.exists() and not folder.is_dir():
            return [f"exp_root_dir={root}: {folder} is a file, so the run folder cannot be made there: set "
                    "exp_root_dir to a folder (default outputs)"]
    existing = next((p for p in [*chain[::-1], *root.resolve().parents] if p.exists()), None)
    if existing is not None and not os.access(existing, os.W_OK | os.X_OK):
        return [f"exp_root_dir={root}: {existing} is not writable: set exp_root_dir to a folder you can write"]
    return []


# ---- around launch.py ------------------------------------------------------------------------------------------------


def select_gpus(argv: list[str]) -> None:
    """Set CUDA_VISIBLE_DEVICES from ``--gpu`` as launch.py does, but before torch is imported here: torch reads it
    when it first initialises CUDA, which ``animate124 launch`` does before launch.py runs, so launch.py's own setting
    would come too late and every GPU would stay visible. Left alone when already set (launch.py then ignores --gpu)."""
    if os.environ.get("CUDA_VISIBLE_DEVICES"):
        return
    try:
        args, _ = launch_parser().parse_known_args(argv)
    except SystemExit:
        return
    if all(v.strip().isdigit() for v in str(args.gpu).split(",")):
        os.environ["CUDA_VISIBLE_DEVICES"] = args.gpu


def existing(folders: list[Path]) -> set[Path]:
    """``folders`` and the entries of the last one, as they are now (before launch.py makes the trial folder)."""
    found = {f for f in folders if f.exists()}
    if folders and folders[-1].is_dir():
        found |= set(folders[-1].iterdir())
    return found


def remove_new_empty_folders(folders: list[Path], before: set[Path]) -> None:
    """After a check stopped the run: the folders launch.py made for it (a new trial folder, and exp_root_dir / name
    when new), where they hold nothing; anything with a file in it is kept."""
    if len(folders) != 2:
        return
    exp_root, exp_dir = folders
    if exp_dir.is_dir():
        for child in exp_dir.iterdir():
            if child not in before and child.is_dir():
                for folder, _, _ in sorted(os.walk(child), key=lambda entry: -len(entry[0])):
                    try:
                        os.rmdir(folder)
                    except OSError:
                        pass  # not empty: kept
    for folder in (exp_dir, exp_root):
        if folder not in before and folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()
