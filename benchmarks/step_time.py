"""Step time per stage against the diffusion floor, peak VRAM and the projected run time of a config.

The script form of ``animate124 benchmark`` (see ``animate124/tools/benchmark_steps.py``), run from a threestudio
checkout or with ``THREESTUDIO_ROOT`` set:

    python benchmarks/step_time.py configs/animate124.yaml --models /tmp/a124-full --out bench.json

Random weights: honest for time and memory, never for quality.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from animate124.tools.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["benchmark", *sys.argv[1:]]))
