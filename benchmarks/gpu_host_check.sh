#!/usr/bin/env bash
# The host-environment checks on a CUDA machine, in one go (docs/testing.md):
#   1. the smoke config through threestudio's own launch.py, --train (A124_SMOKE_ARGS: extra overrides, e.g.
#      system.compile_denoisers=cuda-graphs; the whole log in smoke-train.log) then --export;
#   2. the CUDA unit cases and tests/gpu; 3. the whole integration tier (real threestudio).
# Expects, as the device machine gets them: wheels in .gpu/whl (packages the image lacks, omegaconf 2.3.0 among them),
# threestudio in .gpu/threestudio (or $THREESTUDIO_ROOT), the shared examples in .gpu/data. Logs go to $OUT.
set -u -o pipefail
repo=$PWD
source benchmarks/gpu_env.sh
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/card.txt"
python3 -c "import torch, triton, omegaconf, diffusers, transformers, pytorch_lightning as pl, nerfacc; print('torch', torch.__version__, 'triton', triton.__version__, 'omegaconf', omegaconf.__version__, 'diffusers', diffusers.__version__, 'transformers', transformers.__version__, 'pytorch-lightning', pl.__version__, 'nerfacc', nerfacc.__version__)" | tee -a "$OUT/card.txt"
t0=$(date +%s)
echo "== 1. smoke config through launch.py ($(( $(date +%s) - t0 )) s)"
ts=$THREESTUDIO_ROOT
( cd "$ts" && export PYTHONPATH=$PYTHONPATH:$repo/animate124/tools/host_stand_ins && s=$(date +%s) \
  && python3 launch.py --config custom/threestudio-animate124/configs/animate124-smoke.yaml --train --gpu 0 ${A124_SMOKE_ARGS:-} \
     2>&1 | tee "$OUT/smoke-train.log" | grep -vi warn | tail -8 \
  && echo "smoke train wall: $(( $(date +%s) - s )) s" \
  && ckpt=$(ls -d outputs/animate124-smoke/*/ckpts/last.ckpt | tail -1) && s=$(date +%s) \
  && python3 launch.py --config "$(dirname "$(dirname "$ckpt")")/configs/parsed.yaml" --export --gpu 0 resume="$ckpt" 2>&1 | grep -vi warn | tail -5 \
  && echo "smoke export wall: $(( $(date +%s) - s )) s" \
  && find outputs/animate124-smoke -path "*export*" | sort | head -20 && cat outputs/animate124-smoke/*/stages.json ) 2>&1 | tee "$OUT/smoke.log"
echo "== 2. CUDA unit cases + tests/gpu ($(( $(date +%s) - t0 )) s)"
{ python3 -m pytest tests/gpu -q -p no:cacheprovider 2>&1 | tail -3
  python3 -m pytest tests/unit -k cuda -q -p no:cacheprovider 2>&1 | tail -3; } | tee "$OUT/gpu_tier.log"
echo "== 3. integration tier ($(( $(date +%s) - t0 )) s)"   # INTEGRATION_TIMEOUT=0: skip (CPU-bound; CI runs it)
[ "${INTEGRATION_TIMEOUT:-900}" = 0 ] && echo "skipped (INTEGRATION_TIMEOUT=0)" || \
timeout ${INTEGRATION_TIMEOUT:-900} python3 -m pytest tests/integration -q -p no:cacheprovider -rf --tb=line 2>&1 | tail -25 | tee "$OUT/integration.log"
tar czf "$OUT/torch_extensions.tgz" -C /tmp/te . 2>/dev/null
echo "== done in $(( $(date +%s) - t0 )) s"
