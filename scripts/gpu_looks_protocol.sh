#!/bin/bash
# Issue 15's protocol (scripts/eval_styles.py) on one GPU host: one process per held-out look (LOOK_GROUPS: looks per
# process, ";"-separated), every look judged by CHECKER (default: the base's own); the pastel+sketch process also runs
# the mix. Generation runs on the GPU too (eval_styles --device: cuda when there is one). Each process's log and JSON
# are written straight to OUT, so a call cut at its limit still returns every run that finished (one JSON line each).
#   run(command="bash scripts/gpu_looks_protocol.sh $OUT", carry=[".whl"], timeout_s=600)
# BASE: the base to measure (default tiny-looks; BASE=tiny for the before table, with CHECKER the looks base's judge);
# PROTO_LIMIT: seconds per process; SEEDS, PROMPTS: the protocol's 0,1,2 and 48 unless set; TRAIN_ARGS: flags over
# the base's defaults (scripts/gpu_looks_tune.sh: the learning rate it picked on the tuning looks, before it ships).
set -u
out=$1
mkdir -p $out
base=${BASE:-tiny-looks}
[ -d /tmp/site/diffusers ] || python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD OMP_NUM_THREADS=1 SDLORA_THREADS=1 PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
nvidia-smi --query-gpu=name --format=csv,noheader > $out/gpu.txt
python3 -c "import torch; print(torch.__version__)" >> $out/gpu.txt
IFS=';' read -ra groups <<< "${LOOK_GROUPS:-pastel,sketch;halftone;neon;stained-glass;chalk;collage;embroidery}"
pids=()
for i in "${!groups[@]}"; do
  timeout ${PROTO_LIMIT:-530} python3 scripts/eval_styles.py --base $base ${CHECKER:+--checker $CHECKER} \
    --looks ${groups[$i]} --seeds ${SEEDS:-0,1,2} --prompts ${PROMPTS:-48} --work /tmp/proto-$base/$i \
    "--train-args=${TRAIN_ARGS:-}" \
    --grids $out/grids --json $out/proto-$i.json > $out/proto-$i.log 2>&1 &
  pids+=($!)
done
for p in "${pids[@]}"; do wait $p; echo "pid $p exit $?" >> $out/status.txt; done
cat $out/status.txt
grep -h '"look"' $out/proto-*.log | cut -c1-400
