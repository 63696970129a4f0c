#!/bin/bash
# Issue 14: tiny-xl trained further, from the shipped weights, in one device call (~9.5 min on one H200):
# the UNet and both text encoders continue from sdlora/assets/tiny-xl-base at a larger batch (the step is bound by
# launch overhead and the EMA update, so a bigger batch is nearly free), then the 200 held-out prompts are judged.
# The folder comes back tarred in 15 MiB parts: cat tiny-xl.tgz.part-* | tar -xz
#   run(command="bash scripts/gpu_tiny_xl_more.sh $OUT", carry=[".whl"], timeout_s=600)
# (the tree sent is 64 MiB at most: leave sdlora/assets/tiny-base out of the index for the call; it is not read)
set -u
out=$1
. "$(dirname "$0")/gpu_env.sh" "$out"
rm -rf /tmp/txl-init /tmp/txl && cp -r sdlora/assets/tiny-xl-base /tmp/txl-init && mkdir -p /tmp/txl
cp -r /tmp/txl-init/vae /tmp/txl-init/build_log.json /tmp/txl-init/sdlora_defaults.json /tmp/txl/
timeout "${TXL_LIMIT:-560}" python3 scripts/build_tiny_base.py --family sdxl --stage unet --out /tmp/txl --init-from /tmp/txl-init \
  --unet-minutes "${TXL_UNET_MINUTES:-6.3}" --unet-batch "${TXL_BATCH:-1024}" --unet-lr "${TXL_LR:-6e-4}" --warmup 50 \
  --unet-images 32000 --workers 16 --seed "${TXL_SEED:-1}" > "$out/tiny-xl-more.log" 2>&1
echo "build exit $?" >> "$out/status.txt"
cp /tmp/txl/build_log.json "$out/" 2>/dev/null; cp /tmp/txl/samples.png "$out/" 2>/dev/null
tar -C /tmp -cz txl | split -b 15M -d - "$out/tiny-xl.tgz.part-"
cat "$out/status.txt"
