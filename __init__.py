"""threestudio-animate124: loaded by threestudio's ``launch.py`` from ``custom/threestudio-animate124``.

This file only checks the host version and imports the components so every ``a124-*`` name registers (and the
test-only oracle guidances and the smoke config's resolver from ``animate124/testing``). The registrations themselves
live in those modules (never here: launch.py re-executes this file).
"""
import os
import sys

import threestudio
from packaging.version import Version

MIN_THREESTUDIO = "0.2.0"
if Version(getattr(threestudio, "__version__", "0.0.0")) < Version(MIN_THREESTUDIO):
    raise ValueError(
        f"threestudio-animate124 needs threestudio >= {MIN_THREESTUDIO}, found "
        f"{getattr(threestudio, '__version__', 'unknown (no __version__)')}: update your threestudio checkout (git pull)."
    )

try:
    import animate124  # noqa: F401  (installed with `pip install -e .` or install.sh)
except ImportError:
    # Not pip-installed: the package sits next to this file.
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import animate124.components  # noqa: E402,F401  (registers every a124-* name)
import animate124.testing.oracle_guidance  # noqa: E402,F401  (the test-only oracle guidances of animate124-oracle.yaml)
from animate124.testing.smoke_assets import register_smoke_resolver  # noqa: E402

register_smoke_resolver()  # ${a124_smoke_assets:DIR} of the smoke config: makes its tiny models on first use
