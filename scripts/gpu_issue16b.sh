#!/bin/bash
# Issue 16 on one H200, one device call (~8 min): the batched strength change on SDXL re-measured after the one-copy-
# per-refresh change, then SD1.5 512 px with torch.compile at batch 1 and 16 beside the default and the baseline.
#   run(command="bash scripts/gpu_issue16b.sh $OUT", carry=[".whl"], timeout_s=600)
set -u
out=$1
. "$(dirname "$0")/gpu_env.sh" "$out"
part bench-strength-sdxl 90 python3 scripts/bench_strength.py --family sdxl --device cuda --repeats 7 --work /tmp/bs \
  --json "$out/bench-strength-sdxl.json"
part bench-compile-sd15 "${COMPILE_LIMIT:-450}" python3 scripts/bench_train.py --work /tmp/bench --compile \
  --variants "sdlora (default);compile + graph" --batches 1,16 --lever-batches 1,16 --cli-steps 0 \
  --json "$out/bench-compile-sd15.json"
cat "$out/status.txt"
