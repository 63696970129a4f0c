"""Issue 16: `scripts/bench_train.py --family sdxl` — SDXL at 1024 px (128x128 latents) on one GPU, in one process.

Rows, each after warm-up as the median of --steps steps, with its peak (torch.cuda.max_memory_allocated over the
case, warm-up and capture included), the allocator's reserved peak and the driver's used memory at its end:
  - the diffusers example's step (train_text_to_image_lora_sdxl.py: random-weight SDXL UNet in bf16, peft rank-4 LoRA
    on to_q/to_k/to_v/to_out.0, fp32 LoRA params, autocast bf16, SDPA, fused AdamW, eager), without and with
    gradient checkpointing, at every --batches size;
  - sdlora's step as `sdlora train` builds it (both text-encoder LoRAs on by default), with checkpointing, with the
    text encoders frozen and cached, and one row per lever (no CUDA graph, channels_last off, cuDNN / flash
    attention, --compile with --compile, --fp8-base); the fp8 rows run last because they convert the shared base.
Between cases the previous case's objects are dropped, the allocator's cache emptied and its peaks reset;
`resident_before_gib` shows what was still allocated when a case began (the shared base's weights, and anything an
earlier case left). % of roofline: the SDXL UNet's forward FLOPs per 1024-px image (FlopCounterMode) x 2 (forward +
input backward) at the bf16 matmul rate measured in the run, as for SD1.5.

Then the whole `sdlora train` CLI on 8 cached 1024-px images, batch 1 (its it/s against the matching bare step, its
whole-run peak from torch and the driver's per-process and device-wide view, sampled while it runs):
  (a) --no-text-encoder --gradient-checkpointing   (text encoders frozen, outputs cached, encoders off the GPU)
  (b) --gradient-checkpointing                    (both text-encoder LoRAs on)
  (c) --no-text-encoder --gradient-checkpointing --fp8-base
and the loss curves of (a) and (c) (same seed and data, --loss-steps long when given) side by side.

GPU (an H200, estimated: writing the 7 GB random base ~1 min, baselines ~3 min, sdlora rows ~3 min, CLI ~3 min; over
10 minutes in all, so `--parts` splits it, the CLI part reading the bare steps it is compared with from --bare-json):
  python scripts/bench_train.py --family sdxl --work /tmp/bench --parts baseline,sdlora --json OUT/bench-train-sdxl.json
  python scripts/bench_train.py --family sdxl --work /tmp/bench --parts cli --loss-steps 200 \
      --bare-json OUT/bench-train-sdxl.json --json OUT/bench-train-sdxl-cli.json
CPU smoke test: --family sdxl --small --device cpu --steps 2 --warmup 1 --cli-steps 3
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

import torch
from bench_train import (
    bench_baseline,
    bench_cli,
    bench_sdlora,
    environment,
    free,
    loaded_random_base,
    matmul_rate,
    native_size,
    random_base,
    table,
    unet_flops,
    xformers_status,
)

CKPT_FROZEN = "sdlora + grad checkpointing, frozen TE"
FP8_CKPT_FROZEN = "fp8 base + grad checkpointing, frozen TE"
MAIN = {  # at every --batches size
    "sdlora (default)": {},
    "sdlora + grad checkpointing": {"gradient_checkpointing": True},
    CKPT_FROZEN: {"gradient_checkpointing": True, "text_encoder": False},
}
LEVERS = {  # at --lever-batches
    "sdlora, frozen TE": {"text_encoder": False},
    "sdlora, the baseline's modules (attn1+attn2 q/k/v/out), frozen TE": {"targets": "attn", "text_encoder": False},
    "eager (no CUDA graph)": {"cuda_graph": False},
    "channels_last off": {"channels_last": "off"},
    "cuDNN attention": {"sdpa_backend": "cudnn"},
    "flash attention": {"sdpa_backend": "flash"},
}
COMPILE = {"compile on": {"compile": "on"}}
FP8 = {  # last: they store the shared base's UNet in fp8 for good
    "fp8 base": {"fp8_base": True},
    FP8_CKPT_FROZEN: {"fp8_base": True, "gradient_checkpointing": True, "text_encoder": False},
}
CLI = {  # label -> (flags, the bare step it is compared with)
    "a": (["--no-text-encoder", "--gradient-checkpointing"], CKPT_FROZEN),
    "b": (["--gradient-checkpointing"], "sdlora + grad checkpointing"),
    "c": (["--no-text-encoder", "--gradient-checkpointing", "--fp8-base"], FP8_CKPT_FROZEN),
}


def variants(args: argparse.Namespace) -> list[tuple[str, dict, list[int]]]:
    """(name, overrides, batch sizes) in the order they run, filtered by --variants."""
    batches = [int(b) for b in args.batches.split(",")]
    levers = [int(b) for b in args.lever_batches.split(",")]
    rows = [(n, o, batches) for n, o in MAIN.items()]
    rows += [(n, o, levers) for n, o in (LEVERS | (COMPILE if args.compile else {}) | FP8).items()]
    if args.device != "cuda":
        rows = [r for r in rows if not r[1].get("sdpa_backend")]  # GPU attention kernels
    if args.variants == "default":
        return rows[:1]
    if args.variants != "all":
        wanted = [n.strip() for n in args.variants.split(";")]
        rows = [r for r in rows if r[0] in wanted]
    return rows


def losses(run_dir: str) -> list[float]:
    return [json.loads(line)["loss"] for line in (Path(run_dir) / "train_log.jsonl").read_text().splitlines()]


def compare_losses(bf16: dict, fp8: dict) -> dict:
    """The per-step losses of two runs that differ only in --fp8-base (same seed, data, noise and timesteps)."""
    a, b = losses(bf16["output"]), losses(fp8["output"])
    n = min(len(a), len(b))
    tail = max(1, n // 4)
    diffs = [abs(x - y) for x, y in zip(a[:n], b[:n])]
    return {"case": "loss: --fp8-base against bf16 (runs a and c)", "steps": n, "bf16_mean": statistics.fmean(a[:n]),
            "fp8_mean": statistics.fmean(b[:n]), "bf16_last_quarter_mean": statistics.fmean(a[n - tail:n]),
            "fp8_last_quarter_mean": statistics.fmean(b[n - tail:n]), "mean_abs_step_diff": statistics.fmean(diffs),
            "max_abs_step_diff": max(diffs), "relative_diff_of_means": statistics.fmean(b[:n]) / statistics.fmean(a[:n]) - 1,
            "bf16_losses": a[:n], "fp8_losses": b[:n]}


def run_sdxl(args: argparse.Namespace, argv: list[str] | None) -> dict:
    device = torch.device(args.device)
    env = environment(device, argv) | {"family": "sdxl"}
    if device.type == "cuda":
        env["xformers"] = xformers_status()
    print(json.dumps(env), flush=True)
    parts = set(args.parts.split(","))
    work = Path(args.work or tempfile.mkdtemp(prefix="bench-train-sdxl-"))
    folder = random_base(work, device, args.small, "sdxl")
    resolution = native_size("sdxl", args.small)
    latent = resolution // 8
    results: dict = {"env": env, "rows": []}

    def record(r: dict) -> None:
        results["rows"].append(r)
        print(json.dumps({k: v for k, v in r.items() if not k.endswith("_losses")}), flush=True)
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")

    from diffusers import UNet2DConditionModel

    probe = UNet2DConditionModel.from_pretrained(folder / "unet", torch_dtype=torch.bfloat16).to(device)
    fwd = unet_flops(probe, 1, latent, device)
    del probe
    free(device)
    rate = matmul_rate(device)
    roof = rate / (2 * fwd)
    results["roofline"] = {"unet_forward_flop_per_image": fwd, "bf16_matmul_flop_per_s": rate, "img_per_s": roof,
                           "step_floor_ms_batch1": 1000 / roof}
    print(json.dumps(results["roofline"]), flush=True)

    if "baseline" in parts:
        for b in [int(x) for x in args.batches.split(",")]:
            for ckpt in (False, True):
                record(bench_baseline(folder, b, latent, device, args.warmup, args.steps, checkpointing=ckpt))
                free(device)
    if "sdlora" in parts:
        base, _, _ = loaded_random_base(work, device, args.small, "sdxl")
        for name, overrides, batches in variants(args):
            for b in batches:
                record(bench_sdlora(base, folder, work, name, overrides, b, latent, device, args.warmup, args.steps))
        del base
        free(device)
    if "cli" in parts and args.cli_steps:
        earlier = json.loads(Path(args.bare_json).read_text())["rows"] if args.bare_json else []
        bare = {r["case"]: r for r in earlier + results["rows"] if r.get("batch") == 1 and "ms" in r}
        runs = {}
        for label, (flags, bare_case) in CLI.items():
            steps = args.loss_steps if args.loss_steps and label in "ac" else args.cli_steps
            r = bench_cli(folder, work, steps, resolution, device, ["--seed", "0", *flags], args.cli_images,
                          f"cli-out-{label}")
            r["case"] = f"({label}) " + r["case"]
            if bare_case in bare and r["it_per_s"]:
                r["bare_case"], r["fraction_of_bare_step"] = bare_case, r["it_per_s"] * bare[bare_case]["ms"] / 1000
            runs[label] = r
            record(r)
        record(compare_losses(runs["a"], runs["c"]))
    results["table"] = table(results["rows"], roof)
    Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    print(results["table"])
    for r in results["rows"]:
        if "it_per_s" in r:
            print(f"{r['case']}: {r['it_per_s']} it/s over {r['steps']} steps, {r.get('fraction_of_bare_step') or 0:.2f} of "
                  f"the bare step rate, whole-run peak {r['peak_gib']} GiB (driver: {r.get('driver_peak_gib_process')} "
                  f"process, {r.get('driver_peak_gib_device_delta')} device), {r['wall_s']:.0f} s wall")
    return results
