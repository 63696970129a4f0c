#!/bin/bash
# Issue 16 on one H200 (~3 min after start-up): SD1.5 512 px batch 16, torch.compile with channels_last on (the
# default at batch 16 is off), beside the baseline, to see whether the layout closes the gap to 35% of the roofline.
#   run(command="bash scripts/gpu_compile_cl16.sh $OUT", carry=[".whl"], timeout_s=330)
set -u
out=$1
. "$(dirname "$0")/gpu_env.sh" "$out"
timeout 300 python3 scripts/bench_train.py --work /tmp/bench --compile --variants "compile + graph, channels_last on" \
  --batches 16 --lever-batches 16 --cli-steps 0 --json "$out/bench-compile-cl16.json" > "$out/bench-compile-cl16.log" 2>&1
echo "bench-compile-cl16 exit $?"
