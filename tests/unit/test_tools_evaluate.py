"""`animate124 evaluate`: CLIP-T / CLIP-I / temporal consistency / retrieval with a tiny random CLIP.

Expected values come from the CLIPModel's own forward (text_embeds, image_embeds), not from the tool's code path.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import SHARED_DATA
from PIL import Image

from animate124.tools import evaluate
from animate124.tools.cli import ToolError, main

SHARED = SHARED_DATA  # conftest: ../shared/data or $A124_SHARED_DATA
pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory) -> Path:
    from animate124.testing.tiny_models import make_tiny_models

    return make_tiny_models(tmp_path_factory.mktemp("tiny"), kinds=["clip"])["clip"]


@pytest.fixture(scope="module")
def images() -> dict[str, np.ndarray]:
    """Two real photos at 48 x 48 (uint8 RGB)."""
    out = {}
    for name in ("panda-dance", "fox-game"):
        path = SHARED / "examples" / name / "image.jpg"
        if not path.exists():
            pytest.skip(f"reference data {path} is missing")
        out[name] = np.array(Image.open(path).convert("RGB").resize((48, 48), Image.Resampling.BICUBIC))
    return out


def _reference_embeddings(clip_dir: Path, texts, pictures):
    """Unit text and image embeddings straight from CLIPModel.forward."""
    from transformers import CLIPModel, CLIPProcessor

    model, processor = CLIPModel.from_pretrained(clip_dir).eval(), CLIPProcessor.from_pretrained(clip_dir)
    inputs = processor(text=list(texts), images=list(pictures), return_tensors="pt", padding=True)
    with torch.no_grad():
        out = model(**inputs)
    return out.text_embeds, out.image_embeds


def _make_run(folder: Path, picture: np.ndarray, prompt: str, n_frames: int = 3) -> Path:
    (folder / "frames").mkdir(parents=True)
    Image.fromarray(picture).save(folder / "ref.png")
    for i in range(n_frames):
        Image.fromarray(picture).save(folder / "frames" / f"{i}.png")
    (folder / "run.json").write_text(json.dumps({"prompt": prompt, "image": "ref.png"}))
    return folder


def _read_csv(path: Path) -> list[dict]:
    with open(path) as handle:
        return list(csv.DictReader(handle))


def test_frames_equal_to_reference_score_one(tiny_clip, images, tmp_path):
    run = _make_run(tmp_path / "run", images["panda-dance"], "a panda is dancing")
    assert main(["evaluate", str(run), "--clip-model", str(tiny_clip), "--device", "cpu"]) == 0
    rows = _read_csv(run / "metrics.csv")
    assert [r["run"] for r in rows] == ["run", "mean"] and rows[0]["frames"] == "3"
    assert abs(float(rows[0]["clip_i"]) - 1.0) < 1e-5
    assert abs(float(rows[0]["temporal"]) - 1.0) < 1e-5
    text, image = _reference_embeddings(tiny_clip, ["a panda is dancing"], [images["panda-dance"]])
    assert abs(float(rows[0]["clip_t"]) - float(text[0] @ image[0])) < 1e-5
    assert "retrieval" not in rows[0]  # single mode has no batch to rank against
    md = (run / "metrics.md").read_text().splitlines()
    assert md[0] == "| run | frames | clip_t | clip_i | temporal |"
    assert md[2].startswith("| run | 3 | ") and md[2].endswith(" | 1.0000 | 1.0000 |")


def _batch_rows(batch: Path, tiny_clip: Path, images, panda_caption: str, fox_caption: str) -> dict[str, dict]:
    """Evaluate a batch of two 2-frame runs (panda, fox photos) with these captions; the metrics.csv rows by run."""
    _make_run(batch / "panda", images["panda-dance"], panda_caption, n_frames=2)
    _make_run(batch / "fox", images["fox-game"], fox_caption, n_frames=2)
    assert main(["evaluate", "--batch", str(batch), "--clip-model", str(tiny_clip), "--device", "cpu"]) == 0
    return {r["run"]: r for r in _read_csv(batch / "metrics.csv")}


def test_retrieval_ranks_own_caption_first_when_embeddings_allow(tiny_clip, images, tmp_path):
    # 1. pick two captions such that each photo is closer to its own one (so retrieval MUST be 1 for both)
    pool = [e["caption"] for e in json.loads((SHARED / "benchmark" / "benchmark.json").read_text())]
    text, image = _reference_embeddings(tiny_clip, pool, [images["panda-dance"], images["fox-game"]])
    sim = (image @ text.T).numpy()  # (2, 24)
    pairs = [(a, b) for a in range(len(pool)) for b in range(len(pool))
             if a != b and sim[0, a] - sim[0, b] > 1e-3 and sim[1, b] - sim[1, a] > 1e-3]
    assert pairs, "no caption pair separates the two photos under this tiny CLIP"
    a, b = pairs[0]
    rows = _batch_rows(tmp_path / "batch", tiny_clip, images, pool[a], pool[b])
    assert rows["panda"]["retrieval"] == "1" and rows["fox"]["retrieval"] == "1"
    assert float(rows["mean"]["retrieval"]) == 1.0
    assert abs(float(rows["fox"]["clip_t"]) - sim[1, b]) < 1e-5
    # 2. swap the captions: now each run's own caption MUST rank below the other one
    swapped = tmp_path / "swapped"
    rows = _batch_rows(swapped, tiny_clip, images, pool[b], pool[a])
    assert rows["panda"]["retrieval"] == "0" and rows["fox"]["retrieval"] == "0"
    md = (swapped / "metrics.md").read_text()
    assert md.splitlines()[0] == "| run | frames | clip_t | clip_i | temporal | retrieval |"
    assert "| mean | 4 |" in md and md.rstrip().endswith("| 0.0000 |")


def test_retrieval_hits_hand_computed():
    sim = torch.tensor([[0.9, 0.2, 0.3], [0.5, 0.4, 0.1], [0.2, 0.2, 0.2]])
    # run 0: 0.9 beats 0.2, 0.3; run 1: 0.4 loses to 0.5; run 2: a tie is not a first place
    assert evaluate.retrieval_hits(sim, ["a", "b", "c"]) == [1, 0, 0]
    # identical prompts are not rivals of each other: run 1 and run 2 share "b"
    assert evaluate.retrieval_hits(torch.tensor([[0.9, 0.1, 0.1], [0.1, 0.3, 0.5], [0.1, 0.5, 0.3]]),
                                   ["a", "b", "b"]) == [1, 1, 1]


def test_run_metrics_hand_computed():
    frames = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
    out = evaluate.run_metrics(frames, torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0]))
    assert out["clip_i"] == pytest.approx((1.0 + 0.0 + 0.6) / 3)
    assert out["clip_t"] == pytest.approx((0.0 + 1.0 + 0.8) / 3)
    assert out["temporal"] == pytest.approx((0.0 + 0.8) / 2)


def test_video_input(tiny_clip, images, tmp_path):
    import imageio.v3 as iio

    run = tmp_path / "video_run"
    run.mkdir()
    Image.fromarray(images["fox-game"]).save(run / "ref.png")
    frames = np.stack([images["fox-game"]] * 5)
    try:
        iio.imwrite(run / "it100-test.mp4", frames, fps=5)
    except Exception as error:  # no ffmpeg plugin: say so rather than fail
        pytest.skip(f"cannot write mp4 here ({error})")
    (run / "older").mkdir()
    assert main(["evaluate", str(run), "--image", str(run / "ref.png"), "--prompt", "a fox", "--clip-model",
                 str(tiny_clip), "--device", "cpu"]) == 0
    row = _read_csv(run / "metrics.csv")[0]
    assert row["frames"] == "5"
    assert float(row["temporal"]) > 0.999  # five identical (lossy-coded) frames
    assert float(row["clip_i"]) > 0.9


def test_frame_discovery_and_errors(tmp_path, capsys):
    run = tmp_path / "r"
    (run / "frames").mkdir(parents=True)
    for i in (10, 2, 1):
        Image.new("RGB", (8, 8)).save(run / "frames" / f"{i}.png")
    Image.new("RGB", (8, 8)).save(run / "ref.png")
    spec = evaluate.load_run(run, image=Path("ref.png"), prompt="x")
    assert [p.name for p in spec.frames] == ["1.png", "2.png", "10.png"]  # natural order
    for name in ("it1000-test.mp4", "it15000-test.mp4", "it2000-test.mp4"):
        (run / name).write_bytes(b"")
    assert [p.name for p in evaluate.load_run(run, Path("ref.png"), "x", "*.mp4").frames] == ["it15000-test.mp4"]
    with pytest.raises(ToolError, match="no prompt"):
        evaluate.load_run(run, image=Path("ref.png"))
    with pytest.raises(ToolError, match="no frames"):
        evaluate.load_run(run, Path("ref.png"), "x", "nothing/*.png")
    assert main(["evaluate", str(run), "--batch", str(tmp_path)]) == 1
    assert "not both" in capsys.readouterr().err
    assert main(["evaluate", "--batch", str(tmp_path)]) == 1
    assert "no run folder with run.json" in capsys.readouterr().err


def test_panel_crop_keeps_the_rgb_of_a_grid(tiny_clip, images, tmp_path):
    # threestudio-style test frames: [rgb | normal | opacity] side by side, in it<step>-test/<trajectory>/<i>.png
    picture = images["panda-dance"]
    rng = np.random.default_rng(0)
    run = tmp_path / "grid_run"
    for step in ("it5-test", "it20-test"):
        (run / step / "front").mkdir(parents=True)
        for i in range(2):
            noise = rng.integers(0, 255, (48, 96, 3), dtype=np.uint8)
            Image.fromarray(np.concatenate([picture, noise], axis=1)).save(run / step / "front" / f"{i}.png")
    Image.fromarray(picture).save(run / "ref.png")
    spec = evaluate.load_run(run, Path("ref.png"), "a panda", "it*-test/front/*.png", panel="0")
    assert [p.parent.parent.name for p in spec.frames] == ["it20-test", "it20-test"]  # only the last folder
    assert main(["evaluate", str(run), "--image", str(run / "ref.png"), "--prompt", "a panda", "--frames-glob",
                 "it*-test/front/*.png", "--panel", "0", "--clip-model", str(tiny_clip), "--device", "cpu"]) == 0
    assert abs(float(_read_csv(run / "metrics.csv")[0]["clip_i"]) - 1.0) < 1e-5
    crops = evaluate.read_frames(spec.frames, panel="1/3")
    assert crops[0].shape == (48, 48, 3) and not np.array_equal(crops[0], picture)
    with pytest.raises(ToolError, match="--panel '3/3' is not valid"):
        evaluate.load_run(run, Path("ref.png"), "a panda", "it*-test/front/*.png", panel="3/3")
    with pytest.raises(ToolError, match="has only 3 panel"):
        evaluate.read_frames(spec.frames, panel="3")


def test_clip_scores_agree_with_torchmetrics_clipscore(tiny_clip, images):
    """Kept ours: torchmetrics' CLIPScore returns only max(100 * mean cos, 0) over matched pairs, so it
    re-encodes the prompt / reference once per frame, cannot give the frame x prompt matrix retrieval needs, loads a
    local folder only through a callable, and (1.9) breaks on transformers 5. On the same inputs its numbers are ours
    x 100 (clamped at 0)."""
    tm_clip = pytest.importorskip("torchmetrics.multimodal.clip_score")
    from torchmetrics.functional.multimodal import clip_score
    from transformers import CLIPModel, CLIPProcessor

    model, processor = CLIPModel.from_pretrained(tiny_clip).eval(), CLIPProcessor.from_pretrained(tiny_clip)
    # torchmetrics 1.9 expects the tensors transformers < 5 returned; 5.x returns model outputs (another reason)
    for name in ("get_image_features", "get_text_features"):
        setattr(model, name, lambda *a, _get=getattr(model, name), **k: evaluate._features(_get(*a, **k)))
    metric = tm_clip.CLIPScore(model_name_or_path=lambda: (model, processor))
    scorer = evaluate.ClipScorer(str(tiny_clip), "cpu")
    frames = [images["panda-dance"], images["fox-game"], images["panda-dance"][::-1].copy()]
    prompt = "a panda is dancing"
    ours = evaluate.run_metrics(scorer.images(frames), scorer.images([images["fox-game"]]), scorer.texts([prompt]))
    tensors = [torch.from_numpy(f).permute(2, 0, 1) for f in frames]
    reference = torch.from_numpy(images["fox-game"]).permute(2, 0, 1)
    pairs = {"clip_t": (tensors, [prompt] * 3), "clip_i": (tensors, [reference] * 3),
             "temporal": (tensors[:-1], tensors[1:])}
    for name, (source, target) in pairs.items():
        theirs = float(clip_score(source, target, model_name_or_path=lambda: (model, processor)))
        assert theirs == pytest.approx(max(100 * ours[name], 0.0), abs=1e-3), name
    metric.update(tensors, [prompt] * 3)
    assert float(metric.compute()) == pytest.approx(max(100 * ours["clip_t"], 0.0), abs=1e-3)
