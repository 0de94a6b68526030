"""`animate124 run-benchmark`: dry run, sharding, resuming, reuse of preprocessed files, failures."""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import pytest
from conftest import SHARED_DATA
from PIL import Image

from animate124.tools import run_benchmark as rb
from animate124.tools.cli import ToolError, build_parser, main

SHARED = SHARED_DATA  # conftest: ../shared/data or $A124_SHARED_DATA
BENCHMARK = SHARED / "benchmark"
pytestmark = pytest.mark.unit


@pytest.fixture()
def benchmark_dir() -> Path:
    if not (BENCHMARK / "benchmark.json").exists():
        pytest.skip(f"reference data {BENCHMARK} is missing")
    return BENCHMARK


@pytest.fixture()
def small_data(tmp_path) -> Path:
    """Three cases with tiny images; the second also ships rgba.png, depth.png and learned_embeds.bin."""
    data = tmp_path / "data"
    entries = [{"name": "panda-dance", "caption": "a panda is dancing"},
               {"name": "fox-game", "caption": "a fox maneuvering a game controller with its paws"},
               {"name": "odd-case", "caption": "a thing spinning", "init": "thing"}]
    for entry in entries:
        (data / entry["name"]).mkdir(parents=True)
        Image.new("RGB", (16, 16), (200, 10, 10)).save(data / entry["name"] / "image.jpg")
    for name in ("rgba.png", "depth.png", "learned_embeds.bin"):
        (data / "fox-game" / name).write_bytes(b"shipped")
    (data / "benchmark.json").write_text(json.dumps(entries))
    return data


def _args(*argv: str) -> argparse.Namespace:
    return build_parser().parse_args(["run-benchmark", *argv])


class FakeRunner:
    """Stands in for the subprocess: records each command and writes the files the real step would write."""

    def __init__(self, fail: tuple[str, str] | None = None):
        self.calls: list[tuple[str, str]] = []
        self.fail = fail

    def __call__(self, command, cwd, env, log):
        command = list(command)
        step = "train" if "launch.py" in command else command[3]
        case = Path(cwd).name if step != "train" else _override(command, "tag")
        if step == "evaluate" and "--batch" in command:
            case = "<table>"
        self.calls.append((case, step))
        if self.fail == (case, step):
            return 1
        if step == "preprocess":
            out = Path(command[command.index("--out") + 1])
            out.mkdir(parents=True, exist_ok=True)
            for name in ("rgba.png", "depth.png"):
                (out / name).write_bytes(b"x")
        elif step == "invert":
            out = Path(command[command.index("--out") + 1])
            out.mkdir(parents=True, exist_ok=True)
            for name in ("learned_embeds.bin", "learned_embeds.safetensors"):
                (out / name).write_bytes(b"x")
        elif step == "train":
            frames = Path(_override(command, "exp_root_dir")) / "animate124" / case / "save" / "it10-test"
            frames = frames / "front-over-time"
            frames.mkdir(parents=True, exist_ok=True)
            (frames / "0.png").write_bytes(b"x")
        else:  # evaluate: one run or the --batch table
            out = Path(command[command.index("--out") + 1]) if "--out" in command else Path(command[4])
            for name in ("metrics.csv", "metrics.md"):
                (out / name).write_text(f"| run |\n|---|\n| {case} |\n")
        return 0


def _override(command, key):
    return next(c.split("=", 1)[1] for c in command if c.startswith(key + "="))


def test_dry_run_lists_all_24_cases_and_commands(benchmark_dir, tmp_path, capsys):
    out = tmp_path / "out"
    status = main(["run-benchmark", str(benchmark_dir), "--out", str(out), "--dry-run", "--threestudio",
                   str(tmp_path / "ts"), "--reuse-from", str(SHARED / "examples"), "--gpu", "3"])
    assert status == 0
    text = capsys.readouterr().out
    names = [e["name"] for e in json.loads((benchmark_dir / "benchmark.json").read_text())]
    assert len(names) == 24 and text.startswith("24 case(s) in shard 0/1")
    for name in names:
        assert f" {name}: " in text
    lines = text.splitlines()
    assert sum(line.startswith("  train: ") for line in lines) == 24
    assert sum(line.startswith("  evaluate: (cd") for line in lines) == 24
    # the five shipped examples are reused, the 19 others are preprocessed and inverted
    assert sum(line.startswith("  preprocess: reuse ") for line in lines) == 5
    assert sum(line.startswith("  invert: reuse ") for line in lines) == 5
    assert sum(line.startswith("  invert: (cd") for line in lines) == 19
    train = next(line for line in lines if line.startswith("  train: ") and "cat-wave" in line)
    assert "launch.py --config custom/threestudio-animate124/configs/animate124.yaml --train --gpu 3" in train
    assert "'system.motion_prompt=a full-bodied cat is waving its paw'" in train
    assert "'system.refine_prompt=a full-bodied <token> is waving its paw'" in train
    assert "'system.prompt=a high-resolution DSLR image of a cat'" in train
    assert f"data.depth_path={out.resolve() / 'cat-wave' / 'prep' / 'depth.png'}" in train
    assert f"exp_root_dir={out.resolve() / 'cat-wave' / 'threestudio'}" in train and "tag=cat-wave" in train
    invert = next(line for line in lines if line.startswith("  invert: (cd") and "cat-wave" in line)
    assert "--token _cat_wave_ --init cat" in invert
    assert not out.exists()  # a dry run writes nothing


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5])
def test_shards_are_disjoint_and_cover(benchmark_dir, n):
    cases = rb.load_cases(benchmark_dir)
    shards = [[c.name for c in rb.select_cases(cases, rb.parse_shard(f"{i}/{n}"))] for i in range(n)]
    flat = [name for shard in shards for name in shard]
    assert sorted(flat) == sorted(c.name for c in cases) and len(flat) == len(set(flat)) == 24
    assert [len(s) for s in shards] == [len(range(i, 24, n)) for i in range(n)]
    assert shards[0][0] == cases[0].name  # index modulo n: shard 0 starts with the first case


@pytest.mark.parametrize("bad", ["3/2", "2/2", "1/0", "-1/2", "a/b", "1", "1/2/3", ""])
def test_bad_shard_is_a_clear_error(bad, small_data, capsys):
    with pytest.raises(ToolError, match="use i/n with 0 <= i < n"):
        rb.parse_shard(bad)
    assert main(["run-benchmark", str(small_data), "--dry-run", f"--shard={bad}"]) == 1
    errors = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert len(errors) == 1 and f"--shard {bad!r} is not valid" in errors[0]


def test_init_words_are_single_clip_tokens(tmp_path):
    from transformers import CLIPTokenizer

    from animate124.testing.tiny_models import make_clip_tokenizer

    tokenizer = CLIPTokenizer.from_pretrained(make_clip_tokenizer(tmp_path / "tok"))
    for name, word in rb.INIT_WORDS.items():
        assert len(tokenizer.encode(word, add_special_tokens=False)) == 1, (name, word)
        assert len(tokenizer.encode(f"_{name.replace('-', '_')}_", add_special_tokens=False)) > 1


def test_run_resume_and_reuse(small_data, tmp_path):
    ts = tmp_path / "ts"
    ts.mkdir()
    (ts / "launch.py").write_text("")
    out = tmp_path / "out"
    argv = [str(small_data), "--out", str(out), "--threestudio", str(ts)]
    runner = FakeRunner()
    assert rb.execute(_args(*argv), runner) == 0
    steps = [("panda-dance", s) for s in ("preprocess", "invert", "train", "evaluate")]
    steps += [("fox-game", "train"), ("fox-game", "evaluate")]  # preprocess and invert reuse the shipped files
    steps += [("odd-case", s) for s in ("preprocess", "invert", "train", "evaluate")] + [("<table>", "evaluate")]
    assert runner.calls == steps
    done = json.loads((out / "panda-dance" / ".done" / "train.json").read_text())
    assert "launch.py" in done["command"] and done["outputs"][0].endswith("save/it10-test/front-over-time/0.png")
    reused = json.loads((out / "fox-game" / ".done" / "preprocess.json").read_text())
    assert reused["reused"] and reused["outputs"][0] == str((small_data / "fox-game" / "rgba.png").resolve())
    run_json = json.loads((out / "odd-case" / "run.json").read_text())
    assert run_json == {"prompt": "a thing spinning", "image": str(out.resolve() / "odd-case" / "prep" / "rgba.png"),
                        "frames": "threestudio/*/odd-case/save/it*-test/front-over-time/*.png", "panel": "0"}
    # 1. the same command again: every step is skipped, only the table is rebuilt
    again = FakeRunner()
    assert rb.execute(_args(*argv), again) == 0
    assert again.calls == [("<table>", "evaluate")]
    # 2. an output removed: that step runs again (its .done no longer holds), the others stay skipped
    (out / "odd-case" / "invert" / "learned_embeds.bin").unlink()
    third = FakeRunner()
    assert rb.execute(_args(*argv), third) == 0
    assert third.calls == [("odd-case", "invert"), ("<table>", "evaluate")]
    # 3. --summarize (after all shards): only the table over the finished cases
    table = FakeRunner()
    assert rb.execute(_args(*argv, "--summarize"), table) == 0
    assert table.calls == [("<table>", "evaluate")]


def test_failed_step_stops_its_case_only(small_data, tmp_path, capsys):
    ts = tmp_path / "ts"
    ts.mkdir()
    (ts / "launch.py").write_text("")
    runner = FakeRunner(fail=("panda-dance", "invert"))
    status = rb.execute(_args(str(small_data), "--out", str(tmp_path / "o"), "--threestudio", str(ts)), runner)
    assert status == 1
    assert ("panda-dance", "train") not in runner.calls and ("odd-case", "evaluate") in runner.calls
    assert "1 case(s) failed: panda-dance" in capsys.readouterr().err
    assert not (tmp_path / "o" / "panda-dance" / ".done" / "invert.json").exists()


def test_cases_filter_and_missing_launch(small_data, tmp_path, capsys):
    assert main(["run-benchmark", str(small_data), "--dry-run", "--cases", "odd-case"]) == 0
    assert capsys.readouterr().out.startswith("1 case(s)")
    assert main(["run-benchmark", str(small_data), "--dry-run", "--cases", "nope"]) == 1
    assert "--cases nope not in benchmark.json" in capsys.readouterr().err
    assert main(["run-benchmark", str(small_data), "--out", str(tmp_path / "o"), "--threestudio", str(tmp_path)]) == 1
    assert "no launch.py" in capsys.readouterr().err


def test_train_keys_live_in_one_dict(small_data, tmp_path, monkeypatch):
    monkeypatch.setitem(rb.TRAIN_KEYS, "image_path", "data.image.image_path")
    monkeypatch.setitem(rb.TRAIN_KEYS, "cn_prompt", None)
    case = rb.load_cases(small_data)[0]
    steps = rb.plan_case(case, _args(str(small_data), "--out", str(tmp_path), "--threestudio", str(tmp_path)))
    train = steps[2].command
    assert any(c.startswith("data.image.image_path=") for c in train)
    assert not any(c.startswith("system.refine_prompt=") for c in train)


FAKE_LAUNCH = '''
import os, sys
import numpy as np
from PIL import Image

args = sys.argv[1:]
assert args[:2] == ["--config", "custom/threestudio-animate124/configs/animate124.yaml"], args
assert "--train" in args and os.environ["CUDA_VISIBLE_DEVICES"] == "7", (args, os.environ.get("CUDA_VISIBLE_DEVICES"))
kv = dict(a.split("=", 1) for a in args if "=" in a)
rgba = np.asarray(Image.open(kv["data.image_path"]).convert("RGBA").resize((32, 32))).astype(np.float32)
frame = (rgba[..., :3] * rgba[..., 3:] / 255 + 255 * (1 - rgba[..., 3:] / 255)).round().astype(np.uint8)
grid = np.concatenate([frame, 255 - frame, np.zeros_like(frame)], axis=1)  # [rgb | normal | opacity]
save = os.path.join(kv["exp_root_dir"], "animate124", kv["tag"], "save", "it5-test", "front-over-time")
os.makedirs(save, exist_ok=True)
for i in range(4):
    Image.fromarray(grid).save(os.path.join(save, f"{i}.png"))
'''


@pytest.mark.slow
def test_real_subprocesses_end_to_end(tmp_path, monkeypatch):
    """The real step commands (python -m animate124.tools.cli ...) with tiny models and a stand-in launch.py."""
    from animate124.testing.tiny_models import make_tiny_models

    example = SHARED / "examples" / "panda-dance"
    if not example.exists():
        pytest.skip(f"reference data {example} is missing")
    import torch

    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the step subprocesses: tiny models, no thread spin-waiting
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        tiny = make_tiny_models(tmp_path / "tiny", kinds=["clip"])
    finally:
        torch.set_num_threads(threads)
    data = tmp_path / "data"
    (data / "panda-dance").mkdir(parents=True)
    (data / "benchmark.json").write_text(json.dumps([{"name": "panda-dance", "caption": "a panda is dancing"}]))
    for name in ("image.jpg", "rgba.png", "depth.png"):
        Image.open(example / name).resize((64, 64)).save(data / "panda-dance" / name)
    # the shipped embedding is reused (the invert command itself is checked by test_planned_commands_parse)
    shutil.copy(example / "learned_embeds.bin", data / "panda-dance" / "learned_embeds.bin")
    ts = tmp_path / "ts"
    ts.mkdir()
    (ts / "launch.py").write_text(FAKE_LAUNCH)
    out = tmp_path / "out"
    argv = ["run-benchmark", str(data), "--out", str(out), "--threestudio", str(ts), "--gpu", "7",
            "--clip-model", str(tiny["clip"])]
    assert main(argv) == 0, (out / "panda-dance" / "logs").glob("*.log")
    train = json.loads((out / "panda-dance" / ".done" / "train.json").read_text())["command"]
    assert f"system.learned_embeds_path={data / 'panda-dance' / 'learned_embeds.bin'}" in train
    table = (out / "metrics.md").read_text().splitlines()
    assert table[0] == "| run | frames | clip_t | clip_i | temporal | retrieval |"
    assert table[2].startswith("| panda-dance | 4 | ") and table[2].endswith(" | 1 |")
    done = sorted(p.name for p in (out / "panda-dance" / ".done").iterdir())
    seconds = {p.stem: json.loads(p.read_text())["seconds"] for p in (out / "panda-dance" / ".done").iterdir()}
    print(f"step seconds: {seconds}")
    assert done == ["evaluate.json", "invert.json", "preprocess.json", "train.json"]


def test_relative_data_dir_gives_absolute_paths(small_data, tmp_path, monkeypatch):
    monkeypatch.chdir(small_data.parent)
    steps = rb.plan_case(rb.load_cases(Path("data"))[0], _args("data", "--out", "out", "--threestudio", "ts"))
    invert = steps[1].command
    assert invert[4] == str(small_data / "panda-dance" / "image.jpg")  # the steps run with cwd = OUT/<case>
    assert steps[1].cwd == small_data.parent / "out" / "panda-dance"
    (small_data.parent / "sd").mkdir()
    steps = rb.plan_case(rb.load_cases(Path("data"))[0], _args("data", "--sd-model", "sd", "--clip-model", "org/clip"))
    assert steps[1].command[-1] == str(small_data.parent / "sd")  # a local folder: absolute
    assert steps[3].command[steps[3].command.index("--clip-model") + 1] == "org/clip"  # a hub id: unchanged


def test_planned_commands_parse(small_data, tmp_path):
    """Every step command we would run is accepted by our own parser, with the options we meant."""
    argv = [str(small_data), "--out", str(tmp_path), "--threestudio", str(tmp_path), "--sd-model", "SD",
            "--invert-steps", "7", "--invert-batch-size", "2", "--invert-resolution", "64", "--depth-model", "D"]
    steps = rb.plan_case(rb.load_cases(small_data)[0], _args(*argv))
    parser = build_parser()
    prep, invert, evaluate = (parser.parse_args(s.command[3:]) for s in steps if s.name != "train")
    assert (prep.command, prep.size, prep.border_ratio, prep.depth_model, prep.overwrite) == (
        "preprocess", 512, 0.2, "D", True)
    assert (invert.token, invert.init, invert.steps, invert.batch_size, invert.resolution, invert.model) == (
        "_panda_dance_", "panda", 7, 2, 64, "SD")
    assert (evaluate.prompt, evaluate.frames_glob, evaluate.panel, evaluate.run_dir) == (
        "a panda is dancing", "threestudio/*/panda-dance/save/it*-test/front-over-time/*.png", "0",
        tmp_path.resolve() / "panda-dance")
    summary = parser.parse_args(rb._summary_command(_args(*argv))[3:])
    assert summary.batch == tmp_path.resolve() and summary.out == tmp_path.resolve()
