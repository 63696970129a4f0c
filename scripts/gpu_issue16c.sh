#!/usr/bin/env bash
# Issue 16 on one H200 (~8 min after start-up): SD1.5 512 px batch 16, the levers left after whole-UNet compile —
# cuDNN's algorithm timing (now on by default; its "off" rows are the control), compiling block by block (shorter
# compile: one graph per block shape), and inductor's 1x1-conv-as-matmul — then the two compile scopes again in a
# second process, where inductor's on-disk cache is warm (the compile time a re-run pays).
#   run(command="bash scripts/gpu_issue16c.sh $OUT", carry=[".whl"], timeout_s=600)
# It ran at commit 3e8f136, which had the --cudnn-benchmark and --compile-scope blocks levers; neither bought anything
# (BENCHMARKS.md, 2026-12-04) and both left the product after it: check out 3e8f136 to run this again.
set -u
out=$1
. "$(dirname "$0")/gpu_env.sh" "$out"
common=(--work /tmp/bench --compile --batches 16 --lever-batches 16 --cli-steps 0)
part levers16 400 python3 scripts/bench_train.py "${common[@]}" --json "$out/levers16.json" --variants \
  "sdlora (default);graph, cuDNN benchmark off;compile + graph;compile + graph, cuDNN benchmark off;compile blocks + graph;compile + graph, 1x1 conv as matmul;compile blocks + graph, 1x1 conv as matmul"
part warm16 150 python3 scripts/bench_train.py "${common[@]}" --json "$out/warm16.json" --variants "compile blocks + graph;compile + graph"
cat "$out/status.txt"
