"""Issue 5: the diffusers+peft LoRA training step vs sdlora's, side by side, in one process and one run.

(a) baseline: SD1.5-architecture UNet (random weights, bf16), peft LoRA rank 4 on attention q/k/v/out, fp32 LoRA
    params, autocast bf16, SDPA, fused AdamW, stepped eagerly (as in ../shared/docs/measurements.md);
(b) sdlora: the TrainStep that `sdlora train` builds (sdlora.training.build_train_step), default targets, text-encoder
    LoRA on, cached latents and token ids; plus one row per speed lever.
Each case: warm-up steps, then the median of --steps steps timed with CUDA events; peak = max_memory_allocated
with only that case's model resident. Then the whole `sdlora train` CLI runs --cli-steps steps on a small dataset.

GPU:  python scripts/bench_train.py --json benchmarks/bench-train.json [--compile]
      python scripts/bench_train.py --family sdxl --json benchmarks/bench-train-sdxl.json   (scripts/bench_train_sdxl.py)
CPU smoke test (tests/test_bench_scripts.py): --small --device cpu --batches 1 --steps 2 --warmup 1 --cli-steps 3
"""

from __future__ import annotations

import argparse
import contextlib
import json
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch._inductor.config  # the "inductor" levers patch it
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from bench_util import (  # noqa: E402,F401 - scripts/ is on the path above; other scripts import these from here
    DriverPeak,
    driver_view,
    environment,
    free,
    loaded_random_base,
    native_size,
    random_base,
    sync,
    xformers_status,
)

# name -> TrainConfig overrides; the first is sdlora's default configuration.
VARIANTS = {
    "sdlora (default)": {},
    "eager, autocast (issue-2 step)": {"cuda_graph": False, "autocast_bf16_weights": True, "channels_last": "off"},
    "eager, bf16 weights": {"cuda_graph": False, "channels_last": "off"},
    "graph, autocast": {"autocast_bf16_weights": True, "channels_last": "off"},
    "graph, channels_last off": {"channels_last": "off"},
    "graph, channels_last on": {"channels_last": "on"},
    "graph + cuDNN attention": {"sdpa_backend": "cudnn"},
    "graph + efficient attention": {"sdpa_backend": "efficient"},
    "graph + grad checkpointing": {"gradient_checkpointing": True},
    "graph + grad checkpointing, frozen TE": {"gradient_checkpointing": True, "text_encoder": False},
    "eager + grad checkpointing, frozen TE": {"gradient_checkpointing": True, "text_encoder": False, "cuda_graph": False},
    "graph + grad checkpointing, frozen TE, channels_last off": {"gradient_checkpointing": True, "text_encoder": False, "channels_last": "off"},
}
COMPILE_VARIANTS = {"compile + graph": {"compile": "on"}, "compile + graph, channels_last off": {"compile": "on", "channels_last": "off"},
                    "compile + graph, channels_last on": {"compile": "on", "channels_last": "on"},
                    # "inductor": torch._inductor.config options while the case compiles (levers not in the product)
                    "compile + graph, 1x1 conv as matmul": {"compile": "on", "inductor": {"conv_1x1_as_mm": True}},
                    "compile + graph, 1x1 conv as matmul, coordinate descent": {
                        "compile": "on", "inductor": {"conv_1x1_as_mm": True, "coordinate_descent_tuning": True}}}


def time_steps(step, device: torch.device, warmup: int, steps: int) -> dict:
    """Warm-up (compilation, capture) timed on its own, then the median of per-step times."""
    t = time.perf_counter()
    for _ in range(warmup):
        step()
    sync(device)
    warm_s = time.perf_counter() - t
    warm_peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)  # the steady-state peak, apart from warm-up transients
    times = []
    t_all = time.perf_counter()
    if device.type == "cuda":
        ev = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(steps)]
        for a, b in ev:
            a.record()
            step()
            b.record()
        sync(device)
        times = [a.elapsed_time(b) for a, b in ev]
    else:
        for _ in range(steps):
            s = time.perf_counter()
            step()
            times.append((time.perf_counter() - s) * 1000)
    wall_ms = (time.perf_counter() - t_all) * 1000 / steps
    steady = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    peak = max(warm_peak, steady) if device.type == "cuda" else None
    return {"ms": statistics.median(times), "wall_ms": wall_ms, "warmup_s": warm_s, "peak_gib": peak, "steady_peak_gib": steady,
            "resident_gib": torch.cuda.memory_allocated(device) / 2**30 if device.type == "cuda" else None, **driver_view(device)}


def unet_inputs(unet, batch: int, latent: int, device: torch.device, g: torch.Generator | None = None) -> dict:
    """Random conditioning of the UNet's shape: context, plus SDXL's pooled embedding and time ids (text_time)."""
    c = unet.config
    out = {"encoder_hidden_states": torch.randn(batch, 77, c.cross_attention_dim, device=device, generator=g, dtype=unet.dtype)}
    if c.addition_embed_type == "text_time":
        pooled = c.projection_class_embeddings_input_dim - 6 * c.addition_time_embed_dim
        px = latent * 8
        out["added_cond_kwargs"] = {"text_embeds": torch.randn(batch, pooled, device=device, generator=g, dtype=unet.dtype),
                                    "time_ids": torch.tensor([[px, px, 0, 0, px, px]] * batch, device=device, dtype=unet.dtype)}
    return out


def unet_flops(unet, batch: int, latent: int, device: torch.device) -> float:
    """Forward FLOPs of one image (torch's FlopCounterMode), the basis of the roofline."""
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.randn(batch, 4, latent, latent, device=device, dtype=unet.dtype)
    cond = unet_inputs(unet, batch, latent, device)
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        unet(x, torch.tensor([500] * batch, device=device), **cond)
    return fc.get_total_flops() / batch


def matmul_rate(device: torch.device) -> float:
    """Sustained bf16 matmul FLOP/s (8192^3 on a GPU)."""
    n = 8192 if device.type == "cuda" else 512
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    sync(device)
    reps = 20 if device.type == "cuda" else 2
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    sync(device)
    return 2 * n**3 * reps / (time.perf_counter() - t)


def bench_baseline(folder: Path, batch: int, latent: int, device: torch.device, warmup: int, steps: int,
                   checkpointing: bool = False) -> dict:
    """The diffusers example's step (train_text_to_image_lora[_sdxl].py), optionally with gradient checkpointing."""
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from peft import LoraConfig

    unet = UNet2DConditionModel.from_pretrained(folder / "unet", torch_dtype=torch.bfloat16).to(device)
    unet.requires_grad_(False)
    if checkpointing:
        unet.enable_gradient_checkpointing()
        unet.train()
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian", target_modules=["to_k", "to_q", "to_v", "to_out.0"]))
    params = [p for p in unet.parameters() if p.requires_grad]
    for p in params:
        p.data = p.data.float()  # fp32 LoRA params, as diffusers' cast_training_params does
    opt = torch.optim.AdamW(params, lr=1e-4, fused=device.type == "cuda")
    sched = DDPMScheduler.from_config(DDPMScheduler.load_config(folder / "scheduler"))
    g = torch.Generator(device).manual_seed(0)
    latents = torch.randn(batch, 4, latent, latent, device=device, generator=g)
    cond = unet_inputs(unet, batch, latent, device, g)

    def step():
        noise = torch.randn_like(latents)
        t = torch.randint(0, 1000, (batch,), device=device)
        noisy = sched.add_noise(latents, noise, t)
        with torch.autocast(device.type, torch.bfloat16):
            pred = unet(noisy.to(torch.bfloat16), t, **cond).sample
        F.mse_loss(pred.float(), noise.float()).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    free(device)
    r = time_steps(step, device, warmup, steps)
    modules = sum(1 for n, _ in unet.named_modules() if n.endswith(".lora_A"))
    return {"case": "diffusers+peft eager" + (", grad checkpointing" if checkpointing else ""), "batch": batch, **r,
            "lora_modules": modules}


@contextlib.contextmanager
def sdlora_case(base, folder: Path, work: Path, overrides: dict, batch: int, latent: int, device: torch.device, total_steps: int):
    """sdlora's step as `sdlora train` builds it, on fixed inputs; yields (step, micro-batch, config, modules) and
    undoes the case's changes to the shared model afterwards (its graphs and optimizer go with the caller's frame)."""
    from accelerate import Accelerator

    from sdlora.lora.inject import inject_lora, trainable_parameters
    from sdlora.training.conditioning import Conditioning
    from sdlora.training.config import apply_base_defaults, make_config
    from sdlora.training.setup import build_train_step, make_optimizer, pick_precisions, use_cuda_graph
    from sdlora.training.step import MicroBatch

    cfg = apply_base_defaults(make_config(None, base=str(folder), images=str(work), rank=4, batch_size=batch,
                                          device=device.type, **overrides), base.path)
    mp, _ = pick_precisions(cfg, device)
    accelerator = Accelerator(mixed_precision=mp, cpu=device.type == "cpu")
    # a fresh adapter each case
    if cfg.fp8_base and not getattr(base, "fp8_done", False):  # irreversible on the shared base: fp8 cases run last
        from sdlora.training.setup import place_unet

        place_unet(base, device, True, print)
        base.fp8_done = True
    unet_hosts, te_hosts = inject_lora(base.unet, base.text_encoders, base.family.te_prefixes, cfg.network(), cfg.seed,
                                       names=base.family.names)
    unet_params, te_params = trainable_parameters(unet_hosts), trainable_parameters(te_hosts)
    opt = accelerator.prepare(make_optimizer(cfg, unet_params, te_params, device, use_cuda_graph(cfg, device, mp)))
    g = torch.Generator(device).manual_seed(0)
    latents = torch.randn(batch, 4, latent, latent, device=device, generator=g)
    noise = torch.randn(batch, 4, latent, latent, device=device, generator=g)
    t = torch.randint(0, 1000, (batch,), device=device, generator=g)
    captions = [f"sks sketch, a small red circle number {i}" for i in range(batch)]
    px = latent * 8
    sizes = [((px, px), (0, 0), (px, px))] * batch  # SDXL's time ids; other families ignore them
    # as `sdlora train`: a trainable text encoder keeps only the captions' token rows on the device; a frozen
    # one is run once, its embeddings cached, and it leaves the GPU
    cond = Conditioning(base, sorted(set(captions)), [], cfg.text_encoder, device)
    try:
        step = build_train_step(base, cfg, unet_params + te_params, opt, accelerator, mp, cond.encode, total_steps, print)
        yield step, MicroBatch(latents, noise, t, cond.inputs(captions, sizes)), cfg, len(unet_hosts) + len(te_hosts)
    finally:
        cond.close()
        for te in base.text_encoders.values():
            te.to(device)
            te.gradient_checkpointing_disable()
        base.unet.disable_gradient_checkpointing()
        base.unet.to(memory_format=torch.contiguous_format)
        if cfg.compile == "on":
            torch._dynamo.reset()  # the next case compiles afresh (inductor's disk cache still serves equal graphs)


def bench_sdlora(base, folder: Path, work: Path, name: str, overrides: dict, batch: int, latent: int,
                 device: torch.device, warmup: int, steps: int) -> dict:
    free(device)
    before = torch.cuda.memory_allocated(device) / 2**30 if device.type == "cuda" else None  # shows what earlier cases left
    overrides = dict(overrides)
    inductor = overrides.pop("inductor", {})
    with (torch._inductor.config.patch(**inductor),
          sdlora_case(base, folder, work, overrides, batch, latent, device, warmup + steps) as (step, mb, cfg, modules)):
        free(device)
        r = time_steps(lambda: step([mb]), device, warmup, steps)
        graphs = len(step.graphs)
    return {"case": name, "batch": batch, **r, "resident_before_gib": before, "cuda_graph": graphs > 0,
            "lora_modules": modules, "targets": cfg.targets, "text_encoder_lora": cfg.text_encoder,
            "fp8_base": cfg.fp8_base}


def profiling_args(doc: str) -> argparse.ArgumentParser:
    """The options every profiling script takes (--json, --device, --small, --work); each adds its own."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", required=True)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--small", action="store_true", help="a tiny model of the same layout (CPU smoke test)")
    ap.add_argument("--work", help="working folder (default: a temporary one)")
    return ap


def profiling_setup(args: argparse.Namespace, prefix: str):
    """(device, work, base, folder, latent side) from profiling_args' options."""
    device = torch.device(args.device)
    work = Path(args.work or tempfile.mkdtemp(prefix=prefix))
    return (device, work, *loaded_random_base(work, device, args.small))


def bench_cli(folder: Path, work: Path, steps: int, resolution: int, device: torch.device, extra: list[str],
              images_count: int = 16, out_name: str = "cli-out") -> dict:
    """The whole `sdlora train` command: data, caching, loop, logging, saving; its peak as torch and the driver saw it."""
    from sdlora.eval.datasets import write_dataset

    images = work / f"cli-images-{images_count}-{resolution}"
    if not images.exists():
        write_dataset("sketch", images_count, resolution, 0, images, "")
    cmd = [sys.executable, "-m", "sdlora.cli.main", "train", "--base", str(folder), "--images", str(images), "--trigger", "sks sketch",
           "--rank", "4", "--steps", str(steps), "--batch-size", "1", "--resolution", str(resolution), "--device", device.type,
           "--output", str(work / out_name), "--overwrite", "--no-progress", *extra]
    t = time.perf_counter()
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT) as p:
        with DriverPeak(p.pid, device) as driver:
            _, stderr = p.communicate()
    wall = time.perf_counter() - t
    if p.returncode:
        raise SystemExit(f"sdlora train failed:\n{stderr[-3000:]}")
    its = re.search(r"([\d.]+) it/s", stderr)
    peak = re.search(r"peak VRAM ([\d.]+) GiB", stderr)
    return {"case": "sdlora train CLI" + (" " + " ".join(extra) if extra else ""), "batch": 1, "steps": steps, "wall_s": wall,
            "it_per_s": float(its.group(1)) if its else None, "peak_gib": float(peak.group(1)) if peak else None,
            **driver.result(), "command": " ".join(cmd[1:]), "output": str(work / out_name)}


def table(rows: list[dict], roof_img_s: float) -> str:
    """Markdown rows; a checkpointed case is compared with the checkpointed baseline where there is one."""
    base = {(r["batch"], "checkpointing" in r["case"]): r for r in rows if r["case"].startswith("diffusers+peft eager")}
    out = ["| case | batch | step ms | img/s | peak GiB | % roofline | vs baseline | warm-up s |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "ms" not in r:
            continue
        img_s = r["batch"] * 1000 / r["ms"]
        b = base.get((r["batch"], "checkpointing" in r["case"])) or base.get((r["batch"], False))
        ratio = f"{b['ms'] / r['ms']:.2f}x" if b else "-"
        peak = f"{r['peak_gib']:.2f}" if r.get("peak_gib") is not None else "-"
        out.append(f"| {r['case']} | {r['batch']} | {r['ms']:.1f} | {img_s:.1f} | {peak} | {100 * img_s / roof_img_s:.1f}% | {ratio} | {r['warmup_s']:.1f} |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", required=True, help="where to write every measurement")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--small", action="store_true", help="a tiny model of the same layout (CPU smoke test)")
    ap.add_argument("--family", default="sd15", choices=["sd15", "sdxl"], help="sdxl: 1024 px, scripts/bench_train_sdxl.py")
    ap.add_argument("--batches", help="default 1,4,16 (SDXL: 1,4)")
    ap.add_argument("--steps", type=int, default=20, help="timed steps per case (median reported)")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--variants", default="all", help="variant names separated by ';' (names hold commas), 'all', or 'default'")
    ap.add_argument("--compile", action="store_true", help="also time torch.compile variants (minutes of compilation)")
    ap.add_argument("--lever-batches", help="batch sizes for the lever rows (the default row uses --batches); default "
                    "1,4,16 (SDXL: 1)")
    ap.add_argument("--cli-steps", type=int, help="steps of the whole-CLI run(s), 0 to skip (default 100; SDXL: 50)")
    ap.add_argument("--cli-images", type=int, help="images in the CLI's data set (default 16; SDXL: 8)")
    ap.add_argument("--loss-steps", type=int, default=0, help="SDXL: also train N steps with and without --fp8-base "
                    "(same seed) and compare the loss curves")
    ap.add_argument("--parts", default="baseline,sdlora,cli", help="SDXL: which parts run (split a long run over calls)")
    ap.add_argument("--bare-json", help="SDXL: an earlier run's JSON holding the bare steps the CLI runs are compared with")
    ap.add_argument("--work", help="working folder (default: a temporary one)")
    args = ap.parse_args(argv)
    sdxl = args.family == "sdxl"
    for key, sd15, xl in (("batches", "1,4,16", "1,4"), ("lever_batches", "1,4,16", "1"), ("cli_steps", 100, 50),
                          ("cli_images", 16, 8)):
        if getattr(args, key) is None:
            setattr(args, key, xl if sdxl else sd15)
    if sdxl:
        from bench_train_sdxl import run_sdxl

        return run_sdxl(args, argv)
    device = torch.device(args.device)
    env = environment(device, argv)
    if device.type == "cuda":
        env["xformers"] = xformers_status()
    print(json.dumps(env), flush=True)
    work = Path(args.work or tempfile.mkdtemp(prefix="bench-train-"))
    folder = random_base(work, device, args.small)
    resolution = 64 if args.small else 512
    latent = resolution // 8
    results: dict = {"env": env, "rows": []}

    def record(r: dict) -> None:
        results["rows"].append(r)
        print(json.dumps(r), flush=True)
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")

    from diffusers import UNet2DConditionModel

    probe = UNet2DConditionModel.from_pretrained(folder / "unet", torch_dtype=torch.bfloat16).to(device)
    fwd = unet_flops(probe, 1, latent, device)
    del probe
    free(device)
    rate = matmul_rate(device)
    roof = rate / (2 * fwd)  # forward + input-backward per image, at the measured matmul rate
    results["roofline"] = {"unet_forward_flop_per_image": fwd, "bf16_matmul_flop_per_s": rate, "img_per_s": roof}
    print(json.dumps(results["roofline"]), flush=True)

    batches = [int(b) for b in args.batches.split(",")]
    lever_batches = [int(b) for b in args.lever_batches.split(",")]
    for b in batches:
        record(bench_baseline(folder, b, latent, device, args.warmup, args.steps))
    variants = dict(VARIANTS) | (COMPILE_VARIANTS if args.compile else {})
    if args.variants == "default":
        variants = {"sdlora (default)": {}}
    elif args.variants != "all":
        variants = {k: v for k, v in variants.items() if k in [n.strip() for n in args.variants.split(";")]}
    base, _, _ = loaded_random_base(work, device, args.small)  # as in training: latents cached, VAE off the device
    for name, overrides in variants.items():
        if device.type != "cuda" and overrides.get("sdpa_backend"):
            continue  # GPU attention kernels
        for b in batches if name == "sdlora (default)" else lever_batches:
            record(bench_sdlora(base, folder, work, name, overrides, b, latent, device, args.warmup, args.steps))
    del base
    free(device)
    if args.cli_steps:
        r = bench_cli(folder, work, args.cli_steps, resolution, device, [], args.cli_images)
        bare = next((x for x in results["rows"] if x["case"] == "sdlora (default)" and x["batch"] == 1), None)
        if bare and r["it_per_s"]:
            r["fraction_of_bare_step"] = r["it_per_s"] * bare["ms"] / 1000
        record(r)
    results["table"] = table(results["rows"], roof)
    Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    print(results["table"])
    for r in results["rows"]:
        if "it_per_s" in r:
            print(f"{r['case']}: {r['it_per_s']} it/s over {r['steps']} steps, {r.get('fraction_of_bare_step', 0):.2f} of the bare "
                  f"step rate, whole-run peak {r['peak_gib']} GiB, {r['wall_s']:.0f} s wall")
    return results


if __name__ == "__main__":
    main()
