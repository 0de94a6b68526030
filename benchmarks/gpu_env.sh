# Sourced by the GPU scripts: packages the device image lacks (carried wheels), threestudio and the examples.
# Expects .gpu/whl (wheels), .gpu/threestudio (or $THREESTUDIO_ROOT), .gpu/data (or $A124_SHARED_DATA).
repo=${repo:-$PWD}; OUT=${OUT:-$repo/gpu-results}; mkdir -p "$OUT"
if ls "$repo"/.gpu/whl/*.whl >/dev/null 2>&1 && [ ! -d /tmp/site ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$repo"/.gpu/whl/*.whl
fi
[ -d /tmp/site ] && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
export PYTHONPATH=$repo:${PYTHONPATH:-} PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore
export THREESTUDIO_ROOT=${THREESTUDIO_ROOT:-$repo/.gpu/threestudio} A124_SHARED_DATA=${A124_SHARED_DATA:-$repo/.gpu/data}
[ -f "$THREESTUDIO_ROOT/launch.py" ] || { echo "gpu_env.sh: no threestudio checkout at $THREESTUDIO_ROOT (no launch.py):" \
  "set THREESTUDIO_ROOT to yours, or put one in .gpu/threestudio" >&2; exit 1; }
export A124_TINY_MODELS=${A124_TINY_MODELS:-/tmp/a124-tiny}
if [ -f "$repo/.gpu/torch_extensions.tgz" ] && [ ! -d /tmp/te ]; then mkdir -p /tmp/te && tar xzf "$repo/.gpu/torch_extensions.tgz" -C /tmp/te; fi
export TORCH_EXTENSIONS_DIR=/tmp/te
mkdir -p "$THREESTUDIO_ROOT/custom" && ln -sfn "$repo" "$THREESTUDIO_ROOT/custom/threestudio-animate124"
