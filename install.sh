#!/usr/bin/env bash
# Install threestudio-animate124 into a threestudio checkout.
#
#   bash install.sh PATH_TO_THREESTUDIO
#
# 1. pip-installs this package and its Python dependencies into the active environment (PyPI only; no git clones);
# 2. links this repo to PATH_TO_THREESTUDIO/custom/threestudio-animate124 unless it is already there;
# 3. checks that threestudio imports and that every a124-* component registers through launch.py's own loader.
# Safe to run again. Never replaces a folder it did not make.
set -u -o pipefail

die() { echo "install.sh: $*" >&2; exit 1; }

[ $# -eq 1 ] || die "usage: bash install.sh PATH_TO_THREESTUDIO (the folder that holds launch.py)"
TS=$(cd "$1" 2>/dev/null && pwd -P) || die "no such folder: $1 (give the path of your threestudio checkout)"
[ -f "$TS/launch.py" ] && [ -f "$TS/threestudio/__init__.py" ] \
  || die "$TS is not a threestudio checkout (no launch.py / threestudio/__init__.py): clone threestudio first"
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd -P)
PY=${PYTHON:-python}
command -v "$PY" >/dev/null || PY=python3
"$PY" -m pip --version >/dev/null 2>&1 || die "no pip for '$PY': activate the environment you run threestudio in"

echo "[1/3] installing Python dependencies into $("$PY" -c 'import sys; print(sys.prefix)')"
"$PY" -m pip install -q -e "$HERE" \
  || die "pip install failed (output above): check your network/PyPI access, then run install.sh again"

echo "[2/3] linking the extension into $TS/custom"
DEST="$TS/custom/threestudio-animate124"
mkdir -p "$TS/custom"
if [ -e "$DEST" ] || [ -L "$DEST" ]; then
  if [ "$(cd "$DEST" 2>/dev/null && pwd -P)" = "$HERE" ]; then
    echo "      already there: $DEST"
  else
    die "$DEST exists and is not this checkout: move it away (or run install.sh from that copy)"
  fi
else
  ln -s "$HERE" "$DEST" || die "could not link $DEST: check write permission on $TS/custom"
  echo "      linked $DEST -> $HERE"
fi

echo "[3/3] checking that threestudio loads the extension"
cd "$TS" && "$PY" - <<'PYEOF' || exit 1
import importlib.util, io, os, sys, contextlib, warnings
warnings.filterwarnings("ignore")
sys.path.insert(0, os.getcwd())
try:
    import threestudio
except ModuleNotFoundError as e:
    hints = {
        "tinycudann": "install tiny-cuda-nn's torch bindings (see threestudio's README, 'Installation')",
        "nvdiffrast": "install nvdiffrast (see threestudio's README, 'Installation')",
        "igl": "pip install libigl==2.5.1",
    }
    print(f"install.sh: threestudio does not import: {e}. Fix: {hints.get(e.name, 'pip install ' + str(e.name))}",
          file=sys.stderr)
    sys.exit(1)
except ImportError as e:
    fix = "pip install libigl==2.5.1" if "igl" in str(e) else "see threestudio's requirements.txt"
    print(f"install.sh: threestudio does not import: {e}. Fix: {fix}", file=sys.stderr)
    sys.exit(1)
spec = importlib.util.spec_from_file_location("threestudio_launch", "launch.py")
launch = importlib.util.module_from_spec(spec)
spec.loader.exec_module(launch)
log = io.StringIO()
with contextlib.redirect_stdout(log):
    ok = launch.load_custom_module(os.path.join("custom", "threestudio-animate124"))
if not ok:
    print(log.getvalue(), file=sys.stderr)
    print("install.sh: launch.py could not import the extension (traceback above)", file=sys.stderr)
    sys.exit(1)
from animate124.components import REGISTERED_NAMES
missing = [n for n in REGISTERED_NAMES if n not in threestudio.__modules__]
if missing:
    print(f"install.sh: these components did not register: {', '.join(missing)}", file=sys.stderr)
    sys.exit(1)
print(f"      threestudio {threestudio.__version__}: {len(REGISTERED_NAMES)} a124-* components registered")
PYEOF
echo "done. Run: cd $TS && python launch.py --config custom/threestudio-animate124/configs/animate124.yaml --train --gpu 0"
