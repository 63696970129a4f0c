#!/bin/bash
# Issue 16 on one H200 (~1 min after start-up): SDXL strength changes, three separate calls vs one set_strengths call.
#   run(command="bash scripts/gpu_strength.sh $OUT", carry=[".whl"], timeout_s=300)
set -u
out=$1
. "$(dirname "$0")/gpu_env.sh" "$out"
timeout 200 python3 scripts/bench_strength.py --family sdxl --device cuda --repeats 7 --work /tmp/bs \
  --json "$out/bench-strength-sdxl.json" > "$out/bench-strength-sdxl.log" 2>&1
echo "bench-strength-sdxl exit $?"
