"""`animate124 launch`: our bad-input errors come out as their message alone; anything else keeps its traceback."""
from __future__ import annotations

import pytest

from animate124.tools import launch as launch_tool

FAKE_LAUNCH = """
class PreflightError(ValueError):
    pass
import sys
kind = sys.argv[1]
if kind == "preflight":
    raise PreflightError("2 problem(s) found before step 0; nothing was started:\\n  - one\\n  - two")
if kind == "a124":
    raise ValueError("a124-system: compile_denoisers='max' is not allowed; choose one of default, null")
raise ValueError("something else")
"""


def _checkout(tmp_path, monkeypatch, launch_py: str):
    """A threestudio checkout holding ``launch_py`` as its launch.py, as the working directory."""
    (tmp_path / "launch.py").write_text(launch_py)
    (tmp_path / "threestudio").mkdir()
    (tmp_path / "threestudio" / "__init__.py").write_text("")
    (tmp_path / "custom" / "threestudio-animate124").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(launch_tool, "_run_on_cpu", lambda: None)
    monkeypatch.setattr("sys.argv", list(__import__("sys").argv))  # launch() sets sys.argv for launch.py
    return tmp_path


@pytest.fixture
def checkout(tmp_path, monkeypatch):
    return _checkout(tmp_path, monkeypatch, FAKE_LAUNCH)


def test_preflight_list_and_a124_lines_print_alone_and_exit_1(checkout, capsys):
    assert launch_tool.launch(["preflight"]) == 1
    err = capsys.readouterr().err
    assert "animate124 launch: 2 problem(s) found before step 0; nothing was started:\n  - one\n  - two" in err
    assert "Traceback" not in err
    assert launch_tool.launch(["a124"]) == 1
    assert "animate124 launch: a124-system: compile_denoisers='max' is not allowed" in capsys.readouterr().err


def test_other_errors_keep_their_traceback(checkout):
    with pytest.raises(ValueError, match="something else"):
        launch_tool.launch(["other"])


# ---- the host's own start-up errors, checked before launch.py runs ---------------------------------------------------

HOST_LAUNCH = """
import os, sys
from pathlib import Path
Path("launch.py.ran").write_text(" ".join(sys.argv[1:]) + "\\n" + os.environ.get("CUDA_VISIBLE_DEVICES", "-"))
class PreflightError(ValueError):
    pass
if "data.image_path=missing.png" in sys.argv:  # as launch.py: the trial folder first, then the system's checks
    os.makedirs("outputs/t/run@20260101-000000", exist_ok=True)
    raise PreflightError("1 problem(s) found before step 0; nothing was started:\\n  - data.image_path=... missing")
"""

CONFIG = """
name: t
tag: run
exp_root_dir: outputs
data_type: a124-image-video-datamodule
data:
  image_path: ???
system_type: a124-system
system:
  prompt: a panda
  learned_embeds_path: ???
  stages:
    static: {steps: 2, guidances: [sd]}
    dynamic: {steps: 3, guidances: [video]}
trainer: {max_steps: 5}
"""


@pytest.fixture
def host(tmp_path, monkeypatch):
    """A checkout whose launch.py records that it ran; a config with two stages; no NVIDIA GPU unless a test says."""
    _checkout(tmp_path, monkeypatch, HOST_LAUNCH)
    (tmp_path / "cfg.yaml").write_text(CONFIG)
    monkeypatch.setattr("animate124.tools.launch_checks.nvidia_gpu_count", lambda: 0)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    return tmp_path


def _snapshot(folder):
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


SET = ["data.image_path=rgba.png", "system.learned_embeds_path=e.safetensors"]


def _refused(host, capsys, argv) -> list[str]:
    """Run `animate124 launch argv`: it must stop before launch.py with one line per problem, writing nothing."""
    before = _snapshot(host)
    assert launch_tool.launch(argv) == 1
    assert not (host / "launch.py.ran").exists(), "launch.py ran"
    assert _snapshot(host) == before and not (host / "outputs").exists()
    err = [line for line in capsys.readouterr().err.strip().splitlines() if "import stand-ins" not in line]
    assert all(line.startswith("animate124 launch: error: ") for line in err), err
    return [line[len("animate124 launch: error: "):] for line in err]


def test_missing_config_and_yaml_error(host, capsys):
    assert _refused(host, capsys, ["--config", "nope.yaml", "--train"]) == [
        "--config nope.yaml does not exist: give the path of a config file"]
    (host / "custom" / "threestudio-animate124" / "configs").mkdir()
    assert _refused(host, capsys, ["--config", "nope.yaml", "--train"]) == [
        "--config nope.yaml does not exist: give the path of a config file; the configs are in "
        "custom/threestudio-animate124/configs/ (e.g. --config custom/threestudio-animate124/configs/animate124.yaml)"]
    (host / "bad.yaml").write_text("name: t\nsystem:\n  stages: [1, 2\n  prompt: x\n")
    (line,) = _refused(host, capsys, ["--config", "bad.yaml", "--train"])  # (PyYAML's own words vary by version)
    assert line.startswith("--config bad.yaml is not valid YAML (while parsing a flow sequence at line 3, column 11: ")
    assert line.endswith(" at line 4, column 9): fix it there"), line
    assert _refused(host, capsys, ["--config", "custom", "--train"]) == [
        "--config custom is a folder: give the config file, e.g. custom/animate124.yaml"]


@pytest.mark.parametrize("arg, message", [
    ("+system.foo=1", "'+system.foo=1' is Hydra override syntax, which launch.py does not read: write system.foo=1 "
                      "(launch.py adds a new key as it is)"),
    ("++system.prompt=x", "'++system.prompt=x' is Hydra override syntax, which launch.py does not read: write "
                          "system.prompt=x (launch.py adds a new key as it is)"),
    ("~system.prompt", "'~system.prompt' is Hydra override syntax, which launch.py does not read: write "
                       "system.prompt=null to clear a value"),
    ("--max_steps=5", "'--max_steps=5' is not an option of launch.py (--config, --gpu, --train/--validate/--test/"
                      "--export, --gradio, --verbose, --typecheck): settings are key=value without dashes, e.g. "
                      "system.prompt=\"a panda\""),
    ("system.prompt", "'system.prompt' is not key=value: write system.prompt=VALUE (without '=' OmegaConf sets it to "
                      "null)"),
    ("system..prompt=x", "'system..prompt=x': 'system..prompt' is not a config key (dotted names, e.g. "
                         "system.stages.dynamic.steps=2000)"),
    ("system.prompt=[a, b", "system.prompt='[a, b': the value is not valid YAML (while parsing a flow sequence): quote "
                            "it, e.g. system.prompt=\"'[a, b'\""),
])
def test_overrides_launch_py_cannot_read(host, capsys, arg, message):
    assert _refused(host, capsys, ["--config", "cfg.yaml", "--train", *SET, arg]) == [message]


def test_a_value_with_spaces_left_unquoted(host, capsys):
    assert _refused(host, capsys, ["--config", "cfg.yaml", "--train", *SET, "system.prompt=a", "panda"]) == [
        "'panda' is not key=value: quote a value with spaces: system.prompt=\"a panda ...\""]


def test_unset_values_and_top_level_typos(host, capsys):
    assert _refused(host, capsys, ["--config", "cfg.yaml", "--train", "sytem.prompt=x"]) == [
        "data.image_path is not set (cfg.yaml leaves it ???): pass data.image_path=... on the command line (the "
        "rgba.png of `animate124 preprocess PHOTO --out DIR`)",
        "system.learned_embeds_path is not set (cfg.yaml leaves it ???): pass system.learned_embeds_path=... on the "
        "command line (the learned_embeds.safetensors of `animate124 invert PHOTO --token _name_ --init word --out "
        "DIR`)",
        "'sytem' is not a top-level key of launch.py's config: did you mean 'system'?"]


@pytest.mark.parametrize("arg, message", [
    ("system.stages.dynamc.steps=2000", "system.stages.dynamc.steps=2000: cfg.yaml has no stage 'dynamc' (did you mean "
                                        "system.stages.dynamic.steps? its stages: ['static', 'dynamic']); a new stage "
                                        "needs its guidances and loss weights: add it to a copy of the config"),
    ("system.stages.1.steps=2000", "system.stages.1.steps=2000: cfg.yaml has no stage '1' (did you mean "
                                   "system.stages.dynamic.steps? its stages: ['static', 'dynamic']); a new stage needs "
                                   "its guidances and loss weights: add it to a copy of the config"),
    ("system.stages.refine=null", "system.stages.refine=null: cfg.yaml has no stage 'refine' (its stages: ['static', "
                                  "'dynamic']); a new stage needs its guidances and loss weights: add it to a copy of "
                                  "the config"),
])
def test_stage_overrides_must_name_a_stage(host, capsys, arg, message):
    assert _refused(host, capsys, ["--config", "cfg.yaml", "--train", *SET, arg]) == [message]


def test_stage_override_on_a_list_form_config(host, capsys):
    (host / "old.yaml").write_text(CONFIG.replace(
        "    static: {steps: 2, guidances: [sd]}\n    dynamic: {steps: 3, guidances: [video]}",
        "    - {name: static, steps: 2, guidances: [sd]}\n    - {name: dynamic, steps: 3, guidances: [video]}"))
    assert _refused(host, capsys, ["--config", "old.yaml", "--train", *SET, "system.stages.0.steps=1"]) == [
        "system.stages.0.steps=1: old.yaml lists its stages (the older list form), which overrides cannot reach: key "
        "them by name in the config as the shipped configs do (stages: {static: {steps: ...}, ...}), then write "
        "system.stages.<name>.steps=..."]


def test_resume_exp_root_dir_tag_and_mode(host, capsys):
    args = ["--config", "cfg.yaml", "--train", *SET]
    assert _refused(host, capsys, [*args, "resume=outputs/t/run/ckpts/last.ckpt"]) == [
        "resume=outputs/t/run/ckpts/last.ckpt does not exist: give the checkpoint to continue from, e.g. "
        "resume=outputs/<name>/<trial>/ckpts/last.ckpt"]
    (host / "trial" / "ckpts").mkdir(parents=True)
    (host / "trial" / "ckpts" / "last.ckpt").write_bytes(b"PK\x03\x04")
    assert _refused(host, capsys, [*args, "resume=trial"]) == [
        "resume=trial is a folder: give its checkpoint file, e.g. resume=trial/ckpts/last.ckpt"]
    (host / "trial" / "ckpts" / "notes.txt").write_text("my notes")
    assert _refused(host, capsys, [*args, "resume=trial/ckpts/notes.txt"]) == [
        "resume=trial/ckpts/notes.txt is not a checkpoint (threestudio writes them as ckpts/*.ckpt in the trial "
        "folder)"]
    (host / "a_file").write_text("the user's file")
    assert _refused(host, capsys, [*args, "exp_root_dir=a_file"]) == [
        "exp_root_dir=a_file: a_file is a file, so the run folder cannot be made there: set exp_root_dir to a folder "
        "(default outputs)"]
    assert _refused(host, capsys, [*args, "tag=", "use_timestamp=false"]) == [
        "tag is empty and use_timestamp=false, so the run has no folder name: pass tag=NAME or use_timestamp=true"]
    assert _refused(host, capsys, ["--config", "cfg.yaml", "--export", *SET]) == [
        "--export without resume= would use an untrained model: pass resume=outputs/<name>/<trial>/ckpts/last.ckpt"]
    assert _refused(host, capsys, [*args, "system.prompt=${system.promt}"]) == [
        "system.prompt: Interpolation key 'system.promt' not found: fix the ${...} interpolation or the key it names"]


def test_an_exp_root_dir_that_cannot_be_written(host, capsys, monkeypatch):
    """The nearest existing folder of exp_root_dir is not writable: one line, launch.py never runs. CI runs as root,
    who may write anywhere, so the permission is taken away through os.access (what the check asks)."""
    import os

    locked = host / "locked"
    locked.mkdir()
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode: False if os.path.realpath(path) == os.path.realpath(locked)
                        else real_access(path, mode))
    assert _refused(host, capsys, ["--config", "cfg.yaml", "--train", *SET, "exp_root_dir=locked/runs"]) == [
        f"exp_root_dir=locked/runs: {locked.resolve()} is not writable: set exp_root_dir to a folder you can write"]
    assert list(locked.iterdir()) == []


def test_gpu_that_this_machine_does_not_have(host, capsys, monkeypatch):
    from animate124.tools import launch_checks

    assert _refused(host, capsys, ["--config", "cfg.yaml", "--train", *SET, "--gpu", "7"]) == [
        "--gpu 7: this machine has no NVIDIA GPU (animate124 launch runs launch.py on the CPU): drop --gpu"]
    assert launch_checks.gpu_problems("7", True, None, 1) == [
        "--gpu 7 names GPU 7 but this machine has 1 GPU (0): pass --gpu 0 (indices as `nvidia-smi -L` lists them)"]
    assert launch_checks.gpu_problems("0,3", True, None, 2) == [
        "--gpu 0,3 names GPU 3 but this machine has 2 GPUs (0, 1): pass --gpu 0 (indices as `nvidia-smi -L` lists "
        "them)"]
    assert launch_checks.gpu_problems("1", False, "7", 2) == [
        "CUDA_VISIBLE_DEVICES=7 names GPU 7 but this machine has 2 GPUs (0, 1): set it to indices shown by "
        "`nvidia-smi -L`, or unset it and pick with --gpu"]
    assert launch_checks.gpu_problems("1", True, "0", 2) == [
        "--gpu 1 is ignored by launch.py while CUDA_VISIBLE_DEVICES=0 is set (it uses every GPU listed there): unset "
        "CUDA_VISIBLE_DEVICES to choose with --gpu, or drop --gpu"]
    assert launch_checks.gpu_problems("x", True, None, 2) == [
        "--gpu 'x' is not a list of distinct GPU indices: pass e.g. --gpu 0 or --gpu 0,1"]
    assert launch_checks.gpu_problems("0", False, None, 0) == []  # the default on a CPU machine: runs on the CPU
    assert launch_checks.gpu_problems("1", True, None, 2) == [] and launch_checks.gpu_problems("0", True, "3", 4) == []
    # a valid --gpu reaches launch.py as CUDA_VISIBLE_DEVICES, set before torch initialises CUDA here
    monkeypatch.setattr(launch_checks, "nvidia_gpu_count", lambda: 2)
    assert launch_tool.launch(["--config", "cfg.yaml", "--train", *SET, "--gpu", "1"]) == 0, capsys.readouterr().err
    assert (host / "launch.py.ran").read_text().splitlines()[-1] == "1"


def test_a_stop_at_the_preflight_leaves_no_trial_folder(host, capsys):
    """launch.py makes the trial folder before the system's checks run; when they stop the run, animate124 launch
    removes it again (it is empty), and keeps every folder that was there before."""
    (host / "outputs" / "t" / "earlier").mkdir(parents=True)
    assert launch_tool.launch(["--config", "cfg.yaml", "--train", "data.image_path=missing.png",
                               "system.learned_embeds_path=e.safetensors"]) == 1
    assert "animate124 launch: 1 problem(s) found before step 0" in capsys.readouterr().err
    assert sorted(p.relative_to(host).as_posix() for p in (host / "outputs").rglob("*")) == ["outputs/t",
                                                                                            "outputs/t/earlier"]


def test_every_shipped_config_passes_the_launch_checks(tmp_path, monkeypatch):
    """No false alarm on what we ship: each config with its required values, as README's command lines give them."""
    from pathlib import Path

    from omegaconf import OmegaConf

    from animate124.tools.launch_checks import check_launch

    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    configs = sorted((Path(__file__).resolve().parents[2] / "configs").glob("*.yaml"))
    assert len(configs) >= 9
    for config in configs:
        first = next(iter(OmegaConf.load(config).system.stages))
        problems, folders = check_launch(["--config", str(config), "--train", "--gpu", "0", "data.image_path=rgba.png",
                                          "system.learned_embeds_path=e.safetensors", "system.weights=w.ckpt",
                                          f"exp_root_dir={tmp_path}", f"system.stages.{first}.steps=10"],
                                         gpu_count=1, visible=None)
        assert problems == [], (config.name, problems)
        assert folders[0] == tmp_path
