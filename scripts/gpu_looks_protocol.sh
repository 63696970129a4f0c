#!/bin/bash
# Issue 15's protocol (scripts/eval_styles.py) on one GPU host, old base and new side by side, 8 processes at once
# (4 per base, two held-out looks each; the pastel+sketch process also runs the mix), all judged by the looks
# base's checker. Meant for the device call right after `gpu_bench.sh OUT looks-build`, on the same warm machine,
# which still holds /tmp/looks-base; BASE=folder to name another. Everything comes back as one tarball.
#   run(command="bash scripts/gpu_looks_protocol.sh $OUT", carry=[".whl"], timeout_s=600)
set -u
out=$1
new=${BASE:-/tmp/looks-base}
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD OMP_NUM_THREADS=2 SDLORA_THREADS=2 PYTHONUNBUFFERED=1
w=/tmp/proto; mkdir -p $w
[ -f $new/unet/config.json ] || { echo "no base at $new"; exit 2; }
# the new base carries tiny's LoRA defaults (not re-tuned on it; see BENCHMARKS)
[ -f $new/sdlora_defaults.json ] || cp sdlora/assets/tiny-base/sdlora_defaults.json $new/
groups=("pastel,sketch" "halftone,neon" "stained-glass,chalk" "collage,embroidery")
pids=()
for tag in new old; do
  base=$new; [ $tag = old ] && base=tiny
  for i in 0 1 2 3; do
    timeout ${PROTO_LIMIT:-530} python3 scripts/eval_styles.py --base $base --checker $new/checker.safetensors \
      --looks ${groups[$i]} --seeds ${SEEDS:-0,1,2} --prompts ${PROMPTS:-48} --work $w/$tag-$i \
      --grids $w/grids-$tag --json $w/$tag-$i.json > $w/$tag-$i.log 2>&1 &
    pids+=($!)
  done
done
for p in "${pids[@]}"; do wait $p; echo "pid $p exit $?" >> $w/status.txt; done
nvidia-smi --query-gpu=name --format=csv,noheader > $w/gpu.txt
tar -C /tmp -cz --exclude='proto/*/data' --exclude='*.safetensors' --exclude='proto/*/*-[0-9]/*' proto > $out/proto.tgz
cat $w/status.txt
grep -h '"look"' $w/*.log | cut -c1-300
