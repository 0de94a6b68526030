#!/usr/bin/env bash
# Install threestudio-animate124 into a threestudio checkout, in one run.
#
#   bash install.sh PATH_TO_THREESTUDIO [EXTRAS]      EXTRAS: comma-separated, e.g. tools (default: testing)
#
# 1. one `pip install` (PyPI only; printed before it runs) of everything missing: threestudio's import-time packages
#    with its own pins, the fixes of version pairs known to break (huggingface_hub<0.26 beside diffusers 0.19), this
#    package with EXTRAS (skipped when it is already installed editable from this folder: then only what is missing).
#    Every pip install uses a constraints file of what this environment declares (.pip-constraints.txt here), so
#    nothing is moved past the bounds threestudio's packages set (numpy<2 and Pillow<11 under its gradio 4.11);
# 2. links this repo to PATH_TO_THREESTUDIO/custom/threestudio-animate124 unless it is already there;
# 3. checks, in one pass, every package threestudio and our components import, the versions against those CI tests,
#    that every a124-* component registers through launch.py's own loader; ends with the next command that works here.
# Safe to run again (nothing is installed twice). Never replaces a folder it did not make.
set -u -o pipefail

die() { echo "install.sh: $*" >&2; exit 1; }

[ $# -ge 1 ] && [ $# -le 2 ] || die "usage: bash install.sh PATH_TO_THREESTUDIO [EXTRAS] (the folder that holds launch.py)"
TS=$(cd "$1" 2>/dev/null && pwd -P) || die "no such folder: $1 (give the path of your threestudio checkout)"
[ -f "$TS/launch.py" ] && [ -f "$TS/threestudio/__init__.py" ] \
  || die "$TS is not a threestudio checkout (no launch.py / threestudio/__init__.py): clone threestudio first"
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd -P)
EXTRAS=testing${2:+,$2}
PY=${PYTHON:-python}
command -v "$PY" >/dev/null || PY=python3
"$PY" -m pip --version >/dev/null 2>&1 || die "no pip for '$PY': activate the environment you run threestudio in"
# threestudio's modules raise dozens of FutureWarnings on import; the check's own lines are what matter here
export PYTHONWARNINGS=ignore

[ -n "${VIRTUAL_ENV:-}${CONDA_PREFIX:-}" ] || echo "install.sh: note: no virtualenv or conda environment is" \
  "active; the packages go into this Python's own site-packages (activate threestudio's environment first if that" \
  "is not it)" >&2
CONSTRAINTS="$HERE/.pip-constraints.txt"
"$PY" "$HERE/animate124/tools/host_constraints.py" "$TS" "$CONSTRAINTS" || die "could not read this environment's packages"
mapfile -t ARGS < <(PYTHONPATH="$HERE${PYTHONPATH:+:$PYTHONPATH}" "$PY" -m animate124.tools.host_check "$TS" --plan "$EXTRAS")
echo "[1/3] Python packages, into $("$PY" -c 'import sys; print(sys.prefix)')"
if [ ${#ARGS[@]} -eq 0 ]; then
  echo "      nothing to install: threestudio-animate124[$EXTRAS] is installed (editable) from $HERE, with every package"
else
  echo "      pip install ${ARGS[*]} -c $CONSTRAINTS"
  "$PY" -m pip install -q "${ARGS[@]}" -c "$CONSTRAINTS" \
    || die "pip install failed (output above): check your network/PyPI access, then run install.sh again"
fi

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
"$PY" -m animate124.tools.host_check "$TS" \
  || die "fix what is listed above, then run: bash $HERE/install.sh $TS${2:+ $2}"
