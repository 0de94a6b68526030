#!/usr/bin/env bash
# Install threestudio-animate124 into a threestudio checkout.
#
#   bash install.sh PATH_TO_THREESTUDIO
#
# 1. pip-installs this package and its Python dependencies into the active environment (PyPI only; no git clones);
# 2. links this repo to PATH_TO_THREESTUDIO/custom/threestudio-animate124 unless it is already there;
# 3. checks, in one pass, every package threestudio and our components import (all missing ones listed at once, with
#    the pip names), the versions against those CI tests, and that every a124-* component registers through
#    launch.py's own loader.
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

[ -n "${VIRTUAL_ENV:-}${CONDA_PREFIX:-}" ] || echo "install.sh: note: no virtualenv or conda environment is" \
  "active; the packages go into this Python's own site-packages (activate threestudio's environment first if that" \
  "is not it)" >&2
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
echo "$TS" > "$HERE/.threestudio_root"  # where the tests find this host when the repo lives outside custom/

echo "[3/3] checking threestudio's dependencies and that launch.py's loader registers the extension"
# every missing package at once, the versions found against the ones CI tests, then the loader check
"$PY" -m animate124.tools.host_check "$TS" \
  || die "fix what is listed above (one pip command installs it all), then run install.sh again"
echo "done. Run: cd $TS && python launch.py --config custom/threestudio-animate124/configs/animate124.yaml --train --gpu 0"
