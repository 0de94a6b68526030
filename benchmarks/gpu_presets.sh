#!/usr/bin/env bash
# Presets on one GPU: full-size random models once, then `animate124 benchmark` for the default, fast and low-VRAM
# configs (3 warm-up + 5 timed steps per stage) and memory / speed knobs against the default; JSON and logs to $OUT,
# a table at the end. Each benchmark saves its JSON after training and after each evaluation piece, so a process cut
# short by its limit keeps what it measured. A step that fails prints why and the others still run.
#   OUT=gpu-results bash benchmarks/gpu_presets.sh        (THREESTUDIO_ROOT=... to use another checkout)
#   A124_BENCH="default fast" ...      (which runs, of: default fast lowvram profile lowvram-profile fit hashgrid, the groups knobs
#                                       speed lowramvae merge compile graphs normals opaque, or one knob's name: default-no-alpha-thre ...)
# About 4 minutes for the default, 2-3 for each other config on an H200; split the runs over calls (or GPUs).
# Random weights: the numbers are honest for time and memory, never for quality.
# The environment comes from benchmarks/gpu_env.sh (carried wheels in .gpu/whl, threestudio in .gpu/threestudio or
# $THREESTUDIO_ROOT); threestudio's import-only dependencies get stand-ins from animate124.tools.host.
set -u -o pipefail
repo=$PWD
source benchmarks/gpu_env.sh   # carried wheels, THREESTUDIO_ROOT (default .gpu/threestudio), OUT, nerfacc build cache
OUT=$(cd "$OUT" && pwd)
ts=$THREESTUDIO_ROOT
models=${A124_FULL_MODELS:-/tmp/a124-full-size}
budget_s=${A124_BUDGET_S:-470}
runs=" ${A124_BENCH:-default knobs fast lowvram} "   # stop starting new work after this many seconds
start=$(date +%s)
elapsed() { echo $(( $(date +%s) - start )); }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/card.txt"
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)" | tee -a "$OUT/card.txt"

# 1. full-size random models (about 9 GB; once, reused when complete)
t=$(date +%s)
if [ "$(ls "$models"/*/.complete 2>/dev/null | wc -l)" = 5 ]; then echo "models: reusing $models"; else
python3 -m animate124.tools.cli make-tiny-models "$models" --full-size > "$OUT/models.log" 2>&1 \
  && echo "models: $(( $(date +%s) - t )) s, $(du -sh "$models" | cut -f1) in $models" | tee -a "$OUT/models.log" \
  || { echo "models: FAILED after $(( $(date +%s) - t )) s (last lines of models.log):"; tail -5 "$OUT/models.log"; }
fi

# 2. one process per config (a fresh process: its start-up overhead is measured too)
bench() {  # name timeout_s extra-args...
  local name=$1 limit=$2; shift 2
  if [ "$(elapsed)" -ge "$budget_s" ]; then echo "$name: skipped (budget of $budget_s s spent)"; return; fi
  local left=$(( budget_s + 60 - $(elapsed) )); [ "$left" -lt "$limit" ] && limit=$left
  local t; t=$(date +%s)
  # SIGTERM at the limit: the benchmark stops training and still writes the stages it finished (KILL 20 s later)
  ( cd "$ts" && timeout -k 20 "$limit" python3 -m animate124.tools.cli benchmark "$@" --models "$models" \
      --workdir "/tmp/a124-bench-$name" --out "$OUT/$name.json" ) > "$OUT/$name.log" 2>&1
  local rc=$?
  echo "$name: exit $rc after $(( $(date +%s) - t )) s$(case $rc in 124|137) echo " (timed out at $limit s)";; esac)"
  [ $rc = 0 ] || { grep -v Warning "$OUT/$name.log" | tail -4; }
}
want() { case "$runs" in *" $1 "*) return 0;; esac; return 1; }
want default && bench default 330 "$repo/configs/animate124.yaml" --warmup 3 --steps 5 --eval-images 3 --export-times 1
want fast && bench fast 240 "$repo/configs/animate124-fast.yaml" --warmup 3 --steps 5 --eval-images 3 --export-times 1
want lowvram && bench lowvram 240 "$repo/configs/animate124-lowvram.yaml" --warmup 3 --steps 5 --eval-images 3 \
  --export-times 1
# where the default's time goes beyond its floor: torch.profiler + cProfile tables, and on CUDA the memory table of
# each stage's trailing step (default-profile.profile.txt)
want profile && bench default-profile 300 "$repo/configs/animate124.yaml" --warmup 3 --steps 3 --eval-images 2 \
  --export-times 1 --profile
# the low-VRAM preset's profile: operators over 5 warm-up steps per stage, and what each stage's peak is made of (the
# memory table of its trailing step, in lowvram-profile.profile.txt)
want lowvram-profile && bench lowvram-profile 240 "$repo/configs/animate124-lowvram.yaml" --warmup 6 --steps 2 \
  --eval-images 2 --export-times 0 --profile
# one change against the default each, training steps only (names usable in A124_BENCH; `knobs` and `speed` are
# groups): without VAE checkpointing; without the marcher's alpha threshold (every sample of an occupied cell gets a
# gradient); without checkpointed normal queries; forward-difference normals. (Fused Adam, tried once, stops
# at the first step under 16-mixed: "No inf checks were recorded prior to update".)
knob() {  # name group --set args...
  local name=$1 group=$2; shift 2
  { want "$name" || want "$group"; } && bench "$name" 200 "$repo/configs/animate124.yaml" --warmup 3 --steps 4 \
    --eval-images 2 --export-times 0 "$@"
}
knob default-train speed   # the baseline for the knobs below, measured the same way
knob default-no-vae-checkpoint knobs --set system.guidances.video.guidance.vae_checkpoint=false \
  --set system.guidances.video.guidance.vae_chunk_size=null --set system.guidances.cn.guidance.vae_checkpoint=false
knob default-no-alpha-thre speed --set system.renderer.alpha_thre=0.0
knob default-no-normal-checkpoint knobs --set system.geometry.normal_checkpoint=false
knob default-forward-normals speed --set system.geometry.normal_type=finite_difference_forward
knob default-lowramvae4 lowramvae --set system.guidances.video.guidance.low_ram_vae=4
# normals (6 density queries per sample) only where used (group `normals`): on 4 random frames of the 16 (the normal
# smoothness averaged over those), on samples of weight >= 1e-3, both
knob default-normal-frames4 normals --set system.renderer.normal_frames=4
knob default-normal-weight normals --set system.renderer.normal_weight_min=0.001
knob default-normal-both normals --set system.renderer.normal_frames=4 --set system.renderer.normal_weight_min=0.001
# an opaque start (density blob scale 100 instead of 10: a hard ball, as a trained object, instead of the soft initial
# one; group `opaque`): what the marcher's early stop and the weight floor save once surfaces are sharp
knob default-opaque opaque --set system.geometry.density_blob_scale=100
knob default-opaque-normal-both opaque --set system.geometry.density_blob_scale=100 \
  --set system.renderer.normal_frames=4 --set system.renderer.normal_weight_min=0.001
# the presets, training steps only: `fast-train` and `fast-all-normals` (normals on every frame and sample, as the
# fast preset had them first); `lowvram-train` and `lowvram-normal-both` (normals on 4 frames and weighted samples,
# which the low-VRAM preset tried and dropped: no gain at its 64^2 renders)
preset_knob() {  # name config --set args...
  local name=$1 config=$2; shift 2
  want "$name" && bench "$name" 200 "$repo/configs/$config" --warmup 3 --steps 4 --eval-images 2 --export-times 0 "$@"
}
preset_knob fast-train animate124-fast.yaml
preset_knob fast-all-normals animate124-fast.yaml --set system.renderer.normal_frames=0 \
  --set system.renderer.normal_weight_min=0.0
preset_knob lowvram-train animate124-lowvram.yaml
preset_knob lowvram-normal-both animate124-lowvram.yaml --set system.renderer.normal_frames=4 \
  --set system.renderer.normal_weight_min=0.001
# the low-VRAM refine peak (10.7-10.8 GiB since the networks run in their own precision, 11.1-11.6 before; by the
# step's cameras): the video VAE re-encoded 2 frames at a time in the
# backward instead of 4 (compare its peak with lowvram-train's)
preset_knob lowvram-vae-chunk2 animate124-lowvram.yaml --set system.guidances.video.guidance.vae_chunk_size=2
# torch.compile of the frozen U-Nets / ControlNets (group `compile`; compare with default-train): each stage's first
# call per network and shape compiles in the step that makes it; the benchmark counts such
# steps' excess in switch_s, so the projection includes compilation. The networks alone, eager vs each mode, with
# break-even call counts: `denoiser-compile` (benchmarks/denoiser_compile.py, also in the group).
# Compiling takes minutes (the U-Net3D alone took 130-170 s on an H100), so these get up to 590 s each (still cut at
# A124_BUDGET_S + 60; a run cut there keeps the stages it finished): run one per call, e.g. A124_BENCH=default-compile
# A124_BUDGET_S=540.
# A124_COMPILE_ARGS: extra arguments for denoiser_compile.py (e.g. "--modes reduce-overhead --cases sd-unet").
compile_knob() {  # name mode
  { want "$1" || want compile; } && bench "$1" 590 "$repo/configs/animate124.yaml" --warmup 3 --steps 4 \
    --eval-images 2 --export-times 0 --set system.compile_denoisers=$2
}
# CUDA graphs of the eager no-grad denoiser forwards (no compilation: recorded at each signature's second call, inside
# the warm-up), against default-train / fast-train / lowvram-train (group `graphs`)
graphs_knob() {  # name config
  { want "$1" || want graphs; } && bench "$1" 200 "$repo/configs/$2" --warmup 3 --steps 4 --eval-images 2 \
    --export-times 0 --set system.compile_denoisers=cuda-graphs
}
graphs_knob default-cuda-graphs animate124.yaml
graphs_knob fast-cuda-graphs animate124-fast.yaml
graphs_knob lowvram-cuda-graphs animate124-lowvram.yaml
compile_knob default-compile max-autotune-no-cudagraphs
compile_knob default-compile-inductor default   # (CUDA graphs, reduce-overhead, are timed alone only; see COMPILE_MODES)
# the same with the VAE encoders compiled too (the refine floor is mostly two 1024 px encodes with their backward)
{ want default-compile-vae || want compile; } && bench default-compile-vae 590 "$repo/configs/animate124.yaml" \
  --warmup 3 --steps 4 --eval-images 2 --export-times 0 --set system.compile_denoisers=default \
  --set system.compile_vae_encoder=true
if want denoiser-compile || want compile; then
  if [ "$(elapsed)" -ge "$budget_s" ]; then echo "denoiser-compile: skipped (budget of $budget_s s spent)"; else
  timeout $(( budget_s + 60 - $(elapsed) )) python3 benchmarks/denoiser_compile.py --models "$models" \
    --out "$OUT/denoiser-compile.json" ${A124_COMPILE_ARGS:-} > "$OUT/denoiser-compile.log" 2>&1
  echo "denoiser-compile: exit $? (a run cut short keeps the cases it finished)"
  grep -E "^[a-z0-9+-]+: eager" "$OUT/denoiser-compile.log"; fi
fi
# the hash-grid backward adding each run of consecutive samples in one cell with one atomic at no level (the
# default: levels up to resolution 160), up to 64, at every level
knob default-no-merge merge --set system.geometry.pos_encoding_config.merge_runs_max_res=0
knob default-merge64 merge --set system.geometry.pos_encoding_config.merge_runs_max_res=64
knob default-merge-all merge --set system.geometry.pos_encoding_config.merge_runs_max_res=100000
# the hash-grid backward alone on ray-marched samples, plain and merged, per level (hashgrid_backward.json)
want hashgrid && { python3 benchmarks/hashgrid_backward.py --out "$OUT/hashgrid_backward.json" > "$OUT/hashgrid.log" 2>&1;
  echo "hashgrid backward: exit $?"; grep -v Warning "$OUT/hashgrid.log" | tail -30; }
# the synthetic fit with the time-sliced occupancy grid, without and with the marcher's alpha threshold
for thre in 0.0 0.01; do
  want "fit" || continue
  [ "$(elapsed)" -ge "$budget_s" ] && { echo "fit-$thre: skipped (budget)"; continue; }
  python3 benchmarks/fit_synthetic_4d.py --device cuda --steps 2000 --estimator occ --alpha-thre $thre \
    > "$OUT/fit-alpha-$thre.log" 2>&1; echo "fit alpha_thre=$thre: exit $?"; grep -E "psnr_unseen|samples_per_ray|steps_per_s" "$OUT/fit-alpha-$thre.log"
done

# 3. the table (one line per stage; projections against the goals: default <= 60 min, fast <= 30 min, low-VRAM <= 12 GB)
python3 - "$OUT" <<'EOF'
import json, sys
from pathlib import Path
from step_benchmark.cli import summary_table
for name in ("default", "default-train", "default-no-vae-checkpoint", "default-no-alpha-thre",
             "default-no-normal-checkpoint", "default-forward-normals", "fast", "lowvram", "default-lowramvae4",
             "default-no-merge", "default-merge64", "default-merge-all", "default-compile", "default-compile-inductor",
             "default-normal-frames4", "default-normal-weight", "default-normal-both", "fast-train",
             "fast-all-normals", "lowvram-train", "lowvram-normal-both", "lowvram-vae-chunk2", "default-compile-vae",
             "default-opaque", "default-opaque-normal-both", "default-profile", "default-cuda-graphs",
             "fast-cuda-graphs", "lowvram-cuda-graphs"):
    if not (Path(sys.argv[1]) / f"{name}.log").is_file():
        continue
    path = Path(sys.argv[1]) / f"{name}.json"
    if not path.is_file():
        print(f"{name}: no result (see {name}.log)")
        continue
    r = json.loads(path.read_text())
    print(summary_table(r))
    for st in r["stages"]:
        if "breakdown_ms" in st:
            b = st["breakdown_ms"]
            print(f"  {st['name']:8s} breakdown ms: " + ", ".join(f"{k} {v:.1f}" for k, v in b.items())
                  + f"; resident {st['resident_gb']} GB, reserved peak {st['peak_reserved_gb']} GB"
                  + f"; stale {st['stale_guidances']}; nonfinite {st['nonfinite_steps']}")
    print(f"  overhead: {json.dumps(r['overhead'])}")
    if "compile" in name or "graphs" in name:  # loads + compilation / recording per stage, and the steps that did it
        print("  switch_s / compile_steps: " + ", ".join(
            f"{st['name']} {st.get('switch_s')} s {st.get('compile_steps')}" for st in r["stages"]))
EOF
echo "total: $(elapsed) s"
