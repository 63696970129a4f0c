#!/bin/bash
# Issue 16 on one H200, one device call (~8 min): the batched strength change on SDXL re-measured after the one-copy-
# per-refresh change, then SD1.5 512 px with torch.compile at batch 1 and 16 beside the default and the baseline.
#   run(command="bash scripts/gpu_issue16b.sh $OUT", carry=[".whl"], timeout_s=600)
set -u
out=$1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader > "$out/gpu.txt"
part() { local name=$1 limit=$2; shift 2; timeout "$limit" "$@" > "$out/$name.log" 2>&1; echo "$name exit $?" >> "$out/status.txt"; }
part bench-strength-sdxl 90 python3 scripts/bench_strength.py --family sdxl --device cuda --repeats 7 --work /tmp/bs \
  --json "$out/bench-strength-sdxl.json"
part bench-compile-sd15 "${COMPILE_LIMIT:-450}" python3 scripts/bench_train.py --work /tmp/bench --compile \
  --variants "sdlora (default);compile + graph" --batches 1,16 --lever-batches 1,16 --cli-steps 0 \
  --json "$out/bench-compile-sd15.json"
cat "$out/status.txt"
