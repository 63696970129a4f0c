#!/bin/bash
# Issue 16's remaining H200 measurements in one device call (~9.5 min), most wanted first, each part capped:
# the batched strength change on SDXL, SDXL generation with 3 unfused LoRAs (repeats + interleaved rounds),
# the whole CLI with the 200-step bf16 vs --fp8-base loss curves, then SDXL batch-4 step rows.
#   run(command="bash scripts/gpu_issue16.sh $OUT", carry=[".whl"], timeout_s=600)
set -u
out=$1
. "$(dirname "$0")/gpu_env.sh" "$out"
part bench-strength-sdxl 70 python3 scripts/bench_strength.py --family sdxl --device cuda --repeats 7 --work /tmp/bs \
  --json "$out/bench-strength-sdxl.json"
part bench-generate-sdxl 150 python3 scripts/bench_generate.py --family sdxl --work /tmp/bench --repeats 3 --interleave 2 \
  --json "$out/bench-generate-sdxl.json"
part bench-train-sdxl-cli 200 python3 scripts/bench_train.py --family sdxl --work /tmp/bench --parts cli --cli-steps 50 \
  --loss-steps 200 --bare-json benchmarks/2026-12-02-h200-bench-train-sdxl.json --json "$out/bench-train-sdxl-cli.json"
part bench-train-sdxl-b4 "${B4_LIMIT:-140}" python3 scripts/bench_train.py --family sdxl --work /tmp/bench --parts baseline,sdlora \
  --batches 4 --lever-batches 4 --variants "sdlora (default);sdlora + grad checkpointing" --steps 10 --warmup 3 --json "$out/bench-train-sdxl-b4.json"
cat "$out/status.txt"
