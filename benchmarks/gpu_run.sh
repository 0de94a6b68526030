#!/usr/bin/env bash
# The GPU tests and the hash-grid / fit / guidance benchmarks on a CUDA machine (JSON/logs to ${OUT:-gpu-results}).
#   bash benchmarks/gpu_run.sh [bench|integration|all]
# Python packages missing on a bare image (no PyPI there) may be carried as wheels in .whl/.
set -u -o pipefail
OUT=${OUT:-gpu-results}; mkdir -p "$OUT"
what=${1:-all}
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site:.${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=.:${PYTHONPATH:-} PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/card.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/card.txt"
if [ "$what" = bench ] || [ "$what" = all ]; then
  python3 -m pytest tests/gpu tests/unit/test_hashgrid.py tests/unit/test_occupancy.py -q -x -p no:cacheprovider 2>&1 | tail -5 | tee "$OUT/gpu_tests.log"
  python3 benchmarks/hashgrid_speed.py --out "$OUT/hashgrid.json" 2>&1 | tee "$OUT/hashgrid.log"
  python3 benchmarks/fit_synthetic_4d.py --device cuda --steps 2000 2>&1 | tail -15 | tee "$OUT/fit.log"
  python3 benchmarks/guidance_speed.py --out "$OUT/guidance.json" 2>&1 | tail -25 | tee "$OUT/guidance.log"
fi
if [ "$what" = integration ] || [ "$what" = all ]; then
  THREESTUDIO_ROOT=${THREESTUDIO_ROOT:-$PWD/.deps/threestudio} python3 -m pytest tests/integration -q -p no:cacheprovider -W ignore 2>&1 | tail -8 | tee "$OUT/integration.log"
fi
if [ "$what" = integration ] || [ "$what" = all ] || [ "$what" = smoke ]; then
  ts=${THREESTUDIO_ROOT:-$PWD/.deps/threestudio}; repo=$PWD
  mkdir -p "$ts/custom"; ln -sfn "$repo" "$ts/custom/threestudio-animate124"
  ( cd "$ts" && export PYTHONPATH=$PYTHONPATH:$repo/tests/stubs && start=$(date +%s) \
    && python3 launch.py --config custom/threestudio-animate124/configs/animate124-smoke.yaml --train --gpu 0 2>&1 | grep -v Warning | tail -20 \
    && echo "smoke train wall: $(( $(date +%s) - start )) s" \
    && ckpt=$(ls -d outputs/animate124-smoke/*/ckpts/last.ckpt | tail -1) && start=$(date +%s) \
    && python3 launch.py --config "$(dirname "$(dirname "$ckpt")")/configs/parsed.yaml" --export --gpu 0 resume="$ckpt" 2>&1 | grep -v Warning | tail -10 \
    && echo "smoke export wall: $(( $(date +%s) - start )) s" \
    && find outputs/animate124-smoke -maxdepth 4 | sort | head -60 && cat outputs/animate124-smoke/*/stages.json ) 2>&1 | tee "$OUT/smoke.log"
fi
