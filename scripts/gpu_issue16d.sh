#!/usr/bin/env bash
# Issue 16 on one H200 (~7 min after start-up): SD1.5 512 px batch 16 compiled, with inductor's 1x1-conv-as-matmul,
# then with its coordinate-descent tuning of each generated kernel as well (both compile cold).
#   run(command="bash scripts/gpu_issue16d.sh $OUT", carry=[".whl"], timeout_s=430)
set -u
out=$1
. "$(dirname "$0")/gpu_env.sh" "$out"
part inductor16 400 python3 scripts/bench_train.py --work /tmp/bench --compile --batches 16 --lever-batches 16 --cli-steps 0 \
  --json "$out/inductor16.json" --variants "compile + graph, 1x1 conv as matmul;compile + graph, 1x1 conv as matmul, coordinate descent"
cat "$out/status.txt"
