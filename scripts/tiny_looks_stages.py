"""The looks stages of scripts/build_tiny_base.py (`--world looks`, issue 15): a tiny SD1 base that has seen many looks.

Stage `vae`: an AutoencoderKL with 3 levels (4x down: 128-px images <-> 32x32x4 latents, sdlora.models.tiny's
LOOKS_VAE_CONFIG) trained on renders of TRAINING_LOOKS only; its round trip is then measured on renders of EVERY look
(held-out ones too): the hue judge's colour reading per object (sdlora.eval.looks.hue_name) and the error on thin
lines; scaling factor 1 / std of the latents. Then a checker with one sigmoid per look of ALL_LOOKS (single-look
renders and two-look composites passed through the new VAE; scripts/tiny_looks_checker.py) is written to OUT/checker.safetensors with its style
names (never over sdlora/assets/checker.safetensors, the shipped base's judge).
Stage `unet`: LOOKS_UNET_CONFIG (sample_size 32) and a CLIP text encoder (TEXT_CONFIG: the tokenizer and its
49,408-row table kept, so the folder is a plain SD1 diffusers folder) from scratch on TRAINING_LOOKS renders; the
look's words are in --look-named of the captions (--plain-named for plain, which is --plain-share of the renders:
content-only prompts should draw plain), the rest content-only (look_caption), 10% empty; large batches, LR warm-up,
bf16 autocast on CUDA, EMA, --unet-minutes cap. Stage `eval` (scripts/tiny_looks_eval.py): the new checker judges.
"""

from __future__ import annotations

import copy
import json
import multiprocessing as mp
import random
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageFilter
from tiny_build_common import jitter, round_trip, to_pixels, vae_step, write_sd1_parts

from sdlora.eval import world
from sdlora.eval.looks import ALL_LOOKS, HELD_OUT_LOOKS, TRAINING_LOOKS, hue_name, look_caption, render_look
from sdlora.models.tiny import LOOKS_UNET_CONFIG, LOOKS_VAE_CONFIG, SCHEDULER_CONFIG, TEXT_CONFIG, TOKENIZER_DIR

SIZE = 128
LINE_LOOKS = ("sketch", "neon", "hatching", "crosshatch")  # looks drawn with thin lines: the thin-line check's rows
DEFAULTS = {"unet_batch": 512, "unet_lr": 8e-4, "warmup": 200, "ema": 0.998, "unet_images": 60000, "vae_images": 60000,
            "vae_batch": 128, "vae_lr": 5e-4, "checker_scenes": 1500, "checker_steps": 6000, "checker_lr": 2e-3}  # over plain's
SMOKE = {"unet_images": 2 * len(TRAINING_LOOKS), "unet_steps": 2, "unet_batch": 2, "vae_steps": 2, "vae_batch": 2,
         "checker_scenes": 2, "checker_steps": 2, "checker_batch": 8, "eval_prompts": 2, "eval_steps": 2, "warmup": 1,
         "workers": 1, "vae_eval_scenes": 1, "eval_look_prompts": 1}


def add_args(ap) -> None:
    ap.add_argument("--look-named", type=float, default=0.9, help="looks: share of a non-plain look's captions naming it")
    ap.add_argument("--plain-named", type=float, default=0.2, help="looks: share of plain's captions naming it")
    ap.add_argument("--plain-share", type=float, default=1 / 3, help="looks: share of the training renders in plain")
    ap.add_argument("--vae-eval-scenes", type=int, default=60, help="looks: scenes per look for the VAE round trip")
    ap.add_argument("--eval-look-prompts", type=int, default=16, help="looks: prompts per training look named")
    ap.add_argument("--checker-width", type=int, default=64, help="looks: the checker's first width (the shipped: 48)")
    ap.add_argument("--mixes-per-scene", type=int, default=8, help="looks: two-look composites per checker scene")
    ap.add_argument("--unet-channels-last", action="store_true", help="looks: the UNet in channels_last (NHWC) memory")
    ap.add_argument("--vae-chroma-weight", type=float, default=4.0, help="looks: VAE loss weight on rgb - luma (0: plain RGB loss)")
    ap.add_argument("--vae-jitter", type=float, default=0.5, help="looks: share of VAE batches desaturated and lightened")
    ap.add_argument("--render-cache", type=Path, help="looks: keep the training renders here for a later call (--stage unet)")
    ap.add_argument("--budget-minutes", type=float, default=1e6, help="looks: the UNet stops so the call ends in this")
    ap.add_argument("--eval-reserve", type=float, default=60.0, help="looks: seconds of the budget kept for saving + eval")


def apply_defaults(args, ap) -> None:
    for k, v in DEFAULTS.items():
        if getattr(args, k) == ap.get_default(k):
            setattr(args, k, v)
    if args.workers == ap.get_default("workers"):  # one core left for the process driving the GPU
        args.workers = max(1, args.workers - 1)
    if args.smoke:
        for k, v in SMOKE.items():
            setattr(args, k, v)


# ----------------------------------------------------------------------------- data


def _scene(seed, index: int, single: bool) -> world.Scene:
    rng = random.Random(f"looks/{seed}/{index}")
    while True:
        scene = world.random_scene(rng)
        if (not single or len(scene.shapes) == 1) and not world.is_held_out(scene):
            return scene


def _render_job(job: tuple) -> tuple[np.ndarray, str, tuple]:
    look, seed, index, single, named = job  # named: the chance that the caption names the look
    scene = _scene(seed, index, single)
    rng = random.Random(f"caption/{seed}/{index}")
    text = look_caption(scene, look, rng.random() < named, rng)
    return np.asarray(render_look(look, scene, SIZE)), text, (scene.shapes[0].colour, scene.shapes[0].kind)


def render_async(pool, looks, n: int, seed, single: bool = False, named: dict | None = None, per_scene: bool = False):
    """n renders (looks cycled; per_scene: every look of one scene side by side), rendered by the pool while the GPU
    trains; `collect` turns the result into uint8 [n, H, W, 3], captions and main-object labels."""
    jobs = [(looks[i % len(looks)], seed, i // len(looks) if per_scene else i, single, (named or {}).get(looks[i % len(looks)], 0.0))
            for i in range(n)]
    return pool.map_async(_render_job, jobs, chunksize=32)


def collect(result) -> tuple[np.ndarray, list, list]:
    out = result.get()  # [(render, caption, (colour, kind))]
    return np.stack([o[0] for o in out]), [o[1] for o in out], [o[2] for o in out]


# ----------------------------------------------------------------------------- stage 1: VAE, its round trip, checker


def train_vae(args, device, images: np.ndarray) -> tuple[object, dict]:
    from diffusers import AutoencoderKL

    torch.manual_seed(args.seed)
    vae = AutoencoderKL(**LOOKS_VAE_CONFIG).to(device)
    opt = torch.optim.AdamW(vae.parameters(), lr=args.vae_lr, weight_decay=0.0)
    g, held = torch.Generator().manual_seed(args.seed), torch.from_numpy(images).to(device)  # uint8 on the GPU: 3 GB
    t0, step = time.time(), 0
    while step < args.vae_steps and (time.time() - t0) < args.vae_minutes * 60:
        idx = torch.randint(0, len(images), (args.vae_batch,), generator=g).to(device)
        x = held[idx].permute(0, 3, 1, 2).float() / 127.5 - 1.0
        if args.vae_jitter:  # more low-chroma hues: the held-out looks' pale fills lost their hue (BENCHMARKS 2026-12-04)
            x = jitter(x, g, args.vae_jitter)
        loss = vae_step(vae, opt, x, args.vae_kl, device, args.vae_chroma_weight)
        step += 1
        if step % 500 == 0:
            print(f"vae step {step} loss {loss.item():.4f} ({time.time() - t0:.0f}s)", flush=True)
    vae.eval()
    del held
    with torch.no_grad():  # SD's rule: latents scaled to unit variance
        z = torch.cat([vae.encode(to_pixels(images[i : i + 256], device)).latent_dist.mean for i in range(0, min(4096, len(images)), 256)])
    std = float(z.float().std())
    vae.register_to_config(scaling_factor=1.0 / std)
    print(f"vae: {step} steps in {time.time() - t0:.0f}s, latent std {std:.4f}, latents {tuple(z.shape[1:])}", flush=True)
    return vae, {"vae_steps": step, "vae_seconds": round(time.time() - t0), "vae_batch": args.vae_batch, "vae_lr": args.vae_lr, "vae_chroma_weight": args.vae_chroma_weight, "vae_jitter": args.vae_jitter,
                 "vae_images": len(images), "vae_latent_std": std, "vae_scaling_factor": 1.0 / std,
                 "vae_latent_shape": list(z.shape[1:]), "vae_trained_on": list(TRAINING_LOOKS)}


def _object_masks(scene: world.Scene) -> list[np.ndarray]:  # 2 px inside each object's edge, as tests/test_looks.py
    return [np.asarray(world._mask(world._outline(s, SIZE), SIZE).filter(ImageFilter.MinFilter(5))) > 127 for s in scene.shapes]


def _line_mask(image: np.ndarray) -> np.ndarray:
    """Thin strokes: pixels far (> 40 of 255) from their 5x5 box-blurred neighbourhood."""
    blur = np.asarray(Image.fromarray(image).filter(ImageFilter.BoxBlur(2)), np.float32)
    return np.abs(image.astype(np.float32) - blur).mean(-1) > 40


def measure_vae(args, device, vae, rendering) -> dict:
    """Round trip (latent mean -> decode) of every look on --vae-eval-scenes random scenes: the hue judge's colour
    accuracy per object before (the render itself) and after, the pixel MAE, and the MAE on thin lines."""
    n = args.vae_eval_scenes
    images, _, _ = collect(rendering)
    rec = round_trip(vae, images, device)
    out = {}
    for k, look in enumerate(ALL_LOOKS):
        right_in, right_out, line_err, mae = [], [], [], []
        for i in range(n):
            j, scene = i * len(ALL_LOOKS) + k, _scene("vae-eval", i, False)
            a, b = images[j].astype(np.float32) / 255, rec[j].astype(np.float32) / 255
            for shape, mask in zip(scene.shapes, _object_masks(scene)):
                right_in.append(hue_name(a[mask]) == shape.colour)
                right_out.append(hue_name(b[mask]) == shape.colour)
            lines = _line_mask(images[j])
            mae.append(np.abs(a - b).mean() * 255)
            if lines.any():
                line_err.append(np.abs(a - b)[lines].mean() * 255)
        out[look] = {"colour_acc": float(np.mean(right_out)), "colour_acc_render": float(np.mean(right_in)),
                     "objects": len(right_out), "mae": float(np.mean(mae)),
                     "line_mae": float(np.mean(line_err)) if line_err else None, "held_out": look in HELD_OUT_LOOKS}
    worst = min(out, key=lambda name: out[name]["colour_acc"])
    print(f"vae round trip: worst colour {worst} {out[worst]['colour_acc']:.3f}; line MAE "
          + ", ".join(f"{name} {out[name]['line_mae']}" for name in LINE_LOOKS), flush=True)
    return {"vae_round_trip": out, "vae_min_colour_acc": out[worst]["colour_acc"], "vae_min_colour_look": worst,
            "vae_colour_bar_met": all(v["colour_acc"] >= 0.97 for v in out.values()), "vae_eval_scenes": n}


# ----------------------------------------------------------------------------- stage 2: UNet + text encoder


def _fold(ema: float | None, losses: list) -> float | None:
    """The running loss (0.98 decay) after these steps' losses, read from the GPU in one transfer."""
    for v in torch.stack(losses).tolist() if losses else []:
        ema = v if ema is None else 0.98 * ema + 0.02 * v
    return ema


def train_unet(args, device, vae, images: np.ndarray, captions: list[str]) -> dict:
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(TOKENIZER_DIR)
    t0 = time.time()
    with torch.no_grad():
        moments = torch.cat([torch.cat([d.mean, d.logvar], 1).float() for d in
                             (vae.encode(to_pixels(images[i : i + 256], device)).latent_dist for i in range(0, len(images), 256))])
    pos = {c: i for i, c in enumerate(sorted(set(captions)))}  # far fewer distinct captions than images: each tokenized once
    table = tok(list(pos), padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids.to(device)
    ids = table[torch.tensor([pos[c] for c in captions], device=device)]
    empty = tok([""], padding="max_length", max_length=77, return_tensors="pt").input_ids.to(device)
    print(f"encoded {len(images)} images to {tuple(moments.shape[1:])} moments in {time.time() - t0:.0f}s", flush=True)
    torch.manual_seed(args.seed)
    src = args.init_from  # --init-from: continue an earlier run's EMA weights (a second call) instead of from scratch
    unet = (UNet2DConditionModel.from_pretrained(src / "unet") if src else UNet2DConditionModel(**LOOKS_UNET_CONFIG)).float().to(device)
    te = (CLIPTextModel.from_pretrained(src / "text_encoder") if src else CLIPTextModel(CLIPTextConfig(**TEXT_CONFIG))).float().to(device)
    fmt = torch.channels_last if args.unet_channels_last else torch.contiguous_format  # cuDNN's bf16 convs want NHWC
    unet = unet.to(memory_format=fmt)
    ema_unet, ema_te = copy.deepcopy(unet).requires_grad_(False), copy.deepcopy(te).requires_grad_(False)
    sched = DDPMScheduler.from_config(SCHEDULER_CONFIG)
    sched.alphas_cumprod = sched.alphas_cumprod.to(device)
    params = list(unet.parameters()) + list(te.parameters())
    opt = torch.optim.AdamW(params, lr=args.unet_lr, weight_decay=1e-2, fused=device.type == "cuda")
    g = torch.Generator(device=device).manual_seed(args.seed)
    scale = vae.config.scaling_factor
    t0, step, ema_loss, first, losses = time.time(), 0, None, None, []
    while step < args.unet_steps and (time.time() - t0) < args.unet_minutes * 60 and time.time() < args.deadline:
        for grp in opt.param_groups:
            grp["lr"] = args.unet_lr * min(1.0, (step + 1) / args.warmup)
        idx = torch.randint(0, len(moments), (args.unet_batch,), device=device, generator=g)
        mean, logvar = moments[idx].chunk(2, dim=1)
        lat = (mean + torch.exp(0.5 * logvar) * torch.randn(mean.shape, device=device, generator=g)) * scale
        noise = torch.randn(lat.shape, device=device, generator=g)
        t = torch.randint(0, sched.config.num_train_timesteps, (len(idx),), device=device, generator=g)
        drop = torch.rand(len(idx), device=device, generator=g) < 0.1
        tokens = torch.where(drop[:, None], empty, ids[idx])
        try:  # batch 1024 needs ~55 GB of saved activations (counted on a CPU); halve it once if the GPU has less
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                pred = unet(sched.add_noise(lat, noise, t).contiguous(memory_format=fmt), t, te(tokens)[0]).sample
            loss = F.mse_loss(pred.float(), noise)
            opt.zero_grad(set_to_none=True)
            loss.backward()
        except torch.OutOfMemoryError:
            if step or args.unet_batch < 64:
                raise
            pred = loss = None
            opt.zero_grad(set_to_none=True)
            torch.cuda.empty_cache()
            args.unet_batch //= 2
            print(f"unet: out of memory at the first step; batch halved to {args.unet_batch}", flush=True)
            continue
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        step += 1
        decay = min(args.ema, (1 + step) / (10 + step))
        with torch.no_grad():
            for src, dst in ((unet, ema_unet), (te, ema_te)):
                torch._foreach_lerp_(list(dst.parameters()), list(src.parameters()), 1 - decay)
        losses.append(loss.detach())  # read every 50 steps: a per-step .item() would stall the launch queue
        if len(losses) == 50:
            ema_loss, losses = _fold(ema_loss, losses), []
        if step == 10:
            if device.type == "cuda":
                torch.cuda.synchronize()
            first = time.time() - t0
        if step % 200 == 0:
            print(f"unet step {step} loss {ema_loss:.4f} ({time.time() - t0:.0f}s, {step / (time.time() - t0):.2f} it/s)", flush=True)
    ema_loss = _fold(ema_loss, losses)
    seconds = time.time() - t0
    stopped = "steps" if step >= args.unet_steps else "deadline" if time.time() >= args.deadline else "minutes"
    ema_unet.to(torch.float16, memory_format=torch.contiguous_format).save_pretrained(args.out / "unet")  # shipped in fp16
    ema_te.to(torch.float16).save_pretrained(args.out / "text_encoder")
    write_sd1_parts(args.out, tok)
    count = {n: sum(p.numel() for p in m.parameters()) for n, m in (("unet", unet), ("text_encoder", te), ("vae", vae))}
    weights = sum(f.stat().st_size for f in args.out.rglob("*.safetensors") if f.parent != args.out)
    print(f"unet: {step} steps in {seconds:.0f}s, loss {ema_loss:.4f}; weights {weights / 1e6:.1f} MB fp16 {count}", flush=True)
    return {"unet_steps": step, "unet_seconds": round(seconds), "unet_stopped_by": stopped, "unet_first_10_steps_seconds": first, "unet_batch": args.unet_batch,
            "unet_channels_last": args.unet_channels_last,
            "unet_lr": args.unet_lr, "unet_init_from": str(args.init_from) if args.init_from else None, "warmup": args.warmup, "ema": args.ema, "unet_final_loss": ema_loss,
            "unet_images": len(images), "look_named": args.look_named, "plain_named": args.plain_named,
            "plain_share": args.plain_share, "parameters": count, "weights_bytes_fp16": weights}


# ----------------------------------------------------------------------------- the build


def _training_renders(args, pool, cycle: list, named: dict) -> tuple[np.ndarray, list]:
    """The training renders, from --render-cache when an earlier call of the same seed and count left them there
    (a second call on a warm machine then skips a minute of rendering)."""
    n, cache = max(args.vae_images, args.unet_images), args.render_cache
    key = {"seed": args.seed, "n": n, "cycle": cycle, "named": named}
    saved = json.loads((cache / "renders.json").read_text()) if cache and (cache / "renders.json").exists() else None
    if saved and saved["key"] == key:
        print(f"training renders from {cache}", flush=True)
        return np.load(cache / "renders.npy"), saved["captions"]
    images, captions, _ = collect(render_async(pool, cycle, n, args.seed, named=named))
    if cache:
        cache.mkdir(parents=True, exist_ok=True)
        np.save(cache / "renders.npy", images)
        (cache / "renders.json").write_text(json.dumps({"key": key, "captions": captions}))
    return images, captions


def build(args, device, log: dict, log_path: Path) -> None:
    """`--world looks`: stages vae (VAE, its round trip, the checker), checker (alone, on OUT's VAE), unet, eval, all."""
    from diffusers import AutoencoderKL
    from tiny_looks_checker import train_checker
    from tiny_looks_eval import evaluate, write_card

    def save() -> None:
        log_path.write_text(json.dumps(log, indent=2) + "\n")

    log["world"], t_all = "looks", time.time()
    args.deadline = t_all + args.budget_minutes * 60 - args.eval_reserve  # the UNet stops here at the latest
    with mp.get_context("fork").Pool(args.workers) as pool:
        if args.stage in ("vae", "unet", "all"):  # one pool of TRAINING_LOOKS renders feeds the VAE and the UNet
            t0 = time.time()
            others = [k for k in TRAINING_LOOKS if k != "plain"]  # plain repeated in the cycle to make up its share
            cycle = ["plain"] * max(1, round(args.plain_share * len(others) / (1 - args.plain_share))) + others
            named = {k: args.plain_named if k == "plain" else args.look_named for k in cycle}
            images, captions = _training_renders(args, pool, cycle, named)
            log["render_seconds"] = round(time.time() - t0)
            print(f"rendered {len(images)} images of {len(TRAINING_LOOKS)} training looks in {time.time() - t0:.0f}s", flush=True)
        if args.stage in ("vae", "checker", "all"):  # rendered while the VAE trains
            eval_renders = render_async(pool, list(ALL_LOOKS), args.vae_eval_scenes * len(ALL_LOOKS), "vae-eval", per_scene=True)
            checker_renders = render_async(pool, list(ALL_LOOKS), args.checker_scenes * len(ALL_LOOKS), args.seed + 1,
                                           single=True, per_scene=True)
        if args.stage in ("vae", "all"):
            vae, info = train_vae(args, device, images[: args.vae_images])
            vae.to(torch.float16).save_pretrained(args.out / "vae")  # shipped in fp16
            log |= info
        if args.stage in ("vae", "checker", "unet", "all"):  # measured and used as shipped: the fp16 weights
            vae = AutoencoderKL.from_pretrained(args.out / "vae").float().to(device).eval()
        if args.stage in ("vae", "all"):
            log |= measure_vae(args, device, vae, eval_renders)
            save()
        if args.stage in ("vae", "checker", "all"):
            log |= train_checker(args, device, vae, pool, checker_renders)
            save()
        if args.stage in ("unet", "all"):
            log |= {"unet_previous": log["unet"]} if "unet" in log else {}
            log["unet"] = train_unet(args, device, vae, images[: args.unet_images], captions[: args.unet_images])
            save()
    if args.stage in ("unet", "eval", "all") and not args.no_eval:
        log |= evaluate(args, device, SIZE)
    log["build_seconds_this_call"] = round(time.time() - t_all)
    save()
    write_card(args.out, log)
    print(json.dumps(log), flush=True)
