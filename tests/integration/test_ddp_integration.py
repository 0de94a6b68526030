"""Two-process DDP (CPU, gloo) through real threestudio: both ranks finish, stay identical, outputs written once."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from test_system_integration import StepRecorder, _config, _run

HERE = Path(__file__).resolve().parent


def test_two_rank_ddp_on_cpu(threestudio, tiny_models, example_rgba, tmp_path):
    rgba = example_rgba
    config = tmp_path / "ddp.yaml"
    config.write_text(_config(tiny_models, rgba, tmp_path, steps=(2, 2, 2)))
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run([sys.executable, str(HERE / "ddp_run.py"), str(config), str(tmp_path / "ranks"),
                           "--devices", "2"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stderr[-4000:]
    ranks = [json.loads((tmp_path / "ranks" / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["world_size"] for r in ranks] == [2, 2]
    assert [r["global_step"] for r in ranks] == [6, 6]
    # gradients are averaged: every parameter and the occupancy grid are bit-identical on both ranks
    assert ranks[0]["state"] == ranks[1]["state"]
    # ... while each rank trained on its own clips and cameras
    assert ranks[0]["clips"] != ranks[1]["clips"]
    # outputs are written once: one stages.json with the three stages, one validation video holding every frame
    trial = Path(ranks[0]["trial_dir"])
    # ... and the system's own DDP check, gathered from both ranks at train end, agrees
    check = json.loads((trial / "ddp_check.json").read_text())
    assert check["world_size"] == 2 and check["identical"] and check["differing"] == []
    assert len(set(check["model_fingerprint"])) == 1 and check["tensors"] > 10
    record = json.loads((trial / "stages.json").read_text())
    assert [r["stage"] for r in record["stages"]] == ["static", "dynamic", "refine"]
    save = trial / "save"
    videos = sorted(p.name for p in save.glob("it6-val.*"))
    assert len(videos) == 1, videos
    frames = sorted(int(p.stem) for p in (save / "it6-val").glob("*.png"))
    assert frames == [0, 1, 2, 3], frames  # 4 validation frames, rendered 2 per rank

    # a 2-rank checkpoint resumes in one process, in the right stage at the right step
    ckpt = sorted((trial / "ckpts").glob("epoch=*step=3*.ckpt"))
    assert ckpt, sorted(p.name for p in (trial / "ckpts").iterdir())
    rec = StepRecorder()
    _run(threestudio, config.read_text(), tmp_path, resume=str(ckpt[0]), max_steps=5, callbacks=[rec])
    assert [(s["step"], s["stage"]) for s in rec.steps] == [(3, "dynamic"), (4, "refine")]


def test_clip_seed_rank_is_global_across_machines(threestudio, monkeypatch):
    """A run over several machines: the clip stream is seeded by the GLOBAL rank (the trainer's, else RANK, then
    SLURM_PROCID), so process 0 of the second machine does not repeat process 0 of the first (a LOCAL_RANK seed did)."""
    from types import SimpleNamespace

    from animate124.components.data import _global_rank

    for name in ("RANK", "SLURM_PROCID", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    assert _global_rank(None) == 0
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("SLURM_PROCID", "5")
    assert _global_rank(None) == 5
    monkeypatch.setenv("RANK", "3")
    assert _global_rank(None) == 3
    assert _global_rank(SimpleNamespace(global_rank=7)) == 7  # the trainer's rank wins once it is attached
