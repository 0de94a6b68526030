"""Step time per stage against the diffusion floor, peak VRAM and the projected run time of a config (JSON out).

Run from a threestudio checkout (or with ``THREESTUDIO_ROOT`` set); ``animate124 benchmark`` is the same command:

    python custom/threestudio-animate124/benchmarks/step_time.py CONFIG --models /tmp/a124-full --out bench.json

Random weights: honest for time and memory, never for quality. ``--help`` lists the options.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the step_benchmark package beside this file

if __name__ == "__main__":
    from animate124.tools.cli import main

    sys.exit(main(["benchmark", *sys.argv[1:]]))
