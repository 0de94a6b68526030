"""Score rendered videos with CLIP: CLIP-T, CLIP-I, temporal consistency and (batch mode) retrieval accuracy.

Run folder layout (one generated result):
  RUN_DIR/run.json   {"prompt": "a panda is dancing",        the motion text (CLIP-T, retrieval)
                      "image": "ref.png",                     reference image, relative to RUN_DIR or absolute
                      "frames": "out/*/save/it*-test/front-over-time/*.png",   optional glob (RUN_DIR-relative)
                      "panel": "0"}                           optional, see --panel
  (relative paths in run.json and --frames-glob are relative to RUN_DIR; --image to the current folder)
  RUN_DIR/frames/*.png | *.jpg   or   RUN_DIR/*.mp4 | *.gif   the frames, when run.json has no "frames"
--image / --prompt / --frames-glob / --panel override run.json (no run.json is needed when image and prompt are given).
Image frames are read in natural order (2.png before 10.png); if they lie in several folders only the last folder in
natural order is used (e.g. it15000-test/ over it5000-test/). A glob that matches videos uses the last video in
natural order (e.g. it15000-test.mp4); all of its frames are used. RGBA images (reference or frames) are composited
on white. --panel K keeps the K-th (0-based) of the side-by-side panels of each frame, assuming square panels
(threestudio's [rgb | normal | opacity] grids); --panel K/N splits the width into N equal panels.

Metrics (image and text embeddings are L2-normalised CLIP projections):
  clip_t     mean over frames of cos(frame, prompt)
  clip_i     mean over frames of cos(frame, reference image)
  temporal   mean over consecutive frame pairs of cos(frame_k, frame_k+1)   (1 for a still video)
  retrieval  batch mode only: 1 when the run's own prompt scores strictly higher (mean frame-text cosine) than
             every other distinct prompt of the batch, else 0; the table's mean row gives the accuracy

Single mode writes RUN_DIR/metrics.csv and metrics.md; batch mode (--batch RUNS_DIR: every sub-folder holding
run.json is one run) writes RUNS_DIR/metrics.csv and metrics.md with one row per run and a mean row. --out changes
the folder. Existing metrics files are kept unless --overwrite.
"""

from __future__ import annotations

import argparse
import csv
import glob
import io
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from animate124.core.io.atomic_io import write_text
from animate124.tools.cli import ToolError, check_out_folder, natural_key

__all__ = [
    "DEFAULT_CLIP_MODEL",
    "RunSpec",
    "ClipScorer",
    "load_run",
    "read_frames",
    "run_metrics",
    "retrieval_hits",
    "evaluate_runs",
    "format_tables",
    "add_arguments",
    "run",
]

DEFAULT_CLIP_MODEL = "openai/clip-vit-large-patch14"
METRIC_COLUMNS = ("clip_t", "clip_i", "temporal", "retrieval")
_IMAGE_EXT = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
_VIDEO_EXT = (".mp4", ".gif", ".webm", ".mov", ".avi")
_DEFAULT_GLOBS = ("frames/*.png", "frames/*.jpg", "*.mp4", "*.gif")


@dataclass
class RunSpec:
    """One run to score: its name, motion text, reference image and frame files (images or one video)."""

    name: str
    prompt: str
    image: Path
    frames: list[Path]
    panel: str | None = None


class ClipScorer:
    """L2-normalised CLIP image and text embeddings from a transformers CLIPModel + CLIPProcessor."""

    def __init__(self, model_id: str = DEFAULT_CLIP_MODEL, device: str = "cpu", batch_size: int = 32):
        from transformers import CLIPModel, CLIPProcessor

        try:
            self.processor = CLIPProcessor.from_pretrained(model_id)
            self.model = CLIPModel.from_pretrained(model_id).to(device).eval()
        except (OSError, ValueError) as error:
            raise ToolError(
                f"could not load CLIP --clip-model {model_id!r} ({type(error).__name__}): give a local folder "
                "saved with save_pretrained (model + processor) or allow the download once"
            ) from error
        self.device, self.batch_size = device, batch_size

    def images(self, images: Sequence) -> "torch.Tensor":  # noqa: F821
        """(N, D) unit-norm embeddings of N images (PIL or (H, W, 3) uint8 arrays)."""
        import torch

        chunks = []
        for start in range(0, len(images), self.batch_size):
            inputs = self.processor(images=list(images[start : start + self.batch_size]), return_tensors="pt")
            with torch.no_grad():
                chunks.append(_features(self.model.get_image_features(pixel_values=inputs["pixel_values"].to(
                    self.device, self.model.dtype))))
        return _unit(torch.cat(chunks))

    def texts(self, texts: Sequence[str]) -> "torch.Tensor":  # noqa: F821
        """(M, D) unit-norm embeddings of M texts (truncated to CLIP's 77 tokens)."""
        import torch

        inputs = self.processor(text=list(texts), return_tensors="pt", padding=True, truncation=True)
        with torch.no_grad():
            features = self.model.get_text_features(
                input_ids=inputs["input_ids"].to(self.device), attention_mask=inputs["attention_mask"].to(self.device)
            )
        return _unit(_features(features))


def load_run(
    run_dir: Path,
    image: Path | None = None,
    prompt: str | None = None,
    frames_glob: str | None = None,
    panel: str | None = None,
) -> RunSpec:
    """Read RUN_DIR/run.json (if any), apply the overrides and resolve the frame files."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ToolError(f"run folder {str(run_dir)!r} does not exist: give a folder holding frames and run.json")
    meta = {}
    if (run_dir / "run.json").is_file():
        try:
            meta = json.loads((run_dir / "run.json").read_text())
        except json.JSONDecodeError as error:
            raise ToolError(f"{run_dir / 'run.json'} is not valid JSON ({error}): fix or remove it") from error
    prompt = prompt if prompt is not None else meta.get("prompt")
    image = image if image is not None else meta.get("image")
    if not prompt or not image:
        missing = " and ".join(k for k, v in (("prompt", prompt), ("image", image)) if not v)
        raise ToolError(f"run {str(run_dir)!r} has no {missing}: pass --prompt/--image or add them to run.json")
    image = Path(image) if Path(image).is_absolute() else run_dir / image
    if not image.is_file():
        raise ToolError(f"reference image {str(image)!r} of run {run_dir.name!r} does not exist: fix --image/run.json")
    pattern = frames_glob or meta.get("frames")
    panel = panel if panel is not None else meta.get("panel")
    if panel is not None:
        panel = str(panel)
        _parse_panel(panel)
    return RunSpec(run_dir.name, str(prompt), image, _find_frames(run_dir, pattern), panel)


def read_frames(paths: Sequence[Path], max_frames: int = 0, panel: str | None = None) -> list:
    """Frames as (H, W, 3) uint8 arrays: every image file, or every frame of one video (imageio); see --panel."""
    import numpy as np

    if len(paths) == 1 and paths[0].suffix.lower() in _VIDEO_EXT:
        import imageio.v3 as iio

        try:
            frames = [_rgb(np.array(f)) for f in iio.imiter(paths[0])]
        except Exception as error:  # imageio raises many types for unreadable or codec-less files
            raise ToolError(
                f"could not read video {str(paths[0])!r} ({type(error).__name__}: {error}): "
                'pip install "imageio[ffmpeg]" or pass image frames with --frames-glob'
            ) from error
    else:
        frames = [_load_rgb(p) for p in paths]
    if not frames:
        raise ToolError(f"no frames could be read from {paths[0] if paths else 'nothing'}")
    if panel is not None:
        frames = [_crop_panel(f, *_parse_panel(panel)) for f in frames]
    if max_frames and len(frames) > max_frames:
        keep = np.linspace(0, len(frames) - 1, max_frames).round().astype(int)
        frames = [frames[i] for i in keep]
    return frames


def run_metrics(frames: "torch.Tensor", reference: "torch.Tensor", text: "torch.Tensor") -> dict[str, float]:
    """CLIP-T, CLIP-I and temporal consistency from unit-norm embeddings.

    Args:
        frames: (T, D) frame embeddings; reference: (D,) or (1, D) image embedding; text: (D,) or (1, D).
    """
    clip_t = (frames @ text.reshape(-1)).mean()
    clip_i = (frames @ reference.reshape(-1)).mean()
    temporal = (frames[:-1] * frames[1:]).sum(-1).mean() if frames.shape[0] > 1 else frames.new_tensor(1.0)
    return {"clip_t": float(clip_t), "clip_i": float(clip_i), "temporal": float(temporal)}


def retrieval_hits(similarity: "torch.Tensor", prompts: Sequence[str]) -> list[int]:
    """1 where run r's own prompt scores strictly above every other distinct prompt, else 0.

    Args:
        similarity: (R, R) with [r, c] = mean over run r's frames of cos(frame, prompt c).
        prompts: the R prompts; identical prompts are not counted as competitors of each other.
    """
    hits = []
    for r in range(similarity.shape[0]):
        rivals = [c for c in range(similarity.shape[1]) if prompts[c] != prompts[r]]
        best_rival = max((float(similarity[r, c]) for c in rivals), default=float("-inf"))
        hits.append(int(float(similarity[r, r]) > best_rival))
    return hits


def evaluate_runs(
    runs: Sequence[RunSpec], scorer: ClipScorer, max_frames: int = 0, retrieval: bool = True, progress: bool = True
) -> list[dict]:
    """Score every run; one dict per run with name, frames, clip_t, clip_i, temporal (and retrieval)."""
    import torch
    from tqdm import tqdm

    rows, frame_embeddings = [], []
    texts = scorer.texts([r.prompt for r in runs])
    for spec, text in tqdm(list(zip(runs, texts, strict=True)), desc="evaluate", unit="run", disable=not progress):
        frames = scorer.images(read_frames(spec.frames, max_frames, spec.panel))
        reference = scorer.images([_load_rgb(spec.image)])
        rows.append({"run": spec.name, "frames": frames.shape[0], **run_metrics(frames, reference, text)})
        frame_embeddings.append(frames)
    if retrieval:
        similarity = torch.stack([(f @ texts.T).mean(0) for f in frame_embeddings])  # (R, R)
        for row, hit in zip(rows, retrieval_hits(similarity, [r.prompt for r in runs]), strict=True):
            row["retrieval"] = hit
    return rows


def format_tables(rows: Sequence[dict]) -> tuple[str, str]:
    """(CSV text, Markdown text) with one line per run and a final "mean" line."""
    columns = ["run", "frames"] + [c for c in METRIC_COLUMNS if any(c in r for r in rows)]
    mean = {"run": "mean", "frames": sum(r["frames"] for r in rows)}
    for c in columns[2:]:
        mean[c] = sum(float(r[c]) for r in rows) / len(rows)
    table = list(rows) + [mean]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n", extrasaction="ignore")
    writer.writeheader()
    for row in table:
        writer.writerow({k: (f"{row[k]:.6f}" if isinstance(row[k], float) else row[k]) for k in columns})
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join(["---"] + ["---:"] * (len(columns) - 1)) + "|"]
    for row in table:
        cells = [f"{row[k]:.4f}" if isinstance(row[k], float) else str(row[k]) for k in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return buffer.getvalue(), "\n".join(lines) + "\n"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", nargs="?", type=Path, metavar="RUN_DIR", help="one run folder (see layout above)")
    parser.add_argument("--batch", type=Path, metavar="RUNS_DIR", help="score every sub-folder with run.json")
    parser.add_argument("--image", type=Path, help="reference image (overrides run.json)")
    parser.add_argument("--prompt", help="motion text (overrides run.json)")
    parser.add_argument("--frames-glob", help="frames to score, relative to RUN_DIR (overrides run.json)")
    parser.add_argument(
        "--clip-model", default=DEFAULT_CLIP_MODEL, help=f"CLIP hub id or local folder (default {DEFAULT_CLIP_MODEL})"
    )
    parser.add_argument("--panel", help="K or K/N: keep one side-by-side panel of each frame (e.g. 0 = the RGB)")
    parser.add_argument("--max-frames", type=int, default=0, help="score at most N evenly spaced frames (0 = all)")
    parser.add_argument("--out", type=Path, help="folder for metrics.csv/metrics.md (default RUN_DIR or RUNS_DIR)")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--overwrite", action="store_true", help="replace existing metrics files")


def run(args: argparse.Namespace) -> int:
    import torch

    if (args.run_dir is None) == (args.batch is None):
        raise ToolError("give either RUN_DIR (one run) or --batch RUNS_DIR (a folder of runs), not both or neither")
    if args.max_frames < 0:
        raise ToolError(f"--max-frames {args.max_frames} must be >= 0 (0 = all frames)")
    if args.batch is not None:
        if not args.batch.is_dir():
            raise ToolError(f"--batch {str(args.batch)!r} is not a folder: give the folder that holds the run folders")
        if args.image or args.prompt:
            raise ToolError("--image/--prompt apply to one run: in --batch mode put them in each run's run.json")
        folders = sorted((d for d in args.batch.iterdir() if (d / "run.json").is_file()), key=natural_key)
        if not folders:
            raise ToolError(f"no run folder with run.json under {str(args.batch)!r}: see the layout in --help")
        specs = [load_run(d, frames_glob=args.frames_glob, panel=args.panel) for d in folders]
    else:
        image = args.image.resolve() if args.image is not None else None  # the user's path: relative to the cwd
        specs = [load_run(args.run_dir, image, args.prompt, args.frames_glob, args.panel)]
    out = args.out or (args.batch if args.batch is not None else args.run_dir)
    check_out_folder(out, ["metrics.csv", "metrics.md"], args.overwrite)  # --out a file: fails before scoring
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    scorer = ClipScorer(args.clip_model, device)
    rows = evaluate_runs(specs, scorer, args.max_frames, retrieval=args.batch is not None)
    csv_text, md_text = format_tables(rows)
    out.mkdir(parents=True, exist_ok=True)
    write_text(out / "metrics.csv", csv_text)
    write_text(out / "metrics.md", md_text)
    print(md_text, end="")
    print(f"wrote {out / 'metrics.csv'} and {out / 'metrics.md'}")
    return 0


def _find_frames(run_dir: Path, pattern: str | None) -> list[Path]:
    patterns = [pattern] if pattern else list(_DEFAULT_GLOBS)
    for p in patterns:
        full = p if Path(p).is_absolute() else str(run_dir / p)
        matches = sorted((Path(m) for m in glob.glob(full) if Path(m).is_file()), key=natural_key)
        videos = [m for m in matches if m.suffix.lower() in _VIDEO_EXT]
        images = [m for m in matches if m.suffix.lower() in _IMAGE_EXT]
        if videos:
            return [videos[-1]]
        if images:
            last = max((m.parent for m in images), key=natural_key)
            return [m for m in images if m.parent == last]
    raise ToolError(
        f"no frames in run {str(run_dir)!r} (looked for {', '.join(patterns)}): pass --frames-glob or set \"frames\" "
        "in run.json"
    )


def _parse_panel(spec: str) -> tuple[int, int | None]:
    match = re.fullmatch(r"(\d+)(?:/(\d+))?", spec.strip())
    if not match or (match.group(2) and int(match.group(1)) >= int(match.group(2))):
        raise ToolError(f"--panel {spec!r} is not valid: use K (square panels) or K/N with 0 <= K < N, e.g. --panel 0")
    return int(match.group(1)), int(match.group(2)) if match.group(2) else None


def _crop_panel(frame, k: int, n: int | None):
    height, width = frame.shape[:2]
    panel_width = width // n if n else height
    if (k + 1) * panel_width > width:
        raise ToolError(f"--panel {k}: a {width}x{height} frame has only {width // panel_width} panel(s)")
    return frame[:, k * panel_width : (k + 1) * panel_width]


def _load_rgb(path: Path):
    import numpy as np
    from PIL import Image

    return _rgb(np.array(Image.open(path).convert("RGBA")))


def _rgb(array):
    """(H, W[, C]) uint8 -> (H, W, 3) uint8; RGBA composited on white, grey repeated."""
    import numpy as np

    if array.ndim == 2:
        return np.repeat(array[..., None], 3, axis=2)
    if array.shape[2] == 4:
        alpha = array[..., 3:].astype(np.float32) / 255.0
        return (array[..., :3] * alpha + 255.0 * (1.0 - alpha)).round().astype(np.uint8)
    return np.ascontiguousarray(array[..., :3])


def _features(output):
    """transformers >= 5 returns a model output (projected features in pooler_output); older versions a tensor."""
    return output if hasattr(output, "shape") else output.pooler_output


def _unit(x):
    return x.float() / x.float().norm(dim=-1, keepdim=True).clamp_min(1e-12)
