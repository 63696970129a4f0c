#!/usr/bin/env bash
# The GPU session's benchmark calls (issue 5), as run through the device tool on the lent H100.
# Usage: bash scripts/gpu_bench.sh OUT_DIR [train|compile|compile16|generate|profile|kernels|trace|sdxl-steps|sdxl-cli|sdxl-generate|looks-build]...
# looks-build (issue 15) is one device call of its own on one H200: the whole `--world looks` build, capped so the call ends
# within ~9.5 minutes (LOOKS_BUDGET_MINUTES of build after the imports, 60 s of it kept for saving and evaluating), its
# folder tarred and split into 15 MiB parts (files come back 16 MiB at most): cat looks-base.tgz.part-* | tar -xz
# Device call: run(command="bash scripts/gpu_bench.sh $OUT looks-build", carry=[".whl"], timeout_s=600). Step counts are an
# ESTIMATE (no GPU run yet): FLOPs counted on a CPU (UNet 4.8 GFLOP forward a sample, ~14.7 train with the text encoder;
# VAE 11.2), the old tiny VAE's 20.6 it/s and UNet's 2.5-4.5 it/s on H100/H200, and 14 ms a render per core spread
# over 15 workers: renders ~45 s, VAE 2 min (~1,500-2,400 steps at batch 128), checker ~1 min, UNet what the budget
# leaves (~3.5-4 min: ~450-700 steps at batch 1024), eval ~30 s. build_log.json records what really ran.
# Measured 2026-12-03 (H200): renders 66-76 s, VAE 121 s, checker 28 s, UNet 2.0 it/s at batch 1024 (3.5 it/s at 512,
# channels_last): the UNet gets ~3 of the call's 8 minutes. A further call continues it on the same renders (the base
# carried back in: the tree is 64 MiB at most, so leave sdlora/assets/tiny*-base out of the index for that call):
#   LOOKS_ARGS="--stage unet --init-from /tmp/looks-base --unet-batch 512 --unet-channels-last" (after copying it to /tmp/looks-base)
# (issue 16's SDXL parts take minutes each: sdxl-steps and sdxl-cli are meant for separate device calls, the second
# reading the first one's bench-train-sdxl.json from SDXL_BARE_JSON, a path in the working tree)
# Env: TRAIN_VARIANTS (bench_train --variants), GEN_MODES, GEN_TARGETS, GEN_REPEATS, GEN_INTERLEAVE (bench_generate).
# Needs diffusers on the GPU machine: the wheels in .whl/ are installed into /tmp/site first.
set -u
out=$1; shift
. "$(dirname "$0")/gpu_env.sh" "$out"
for what in "$@"; do
  case $what in
    train) python3 scripts/bench_train.py --work /tmp/bench --variants "${TRAIN_VARIANTS:-all}" --json "$out/bench-train.json" \
             > "$out/bench-train.log" 2>&1 ;;
    compile) python3 scripts/bench_train.py --work /tmp/bench --variants "compile + graph" --compile --lever-batches 1,16,4 \
               --cli-steps 0 --json "$out/bench-compile.json" > "$out/bench-compile.log" 2>&1 ;;
    compile16) python3 scripts/bench_train.py --work /tmp/bench --variants "compile + graph; compile + graph, channels_last on" \
                 --compile --batches 16 --lever-batches 16 --cli-steps 0 --json "$out/bench-compile16.json" > "$out/bench-compile16.log" 2>&1 ;;
    kernels) python3 scripts/profile_step_kernels.py --work /tmp/bench --json "$out/profile-kernels.json" > "$out/profile-kernels.log" 2>&1 ;;
    trace) for c in 0 1 2; do  # one fresh process per case
             python3 scripts/trace_graph_memory.py --work /tmp/bench --case $c --json "$out/trace-graph-memory-$c.json" > "$out/trace-graph-memory-$c.log" 2>&1
           done ;;
    sdxl-steps) python3 scripts/bench_train.py --family sdxl --work /tmp/bench --parts baseline,sdlora \
                  --json "$out/bench-train-sdxl.json" > "$out/bench-train-sdxl.log" 2>&1 ;;
    sdxl-cli) python3 scripts/bench_train.py --family sdxl --work /tmp/bench --parts cli --loss-steps "${SDXL_LOSS_STEPS:-200}" \
                --bare-json "${SDXL_BARE_JSON:-$out/bench-train-sdxl.json}" --json "$out/bench-train-sdxl-cli.json" > "$out/bench-train-sdxl-cli.log" 2>&1 ;;
    sdxl-generate) python3 scripts/bench_generate.py --family sdxl --work /tmp/bench --repeats "${GEN_REPEATS:-3}" \
                     --interleave "${GEN_INTERLEAVE:-0}" --json "$out/bench-generate-sdxl.json" > "$out/bench-generate-sdxl.log" 2>&1 ;;
    profile) python3 scripts/profile_step_memory.py --work /tmp/bench --json "$out/profile-memory.json" > "$out/profile-memory.log" 2>&1 ;;
    generate) python3 scripts/bench_generate.py --work /tmp/bench --modes "${GEN_MODES:-graph,eager}" \
                --targets "${GEN_TARGETS:-cross-attn,all-linear}" --repeats "${GEN_REPEATS:-5}" --interleave "${GEN_INTERLEAVE:-0}" --json "$out/bench-generate.json" > "$out/bench-generate.log" 2>&1 ;;
    looks-build) PYTHONUNBUFFERED=1 python3 scripts/build_tiny_base.py --world looks --out /tmp/looks-base \
                   --vae-minutes "${LOOKS_VAE_MINUTES:-2}" --unet-minutes "${LOOKS_UNET_MINUTES:-60}" \
                   --budget-minutes "${LOOKS_BUDGET_MINUTES:-8.4}" --render-cache /tmp/looks-renders ${LOOKS_ARGS:-} > "$out/looks-build.log" 2>&1
                 rc=$?; cp /tmp/looks-base/build_log.json "$out/" 2>/dev/null
                 tar -C /tmp -cz looks-base | split -b 15M -d - "$out/looks-base.tgz.part-"; (exit $rc) ;;
  esac
  echo "$what exit $?" >> "$out/status.txt"
done
