#!/usr/bin/env bash
# The README's commands, run as written from a fresh clone inside a copy of threestudio, each step timed:
#   install (install.sh, then again: nothing to do), the smoke check (train, then the export command training
#   printed), the tests (install.sh with the test extras, then python -m pytest).
#
#   bash tests/readme_commands.sh [PYTHON]
#
# PYTHON (default python3) stands for "threestudio installed by its README": a venv layered on its packages (a .pth
# file) receives whatever install.sh installs, so PYTHON's own environment is never changed. PyPI must be reachable
# for what PYTHON lacks. Settings (environment):
#   A124_THREESTUDIO   the threestudio to copy (default: ../shared/vendor/threestudio beside this repo)
#   A124_README_TESTS  what the test step runs (default: tests, the whole suite, as the README says; ~20 min)
#   A124_HOST_REQUIREMENTS=1  first pip-install threestudio's requirements.txt as its README says, without the lines
#                      that need CUDA or a compiler (pysdf, tinycudann, nvdiffrast, xformers, bitsandbytes): its
#                      gradio 4.11 then holds numpy < 2 and Pillow < 11, which install.sh's extras must keep
#   KEEP=1             keep the temporary folder (printed)
# The clone is of this repo's committed HEAD. Exit status: that of the first step that fails.
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd -P)
BASE=${1:-python3}
TS_SRC=${A124_THREESTUDIO:-$REPO/../shared/vendor/threestudio}
[ -f "$TS_SRC/launch.py" ] || { echo "readme_commands: no threestudio at $TS_SRC (set A124_THREESTUDIO)" >&2; exit 2; }
WORK=$(mktemp -d /tmp/a124-readme.XXXXXX)
trap '[ -n "${KEEP:-}" ] && echo "kept $WORK" || rm -rf "$WORK"' EXIT
export PYTHONWARNINGS=ignore PYTHONUNBUFFERED=1 MPLBACKEND=Agg
export A124_TINY_MODELS=$WORK/tiny-models  # an empty cache: the first smoke run makes the tiny models (timed)

step() {  # step NAME COMMAND...: run in the current folder, log to $WORK/NAME.log, print its wall time and the load
  local name=$1 t0 t1
  shift
  echo "== $name: $*"
  t0=$(date +%s%N)
  if ! "$@" > "$WORK/$name.log" 2>&1; then
    tail -n 40 "$WORK/$name.log"
    echo "== $name FAILED ($WORK/$name.log)"
    KEEP=1
    exit 1
  fi
  t1=$(date +%s%N)
  echo "== $name: $(( (t1 - t0) / 1000000000 )) s (load average $(cut -d' ' -f1-3 /proc/loadavg), $(nproc) cores)"
}

"$BASE" -m venv "$WORK/venv"
site=$("$WORK/venv/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
"$BASE" -c "import sys; print('\n'.join(p for p in sys.path if p.endswith(('site-packages', 'dist-packages'))))" \
  > "$site/_readme_base.pth"
# shellcheck disable=SC1091
source "$WORK/venv/bin/activate"
cp -r "$TS_SRC" "$WORK/threestudio"
cd "$WORK/threestudio"
if [ -n "${A124_HOST_REQUIREMENTS:-}" ]; then
  grep -vE '^(pysdf|xformers|bitsandbytes)|NVlabs|^git\+' requirements.txt | sed 's/^lightning==/pytorch-lightning==/' \
    > "$WORK/host-requirements.txt"
  step host-requirements python -m pip install -q -r "$WORK/host-requirements.txt"
fi

# ---- the README's commands, as written (from the threestudio folder) ----
step clone git clone -q "$REPO" custom/threestudio-animate124
step install bash custom/threestudio-animate124/install.sh .
step install-again bash custom/threestudio-animate124/install.sh .
grep -q "nothing to install" "$WORK/install-again.log" || { echo "install.sh installed something again"; exit 1; }
step smoke-train animate124 launch --config custom/threestudio-animate124/configs/animate124-smoke.yaml --train
export_command=$(grep -A1 "Export the meshes and the animated .glb with:" "$WORK/smoke-train.log" | tail -n 1 | sed 's/^ *//')
[ -n "$export_command" ] || { echo "training did not print the export command"; exit 1; }
step smoke-export bash -c "$export_command"
glb=$(find outputs/animate124-smoke -name "*.glb" | head -n 1)
[ -n "$glb" ] || { echo "the export wrote no .glb"; exit 1; }
[ ! -e custom/threestudio-animate124/load ] || { echo "the smoke run wrote into the clone (load/)"; exit 1; }
[ -f "$A124_TINY_MODELS/.complete" ] || { echo "no tiny models in $A124_TINY_MODELS"; exit 1; }
step install-test-extras bash custom/threestudio-animate124/install.sh . test,integration
step pip-check python custom/threestudio-animate124/.ci/pip_check.py
cd custom/threestudio-animate124
# shellcheck disable=SC2086
step tests python -m pytest ${A124_README_TESTS:-tests} -q -p no:cacheprovider
echo "== all steps passed; export command as printed: $export_command; glb: $glb"
python -c "import numpy, PIL; print('numpy', numpy.__version__, 'Pillow', PIL.__version__)"
