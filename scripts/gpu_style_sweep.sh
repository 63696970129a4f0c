#!/usr/bin/env bash
# Issue 3 recipe sweep on the lent GPU: each line of RECIPES ("name|style|UNet blocks (empty: all)|extra train flags") runs
# scripts/eval_styles.py (the README's train command plus the flags at seeds $SEEDS (default 0), then held-out
# prompts at 0/.25/.5/.75/1 judged by $CHECKER (default the shipped one) on $BASE (default tiny)), JOBS at a time on
# the one GPU, in fp32 like the CPU path. Results: OUT_DIR/results.tgz
# (<name>.json and each run's log in one file: the device returns at most 8). The blocks field restricts the UNet LoRA
# to those blocks only with benchmarks/2026-12-02-unet-blocks-probe.patch applied (a probe, not a shipped option).
# Usage: bash scripts/gpu_style_sweep.sh OUT_DIR RECIPES [PROMPTS] [JOBS]
set -u
out=$1 recipes=$2 prompts=${3:-48} jobs=${4:-4}
. "$(dirname "$0")/gpu_env.sh" "$out"
export OMP_NUM_THREADS=2
run() {  # name style blocks flags
  SDLORA_BLOCKS=$3 python3 scripts/eval_styles.py --looks "$2" --mix "" --seeds "${SEEDS:-0}" --base "${BASE:-tiny}" \
    ${CHECKER:+--checker "$CHECKER"} --prompts "$prompts" --work "/tmp/sweep/$1" \
    --train-args "--precision fp32 --mixed-precision no $4" --json "$out/$1.json" > "/tmp/sweep-$1.log" 2>&1
  echo "$1 exit $? $(date +%T)" >> "$out/status.txt"
}
while IFS='|' read -r name style blocks flags; do
  [ -z "$name" ] && continue
  while [ "$(jobs -rp | wc -l)" -ge "$jobs" ]; do sleep 1; done
  run "$name" "$style" "$blocks" "$flags" &
done < "$recipes"
wait
cd "$out" && tar czf results.tgz --remove-files ./*.json /tmp/sweep-*.log 2>/dev/null
