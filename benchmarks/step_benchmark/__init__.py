"""``animate124 benchmark``: whole training steps of a config timed per stage against their diffusion floor, peak
memory, and the projected run time (``cli`` has the full description). Lives outside the installed package: it is
measuring equipment, imported with ``benchmarks/`` on ``sys.path`` (``benchmarks/step_time.py`` does that)."""

NOTE = "random weights: honest for time and memory, never for quality"
