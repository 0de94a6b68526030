#!/usr/bin/env bash
# Two GPUs (docs/multi-gpu.md), on a machine with 2 CUDA GPUs, everything through threestudio's launch.py:
#   1. the smoke recipe with STEPS steps per stage (tiny random models) on 1 GPU, then on 2 GPUs (DDP, NCCL):
#      wall time, clips per second, peak memory per GPU (nvidia-smi), ddp_check.json (ranks bit-identical);
#   2. the 2-GPU checkpoint taken in the dynamic stage resumed on 1 GPU (stage and step continue);
#   3. two run-benchmark shards at once, one per GPU, over the preprocessed examples; then the summary table.
# Tiny random models: honest for the mechanics and scaling of the loop, never for quality.
set -u -o pipefail
repo=$PWD; STEPS=${STEPS:-30}
source benchmarks/gpu_env.sh
ts=$THREESTUDIO_ROOT
export PYTHONPATH=$PYTHONPATH:$repo/animate124/tools/host_stand_ins   # for launch.py subprocesses
nvidia-smi --query-gpu=index,name,memory.total --format=csv,noheader | tee "$OUT/multi_card.txt"
cd "$ts"
python3 - "$STEPS" <<'EOF'
import sys, yaml
steps = int(sys.argv[1])
cfg = yaml.safe_load(open("custom/threestudio-animate124/configs/animate124-smoke.yaml"))
for stage in cfg["system"]["stages"]:
    stage["steps"] = steps
cfg["trainer"].update(max_steps=3 * steps, val_check_interval=3 * steps)
cfg["checkpoint"]["every_n_train_steps"] = steps + steps // 2   # one checkpoint in the middle of the dynamic stage
yaml.safe_dump(cfg, open("custom/multi-smoke.yaml", "w"), sort_keys=False)
EOF
summary() {  # $1 = trial dir, $2 = label, $3 = GPUs
  python3 - "$1" "$2" "$3" <<'EOF'
import json, sys, pathlib
trial, label, gpus = pathlib.Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
rec = json.loads((trial / "stages.json").read_text())
for r in rec["stages"]:
    med = r.get("median_step_s")
    step_s = med if med is not None else r["wall_time_s"] / max(r["steps"], 1)
    print(f"{label}: stage {r['stage']:8s} steps {r['steps']:4d} wall {r['wall_time_s']:7.2f} s  step {1000 * step_s:7.1f} ms"
          f"  clips/s {gpus / step_s:6.2f}  peak(rank0) {r['peak_vram_gb']} GB")
check = trial / "ddp_check.json"
if check.exists():
    print(f"{label}: ddp_check {check.read_text()}")
EOF
}
run() {  # $1 = --gpu value, $2 = name, rest = extra args
  local gpus=$1 name=$2; shift 2
  nvidia-smi --query-gpu=index,memory.used --format=csv,noheader,nounits -lms 200 > "$OUT/mem_$name.csv" & local smi=$!
  local s=$(date +%s)
  python3 launch.py --config custom/multi-smoke.yaml --train --gpu "$gpus" name="$name" tag=run use_timestamp=false "$@" \
    > "$OUT/$name.log" 2>&1; local rc=$?
  kill $smi 2>/dev/null
  echo "$name: rc=$rc wall $(( $(date +%s) - s )) s (launch.py, incl. start-up, test renders)"
  awk -F', ' '{ if ($2 > m[$1]) m[$1] = $2 } END { for (i in m) printf "'"$name"': GPU %s peak %d MiB (nvidia-smi)\n", i, m[i] }' "$OUT/mem_$name.csv"
  [ $rc -eq 0 ] && summary "outputs/$name/run" "$name" "$(echo "$gpus" | tr ',' '\n' | wc -l)"
  [ $rc -eq 0 ] || tail -30 "$OUT/$name.log"
}
echo "== 1. smoke recipe, $STEPS steps per stage: 1 GPU, then 2 GPUs"
run 0 multi-1gpu 2>&1 | tee "$OUT/multi.txt"
run 0,1 multi-2gpu 2>&1 | tee -a "$OUT/multi.txt"
echo "== 2. the 2-GPU checkpoint from the dynamic stage, resumed on 1 GPU"
ckpt=$(ls outputs/multi-2gpu/run/ckpts/epoch=*step=$(( STEPS + STEPS / 2 ))*.ckpt 2>/dev/null | head -1)
if [ -n "$ckpt" ]; then
  cp -r outputs/multi-2gpu outputs/multi-resume
  python3 launch.py --config custom/multi-smoke.yaml --train --gpu 0 name=multi-resume tag=run use_timestamp=false \
    resume="outputs/multi-resume/run/ckpts/$(basename "$ckpt")" > "$OUT/multi-resume.log" 2>&1
  echo "resume rc=$? from $(basename "$ckpt")" | tee -a "$OUT/multi.txt"
  grep -a "stage .* from step" "$OUT/multi-resume.log" | tail -3 | tee -a "$OUT/multi.txt"
  python3 -c "import json; r=json.load(open('outputs/multi-resume/run/stages.json')); print('resumed stages.json:', [(s['stage'], s['start_step'], s['end_step']) for s in r['stages']])" | tee -a "$OUT/multi.txt"
else
  echo "no mid-dynamic checkpoint found: $(ls outputs/multi-2gpu/run/ckpts 2>&1)" | tee -a "$OUT/multi.txt"
fi
echo "== 3. two run-benchmark shards at once (GPU 0 and GPU 1)"
data=/tmp/bench-examples; rm -rf "$data" /tmp/bench-out
python3 - "$A124_SHARED_DATA" "$data" <<'EOF'
import json, pathlib, shutil, sys
shared, data = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
data.mkdir(parents=True)
cases = []
for case in sorted(p for p in (shared / "examples").iterdir() if p.is_dir()):
    shutil.copytree(case, data / case.name)
    cases.append({"name": case.name, "caption": {"panda-dance": "a panda is dancing"}.get(case.name, f"a {case.name.split('-')[0]} is moving")})
(data / "benchmark.json").write_text(json.dumps(cases))
EOF
bench() {
  python3 -m animate124.tools.cli run-benchmark "$data" --out /tmp/bench-out --threestudio "$ts" --reuse-from "$data" \
    --config custom/threestudio-animate124/configs/animate124-smoke.yaml --clip-model "$A124_TINY_MODELS/clip" "$@" \
    --extra 'system.learned_embeds_path=${system.tiny_models_dir}/smoke_embeds.safetensors'
}
s=$(date +%s)
bench --shard 0/2 --gpu 0 > "$OUT/shard0.log" 2>&1 & p0=$!
bench --shard 1/2 --gpu 1 > "$OUT/shard1.log" 2>&1 & p1=$!
wait $p0; r0=$?; wait $p1; r1=$?
echo "shards rc=$r0,$r1 wall $(( $(date +%s) - s )) s" | tee -a "$OUT/multi.txt"
bench --summarize > "$OUT/summary.log" 2>&1; echo "summary rc=$?" | tee -a "$OUT/multi.txt"
tail -12 "$OUT/summary.log" | tee -a "$OUT/multi.txt"
for i in 0 1; do echo "shard $i cases: $(grep -oE '^== +[0-9]+ [a-z-]+' "$OUT/shard$i.log" | awk '{print $3}' | tr '\n' ' ')"; done | tee -a "$OUT/multi.txt"
ls /tmp/bench-out | tee -a "$OUT/multi.txt"
