#!/bin/bash
# Issue 15's defaults, tuned where the rule allows (never on the held-out looks): each candidate UNet learning rate
# trains one LoRA per tuning look (training looks, which the base can draw, taught under a trigger that does not name
# them: "sks zq"), judged by the protocol's bars; scripts/pick_default.py picks the one meeting the most bars (ties:
# the lower rate), and the held-out protocol (scripts/gpu_looks_protocol.sh) then runs with it. One device call:
#   run(command="bash scripts/gpu_looks_tune.sh $OUT", carry=[".whl"], timeout_s=600)
# LRS, TUNE_LOOKS override the candidates and the tuning looks; CHECKER the judge (default: the base's own).
set -u
out=$1
mkdir -p $out/tune
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD OMP_NUM_THREADS=1 SDLORA_THREADS=1 PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
for lr in ${LRS:-1e-3 2e-3 4e-3}; do
  for look in ${TUNE_LOOKS:-crosshatch watercolour}; do
    timeout ${TUNE_LIMIT:-200} python3 scripts/eval_styles.py --base tiny-looks ${CHECKER:+--checker $CHECKER} --looks $look \
      --seeds 0 --prompts 48 --trigger "sks zq" --mix "" "--train-args=--unet-lr $lr" --work /tmp/tune/$lr-$look \
      --json $out/tune/$lr-$look.json > $out/tune/$lr-$look.log 2>&1 &
  done
done
wait
best=$(python3 scripts/pick_default.py $out/tune/*.json) || exit 1
echo "picked --unet-lr $best on the tuning looks"
TRAIN_ARGS="--unet-lr $best" bash scripts/gpu_looks_protocol.sh $out/proto
