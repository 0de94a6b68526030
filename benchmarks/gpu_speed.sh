#!/usr/bin/env bash
# The field's own work on one GPU (docs/performance.md): the normal-query variants against each other in one process
# (benchmarks/field_step.py, initial blob and fitted surface), then whole steps of the presets through
# `animate124 benchmark` (training steps only: 3 warm-up + 4 timed per stage), on the initial blob and on the field
# fitted to the synthetic 4-D scene (--start-shape blobs). JSON and logs to $OUT, a table at the end.
#   OUT=gpu-results A124_SPEED="field default-blobs default-blob" bash benchmarks/gpu_speed.sh
# Runs (A124_SPEED, done in the order given): field, default-blob, default-blobs, default-blobs-checkpoint (the
# earlier per-offset checkpointed normals), fast-blob, fast-blobs, lowvram-blob, lowvram-blobs, host (launch.py smoke
# train + export, tests/gpu and the CUDA unit cases: benchmarks/gpu_host_check.sh without its integration tier).
# A124_BUDGET_S (default 540): no run starts after it and each is cut at it + 60 s (a cut benchmark keeps the stages it
# finished). Random weights: honest for time and memory, never for quality.
# The environment comes from benchmarks/gpu_env.sh (carried wheels in .gpu/whl, threestudio in .gpu/threestudio).
set -u -o pipefail
repo=$PWD
source benchmarks/gpu_env.sh
OUT=$(cd "$OUT" && pwd)
ts=$THREESTUDIO_ROOT
models=${A124_FULL_MODELS:-/tmp/a124-full-size}
budget_s=${A124_BUDGET_S:-540}
runs=" ${A124_SPEED:-field default-blobs default-blob} "
start=$(date +%s)
elapsed() { echo $(( $(date +%s) - start )); }
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda,
    'triton', triton.__version__)"
  echo "commit ${A124_COMMIT:-unknown}, $(date -u +%Y-%m-%dT%H:%MZ)"; } | tee "$OUT/card.txt"

left() {  # seconds a run may take: its own limit, cut at the budget + 60
  local limit=$1 rest=$(( budget_s + 60 - $(elapsed) )); [ "$rest" -lt "$limit" ] && limit=$rest; echo "$limit"
}
field() {
  timeout "$(left 200)" python3 benchmarks/field_step.py --out "$OUT/field_step.json" --reps "${A124_REPS:-6}" \
    --keep-gb "${A124_KEEP_GB:-1.0}" > "$OUT/field_step.log" 2>&1
  echo "field_step: exit $? at $(elapsed) s"; grep -v Warning "$OUT/field_step.log" | tail -20
}
bench() {  # name config --args...
  local name=$1 config=$2; shift 2
  if [ "$(ls "$models"/*/.complete 2>/dev/null | wc -l)" != 5 ]; then
    local t; t=$(date +%s)
    python3 -m animate124.tools.cli make-tiny-models "$models" --full-size > "$OUT/models.log" 2>&1
    echo "models: exit $? after $(( $(date +%s) - t )) s"
  fi
  local t; t=$(date +%s)
  ( cd "$ts" && timeout -k 20 "$(left 220)" python3 -m animate124.tools.cli benchmark "$repo/configs/$config" \
      --models "$models" --workdir "/tmp/a124-bench-$name" --out "$OUT/$name.json" --warmup 3 --steps 4 \
      --eval-images 2 --export-times 0 "$@" ) > "$OUT/$name.log" 2>&1
  echo "$name: exit $? after $(( $(date +%s) - t )) s"
}
host() {
  OUT="$OUT/host" INTEGRATION_TIMEOUT=0 timeout "$(left 260)" bash benchmarks/gpu_host_check.sh > "$OUT/host.log" 2>&1
  echo "host: exit $? at $(elapsed) s"; grep -E "passed|failed|error|wall" "$OUT/host.log" | tail -8
}
for run in $runs; do  # in the order given
  if [ "$(elapsed)" -ge "$budget_s" ]; then echo "$run: skipped (budget of $budget_s s spent)"; continue; fi
  case $run in
    field) field ;;
    host) host ;;
    default-blobs) bench default-blobs animate124.yaml --start-shape blobs ;;
    default-blob) bench default-blob animate124.yaml ;;
    default-blobs-checkpoint) bench default-blobs-checkpoint animate124.yaml --start-shape blobs \
      --set system.geometry.normal_fused=false ;;
    fast-blobs) bench fast-blobs animate124-fast.yaml --start-shape blobs ;;
    fast-blob) bench fast-blob animate124-fast.yaml ;;
    lowvram-blobs) bench lowvram-blobs animate124-lowvram.yaml --start-shape blobs ;;
    lowvram-blob) bench lowvram-blob animate124-lowvram.yaml ;;
    *) echo "$run: unknown run (see the header)" ;;
  esac
done
python3 - "$OUT" <<'EOF'
import json, sys
sys.path.insert(0, 'benchmarks')
from pathlib import Path
from step_benchmark.cli import summary_table
for path in sorted(Path(sys.argv[1]).glob("*.json")):
    r = json.loads(path.read_text())
    if "stages" not in r:
        continue
    print(f"== {path.stem} (start shape {r['overhead'].get('start_shape')})")
    print(summary_table(r))
    for st in r["stages"]:
        if "breakdown_ms" in st:
            print(f"  {st['name']:8s} " + ", ".join(f"{k} {v:.1f}" for k, v in st["breakdown_ms"].items())
                  + f"; peak {st['peak_allocated_gb']} / {st['peak_reserved_gb']} GiB; work {st.get('work')}; "
                  f"launches {st.get('launches')}")
EOF
echo "total: $(elapsed) s"
