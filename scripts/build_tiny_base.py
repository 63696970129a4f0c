"""Train the embedded tiny base on the procedural world (sdlora/world.py).

Stage `vae`: an SD-shaped AutoencoderKL (8x down, 4 latent channels) on renders of every style,
then the world checker (sdlora/checker.py) on renders passed through that VAE.
Stage `unet`: UNet2DConditionModel + CLIPTextModel trained together from scratch on plain-style
renders with their captions (10% captions dropped for classifier-free guidance), EMA weights kept;
then 200 held-out prompts are generated and judged, and the folder is written in fp16 with a model card.

Deterministic given --seed and the step counts; --*-minutes stop a stage early and the steps reached
are recorded in build_log.json, so `--vae-steps/--unet-steps` reproduce a run exactly (up to GPU
kernel non-determinism).

    python scripts/build_tiny_base.py --stage vae  --out build/tiny --vae-minutes 3
    python scripts/build_tiny_base.py --stage unet --out build/tiny --unet-minutes 7
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import multiprocessing as mp
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from sdlora import world  # noqa: E402
from sdlora.tiny_base import SCHEDULER_CONFIG, TEXT_CONFIG, TOKENIZER_DIR, UNET_CONFIG, VAE_CONFIG  # noqa: E402

SIZE = 128


# ----------------------------------------------------------------------------- data


def _render_one(job: tuple[str, int, int, bool]) -> tuple[np.ndarray, str, tuple]:
    style, seed, index, single = job
    rng = random.Random(f"{seed}/{index}")
    while True:
        scene = world.random_scene(rng)
        if (not single or len(scene.shapes) == 1) and not world.is_held_out(scene):
            break
    s = scene.shapes[0]
    return np.asarray(world.render(style, scene, SIZE)), world.caption(scene), (s.colour, s.kind)


def render_pool(styles: list[str], n: int, seed: int, workers: int, single: bool = False) -> tuple[np.ndarray, list, list]:
    """n renders (styles cycled) as uint8 [n, H, W, 3], their captions and main-object labels."""
    jobs = [(styles[i % len(styles)], seed, i // len(styles) if single else i, single) for i in range(n)]
    with mp.get_context("fork").Pool(workers) as pool:
        out = pool.map(_render_one, jobs, chunksize=64)
    return np.stack([o[0] for o in out]), [o[1] for o in out], [o[2] for o in out]


def to_pixels(batch: np.ndarray, device) -> torch.Tensor:
    return torch.from_numpy(batch).to(device).permute(0, 3, 1, 2).float() / 127.5 - 1.0


# ----------------------------------------------------------------------------- stage 1: VAE + checker


def train_vae(args, device) -> dict:
    from diffusers import AutoencoderKL

    t0 = time.time()
    images, _, _ = render_pool(list(world.STYLES), args.vae_images, args.seed, args.workers)
    print(f"rendered {len(images)} VAE images in {time.time() - t0:.0f}s", flush=True)
    torch.manual_seed(args.seed)
    vae = AutoencoderKL(**VAE_CONFIG).to(device)
    opt = torch.optim.AdamW(vae.parameters(), lr=args.vae_lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(args.seed)
    t0, step = time.time(), 0
    while step < args.vae_steps and (time.time() - t0) < args.vae_minutes * 60:
        idx = torch.randint(0, len(images), (args.vae_batch,), generator=g).numpy()
        x = to_pixels(images[idx], device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            dist = vae.encode(x).latent_dist
            z = dist.sample()
            rec = vae.decode(z).sample.float()
        kl = dist.kl().mean() / x[0].numel()
        loss = F.l1_loss(rec, x) + 0.5 * F.mse_loss(rec, x) + args.vae_kl * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        step += 1
        if step % 200 == 0:
            print(f"vae step {step} loss {loss.item():.4f} ({time.time() - t0:.0f}s)", flush=True)
    vae.eval()
    with torch.no_grad():  # SD's rule: scale latents to unit variance
        z = torch.cat([vae.encode(to_pixels(images[i : i + 256], device)).latent_dist.mean for i in range(0, min(2048, len(images)), 256)])
        scale = float(1.0 / z.float().std())
        rec = vae.decode(z[:256]).sample.float()
        mse = F.mse_loss(rec, to_pixels(images[:256], device)).item()
    vae.register_to_config(scaling_factor=scale)
    vae.to(torch.float16).save_pretrained(args.out / "vae")  # shipped in fp16
    print(f"vae: {step} steps, recon MSE {mse:.4f}, scaling_factor {scale:.4f}", flush=True)
    return {"vae_steps": step, "vae_seconds": round(time.time() - t0), "vae_recon_mse": mse, "vae_scaling_factor": scale}


@torch.no_grad()
def through_vae(vae, images: np.ndarray, device) -> np.ndarray:
    out = []
    for i in range(0, len(images), 256):
        rec = vae.decode(vae.encode(to_pixels(images[i : i + 256], device)).latent_dist.sample()).sample
        out.append(((rec.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy())
    return np.concatenate(out)


def train_checker(args, vae, device) -> dict:
    from safetensors.torch import save_file

    from sdlora.checker import COLOUR_NAMES, INPUT, SHAPE_NAMES, Checker

    styles = list(world.STYLES)
    n_scenes = args.checker_scenes
    images, _, labels = render_pool(styles, n_scenes * len(styles), args.seed + 1, args.workers, single=True)
    images = through_vae(vae, images, device)
    x = F.interpolate(to_pixels(images, device), size=(INPUT, INPUT), mode="bilinear", antialias=True)
    colour = torch.tensor([COLOUR_NAMES.index(c) for c, _ in labels], device=device)
    shape = torch.tensor([SHAPE_NAMES.index(k) for _, k in labels], device=device)
    style = torch.tensor([i % len(styles) for i in range(len(labels))], device=device)
    n_val = len(styles) * 200
    torch.manual_seed(args.seed)
    model = Checker().to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    g = torch.Generator(device=device).manual_seed(args.seed)
    for _ in range(args.checker_steps):
        idx = torch.randint(n_val, len(x), (256,), device=device, generator=g)
        xb, st = x[idx], F.one_hot(style[idx], len(styles)).float()
        # half the batch: blend the same scene in two styles 50/50; both styles are then "shown"
        other = (idx - idx % len(styles)) + torch.randint(0, len(styles), (256,), device=device, generator=g)
        blend = torch.rand(256, device=device, generator=g) < 0.5
        xb = torch.where(blend[:, None, None, None], 0.5 * (xb + x[other]), xb)
        st = torch.where(blend[:, None], (st + F.one_hot(style[other], len(styles)).float()).clamp(max=1), st)
        xb = xb + 0.03 * torch.randn(xb.shape, device=device, generator=g)
        c, s, sl = model(xb)
        loss = F.cross_entropy(c, colour[idx]) + F.cross_entropy(s, shape[idx]) + F.binary_cross_entropy_with_logits(sl, st)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        c, s, sl = model(x[:n_val])
        acc = {
            "checker_colour_acc": (c.argmax(1) == colour[:n_val]).float().mean().item(),
            "checker_shape_acc": (s.argmax(1) == shape[:n_val]).float().mean().item(),
            "checker_style_acc": (sl.argmax(1) == style[:n_val]).float().mean().item(),
        }
    save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, str(args.out / "checker.safetensors"))
    print(f"checker on {n_val} held-out VAE-passed renders: {acc}", flush=True)
    return acc


# ----------------------------------------------------------------------------- stage 2: UNet + text encoder


def train_unet(args, device) -> dict:
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    vae = AutoencoderKL.from_pretrained(args.out / "vae").float().to(device).eval()
    tok = CLIPTokenizer.from_pretrained(TOKENIZER_DIR)
    t0 = time.time()
    images, captions, _ = render_pool(["plain"], args.unet_images, args.seed + 2, args.workers)
    with torch.no_grad():
        moments = torch.cat([
            torch.cat([d.mean, d.logvar], 1)
            for d in (vae.encode(to_pixels(images[i : i + 256], device)).latent_dist for i in range(0, len(images), 256))
        ]).float()
    ids = tok(captions, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids.to(device)
    empty = tok([""], padding="max_length", max_length=77, return_tensors="pt").input_ids.to(device)
    print(f"rendered + encoded {len(images)} plain images in {time.time() - t0:.0f}s", flush=True)
    del images
    torch.manual_seed(args.seed)
    if args.init_from:  # continue a shorter run (its EMA weights) instead of starting from scratch
        unet = UNet2DConditionModel.from_pretrained(args.init_from / "unet").float().to(device)
        te = CLIPTextModel.from_pretrained(args.init_from / "text_encoder").float().to(device)
    else:
        unet = UNet2DConditionModel(**UNET_CONFIG).to(device)
        te = CLIPTextModel(CLIPTextConfig(**TEXT_CONFIG)).to(device)
    ema_unet, ema_te = copy.deepcopy(unet).requires_grad_(False), copy.deepcopy(te).requires_grad_(False)
    sched = DDPMScheduler.from_config(SCHEDULER_CONFIG)
    sched.alphas_cumprod = sched.alphas_cumprod.to(device)
    params = list(unet.parameters()) + list(te.parameters())
    opt = torch.optim.AdamW(params, lr=args.unet_lr, weight_decay=1e-2, fused=device.type == "cuda")
    g = torch.Generator(device=device).manual_seed(args.seed)
    scale = vae.config.scaling_factor
    t0, step, ema_loss = time.time(), 0, None
    while step < args.unet_steps and (time.time() - t0) < args.unet_minutes * 60:
        for grp in opt.param_groups:
            grp["lr"] = args.unet_lr * min(1.0, (step + 1) / args.warmup)
        idx = torch.randint(0, len(moments), (args.unet_batch,), device=device, generator=g)
        mean, logvar = moments[idx].chunk(2, dim=1)
        lat = (mean + torch.exp(0.5 * logvar) * torch.randn(mean.shape, device=device, generator=g)) * scale
        noise = torch.randn(lat.shape, device=device, generator=g)
        t = torch.randint(0, sched.config.num_train_timesteps, (len(idx),), device=device, generator=g)
        drop = torch.rand(len(idx), device=device, generator=g) < 0.1
        tokens = torch.where(drop[:, None], empty, ids[idx])
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            cond = te(tokens)[0]
            pred = unet(sched.add_noise(lat, noise, t), t, cond).sample
        loss = F.mse_loss(pred.float(), noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        step += 1
        decay = min(args.ema, (1 + step) / (10 + step))
        with torch.no_grad():
            for src, dst in ((unet, ema_unet), (te, ema_te)):
                torch._foreach_lerp_(list(dst.parameters()), list(src.parameters()), 1 - decay)
        ema_loss = loss.item() if ema_loss is None else 0.99 * ema_loss + 0.01 * loss.item()
        if step % 500 == 0:
            print(f"unet step {step} loss {ema_loss:.4f} ({time.time() - t0:.0f}s)", flush=True)
    ema_unet.to(torch.float16).save_pretrained(args.out / "unet")  # shipped in fp16
    ema_te.to(torch.float16).save_pretrained(args.out / "text_encoder")
    tok.save_pretrained(args.out / "tokenizer")
    DDPMScheduler.from_config(SCHEDULER_CONFIG).save_pretrained(args.out / "scheduler")
    index = {"_class_name": "StableDiffusionPipeline", "_diffusers_version": "0.42.1", "feature_extractor": [None, None],
             "requires_safety_checker": False, "safety_checker": [None, None], "scheduler": ["diffusers", "DDPMScheduler"],
             "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
             "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"]}
    (args.out / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
    return {"unet_steps": step, "unet_seconds": round(time.time() - t0), "unet_batch": args.unet_batch, "unet_lr": args.unet_lr,
            "unet_init_from": str(args.init_from) if args.init_from else None,
            "unet_final_loss": ema_loss, "unet_images": args.unet_images}


def evaluate(args, device) -> dict:
    """Generate the 200 held-out prompts with the saved (fp16) base and judge them."""
    from sdlora.base import load_base
    from sdlora.checker import judge, load_checker
    from sdlora.generate import generate_images

    base = load_base(str(args.out), "fp16" if device.type == "cuda" else "fp32", device)
    checker = load_checker(args.out / "checker.safetensors")
    scenes = world.eval_scenes(args.eval_prompts)
    images = []
    for i, scene in enumerate(scenes):
        images += generate_images(base, world.caption(scene), seed=i, steps=20, guidance=7.5)
    verdict = judge(checker, images)
    colour = float(np.mean([v == s.shapes[0].colour for v, s in zip(verdict["colour"], scenes)]))
    shape = float(np.mean([v == s.shapes[0].kind for v, s in zip(verdict["shape"], scenes)]))
    plain = float(verdict["style"][:, world.STYLES.index("plain")].mean())
    grid = _grid(images[:32])
    grid.save(args.out / "samples.png")
    print(f"held-out prompts: colour {colour:.3f}, shape {shape:.3f}, plain-style {plain:.3f}", flush=True)
    return {"eval_prompts": len(scenes), "eval_colour_acc": colour, "eval_shape_acc": shape, "eval_plain_style": plain,
            "eval_sampler": "DPM++ 20 steps, CFG 7.5, seeds 0-199"}


def _grid(images, cols: int = 8):
    from PIL import Image

    w, h = images[0].size
    grid = Image.new("RGB", (cols * w, math.ceil(len(images) / cols) * h), "white")
    for i, im in enumerate(images):
        grid.paste(im, ((i % cols) * w, (i // cols) * h))
    return grid


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--stage", choices=["vae", "unet", "eval", "all"], default="all")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workers", type=int, default=max(1, mp.cpu_count()))
    ap.add_argument("--vae-images", type=int, default=16000)
    ap.add_argument("--vae-steps", type=int, default=100_000)
    ap.add_argument("--vae-minutes", type=float, default=3.0)
    ap.add_argument("--vae-batch", type=int, default=64)
    ap.add_argument("--vae-lr", type=float, default=5e-4)
    ap.add_argument("--vae-kl", type=float, default=1e-6)
    ap.add_argument("--checker-scenes", type=int, default=3000)
    ap.add_argument("--checker-steps", type=int, default=1500)
    ap.add_argument("--unet-images", type=int, default=40000)
    ap.add_argument("--unet-steps", type=int, default=1_000_000)
    ap.add_argument("--unet-minutes", type=float, default=7.0)
    ap.add_argument("--unet-batch", type=int, default=128)
    ap.add_argument("--unet-lr", type=float, default=4e-4)
    ap.add_argument("--ema", type=float, default=0.999)
    ap.add_argument("--eval-prompts", type=int, default=200)
    ap.add_argument("--warmup", type=int, default=500)
    ap.add_argument("--init-from", type=Path, help="start the UNet/text encoder from this folder's weights")
    ap.add_argument("--no-eval", action="store_true", help="skip the held-out evaluation (run it later with --stage eval)")
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.backends.cuda.matmul.allow_tf32 = True
    args.out.mkdir(parents=True, exist_ok=True)
    log_path = args.out / "build_log.json"
    log = json.loads(log_path.read_text()) if log_path.exists() else {}
    log |= {"seed": args.seed, "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "torch": torch.__version__}
    if args.stage in ("vae", "all"):
        from diffusers import AutoencoderKL

        log |= train_vae(args, device)
        vae = AutoencoderKL.from_pretrained(args.out / "vae").float().to(device).eval()
        log |= train_checker(args, vae, device)
    if args.stage in ("unet", "all"):
        log |= {f"run{len([k for k in log if k.startswith('run')]) + 1}": train_unet(args, device)}
        log_path.write_text(json.dumps(log, indent=2) + "\n")
    if args.stage in ("unet", "eval", "all") and not args.no_eval:
        log |= evaluate(args, device)
    log_path.write_text(json.dumps(log, indent=2) + "\n")
    print(json.dumps(log), flush=True)


if __name__ == "__main__":
    main()
