"""Train the embedded tiny base on the procedural world (sdlora/world.py).

Stage `vae`: an SD-shaped AutoencoderKL (8x down, 4 latent channels) on renders of every style,
then the world checker (sdlora/checker.py) on renders passed through that VAE: every style alone, and
two-style composites (world.ink_mix / world.split_mix) labelled with both styles.
Stage `checker`: the checker alone, on the VAE already in --out (fits a CPU when fine-tuned with --checker-init).
Stage `unet`: UNet2DConditionModel + CLIPTextModel trained together from scratch on plain-style
renders with their captions (10% captions dropped for classifier-free guidance), EMA weights kept;
then 200 held-out prompts are generated and judged, and the folder is written in fp16 with a model card.

Deterministic given --seed and the step counts; --*-minutes stop a stage early and the steps reached
are recorded in build_log.json, so `--vae-steps/--unet-steps` reproduce a run exactly (up to GPU
kernel non-determinism).

    python scripts/build_tiny_base.py --stage vae  --out build/tiny --vae-minutes 3
    python scripts/build_tiny_base.py --stage unet --out build/tiny --unet-minutes 7

`--family sdxl` builds tiny-xl instead (scripts/tiny_xl_stages.py): tiny's VAE and checker, an SDXL UNet and two
text encoders. `--smoke` shrinks every stage to a few images and steps so the whole builder runs on a CPU in a minute.

    python scripts/build_tiny_base.py --family sdxl --out build/tiny-xl --unet-minutes 12

`--world looks` builds issue 15's base instead (scripts/tiny_looks_stages.py): a 4x VAE (32x32 latents), a checker for
every look, and a UNet trained on the training looks, their names in part of the captions.
"""

from __future__ import annotations

import argparse
import copy
import json
import multiprocessing as mp
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import tiny_looks_stages as looks  # noqa: E402
from tiny_build_common import checker_step, grid, round_trip, to_pixels, vae_step, world_scene, write_sd1_parts  # noqa: E402
from tiny_build_common import render_pool as _render_pool  # noqa: E402

from sdlora.eval import world  # noqa: E402
from sdlora.models.tiny import SCHEDULER_CONFIG, TEXT_CONFIG, TOKENIZER_DIR, UNET_CONFIG, VAE_CONFIG  # noqa: E402

SIZE = 128


def render_pool(styles: list[str], n: int, seed: int, workers: int, single: bool = False) -> tuple[np.ndarray, list, list]:
    """n renders at SIZE px (styles cycled) as uint8 [n, H, W, 3], their captions and main-object labels."""
    return _render_pool(styles, n, seed, workers, SIZE, single)


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
        loss = vae_step(vae, opt, to_pixels(images[idx], device), args.vae_kl, device)
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
def _mixes(job: tuple[np.ndarray, int, int]) -> tuple[list[np.ndarray], list[tuple[str, str]]]:
    """Two-style composites of one scene (its VAE-passed renders in world.STYLES order): sketch's ink printed over
    another style, and each pair split as objects in one style over the other's background."""
    from PIL import Image

    renders, seed, index = job
    scene = world_scene(seed, index, True)
    ims = {s: Image.fromarray(r) for s, r in zip(world.STYLES, renders)}
    rng = random.Random(f"mix/{seed}/{index}")
    out, pairs = [], []
    for a, b in world.MIXES:
        if "sketch" in (a, b):  # multiply only where one style is ink on paper; pastel x halftone would hide pastel
            out.append(np.asarray(world.ink_mix([ims[a], ims[b]])))
            pairs.append((a, b))
        front, back = (a, b) if rng.random() < 0.5 else (b, a)
        out.append(np.asarray(world.split_mix(ims[front], ims[back], scene)))
        pairs.append((a, b))
    return out, pairs


def held_scenes(n: int) -> int:
    """How many of the checker's n scenes are held out for its accuracy report: 200, fewer at --smoke sizes."""
    return min(200, n // 4)


def checker_data(args, vae, device) -> dict[str, torch.Tensor]:
    """VAE-passed renders of single-object scenes in every style plus two-style composites, with labels.
    The first held_scenes(n) scenes are held out for the accuracy report."""
    from sdlora.eval.checker import COLOUR_NAMES, INPUT, SHAPE_NAMES

    styles = list(world.STYLES)
    n = args.checker_scenes
    t0 = time.time()
    renders, _, labels = render_pool(styles, n * len(styles), args.seed + 1, args.workers, single=True)
    print(f"rendered {len(labels)} images in {time.time() - t0:.0f}s", flush=True)
    t0 = time.time()
    renders = round_trip(vae, renders, device, batch=32, sample=True, generator=torch.Generator().manual_seed(args.seed + 1))
    print(f"passed through the VAE in {time.time() - t0:.0f}s", flush=True)
    # composed from the VAE-passed renders (the VAE is near-identity up to blur), which halves the VAE cost on a CPU
    by_scene = renders.reshape(n, len(styles), *renders.shape[1:])
    with mp.get_context("fork").Pool(args.workers) as pool:
        mixed = pool.map(_mixes, [(by_scene[i], args.seed + 1, i) for i in range(n)], chunksize=16)
    images = [renders] + [np.stack(m) for m, _ in mixed]
    main = labels[:: len(styles)]
    colour = [COLOUR_NAMES.index(c) for c, _ in labels] + [COLOUR_NAMES.index(main[i][0]) for i, (m, _) in enumerate(mixed) for _ in m]
    shape = [SHAPE_NAMES.index(k) for _, k in labels] + [SHAPE_NAMES.index(main[i][1]) for i, (m, _) in enumerate(mixed) for _ in m]
    style = F.one_hot(torch.arange(len(labels)) % len(styles), len(styles)).float()
    multi = torch.zeros(sum(len(m) for m, _ in mixed), len(styles))
    row = 0
    for _, pairs in mixed:
        for a, b in pairs:
            multi[row, [styles.index(a), styles.index(b)]] = 1.0
            row += 1
    scene = torch.cat([torch.arange(len(labels)) // len(styles), torch.tensor([i for i, (m, _) in enumerate(mixed) for _ in m])])
    x = F.interpolate(to_pixels(np.concatenate(images), device), size=(INPUT, INPUT), mode="bilinear", antialias=True)
    return {"x": x, "colour": torch.tensor(colour, device=device), "shape": torch.tensor(shape, device=device),
            "style": torch.cat([style, multi]).to(device), "held_out": (scene < held_scenes(n)).to(device)}


def train_checker(args, vae, device) -> dict:
    """Colour and shape heads (softmax) and independent style heads (sigmoid: a two-LoRA mix shows two),
    trained on single-style renders and on composites where both styles are really drawn."""
    from safetensors.torch import load_file, save_file

    from sdlora.eval.checker import Checker

    d = checker_data(args, vae, device)
    x, colour, shape, style = d["x"], d["colour"], d["shape"], d["style"]
    train_idx, val_idx = (~d["held_out"]).nonzero().squeeze(1), d["held_out"].nonzero().squeeze(1)
    single = style.sum(1) == 1
    torch.manual_seed(args.seed)
    model = Checker().to(device)
    if args.checker_init:  # fine-tune (e.g. the shipped checker) instead of starting from scratch
        model.load_state_dict(load_file(str(args.checker_init)))
    opt = torch.optim.AdamW(model.parameters(), lr=args.checker_lr, weight_decay=1e-4)
    g = torch.Generator(device=device).manual_seed(args.seed)
    t0 = time.time()
    for step in range(args.checker_steps):
        for grp in opt.param_groups:  # short warm-up: Adam's first full-size steps would knock a fine-tuned model about
            grp["lr"] = args.checker_lr * min(1.0, (step + 1) / 50)
        loss = checker_step(model, opt, (x, colour, shape, style), train_idx, args.checker_batch, g)  # fp32, as built
        if (step + 1) % 100 == 0:
            print(f"checker step {step + 1} loss {loss.item():.4f} ({time.time() - t0:.0f}s)", flush=True)
    model.eval()
    acc = {}
    with torch.no_grad():
        c, s, sl = (torch.cat(t) for t in zip(*(model(x[val_idx[i : i + 256]]) for i in range(0, len(val_idx), 256))))
        p = torch.sigmoid(sl)
        ok_c, ok_s = c.argmax(1) == colour[val_idx], s.argmax(1) == shape[val_idx]
        vs, vsingle = style[val_idx], single[val_idx]
        for k, name in enumerate(world.STYLES):  # per style: can it read colour and shape in that style?
            rows = vsingle & (vs[:, k] == 1)
            acc[f"checker_{name}_colour_acc"] = ok_c[rows].float().mean().item()
            acc[f"checker_{name}_shape_acc"] = ok_s[rows].float().mean().item()
        acc["checker_colour_acc"] = ok_c[vsingle].float().mean().item()
        acc["checker_shape_acc"] = ok_s[vsingle].float().mean().item()
        acc["checker_style_acc"] = (p[vsingle].argmax(1) == vs[vsingle].argmax(1)).float().mean().item()
        acc["checker_mix_colour_acc"] = ok_c[~vsingle].float().mean().item()
        acc["checker_mix_both_styles_acc"] = ((p[~vsingle] > 0.5) == (vs[~vsingle] > 0.5)).all(1).float().mean().item()
        acc["checker_plain_read_as_styled"] = (p[vsingle & (vs[:, 0] == 1), 1:] > 0.5).any(1).float().mean().item()
    acc |= {"checker_steps": args.checker_steps, "checker_scenes": args.checker_scenes, "checker_seconds": round(time.time() - t0),
            "checker_init": str(args.checker_init) if args.checker_init else None}
    save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, str(args.out / "checker.safetensors"))
    print(f"checker on {len(val_idx)} held-out VAE-passed images ({held_scenes(args.checker_scenes)} scenes): {acc}", flush=True)
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
    write_sd1_parts(args.out, tok)
    return {"unet_steps": step, "unet_seconds": round(time.time() - t0), "unet_batch": args.unet_batch, "unet_lr": args.unet_lr,
            "unet_init_from": str(args.init_from) if args.init_from else None,
            "unet_final_loss": ema_loss, "unet_images": args.unet_images}


def evaluate(args, device) -> dict:
    """Generate the 200 held-out prompts with the saved (fp16) base and judge them."""
    from sdlora.eval.checker import judge, load_checker
    from sdlora.models.base import load_base
    from sdlora.sample.generate import generate_images

    base = load_base(str(args.out), "fp16" if device.type == "cuda" else "fp32", device)
    own = args.out / "checker.safetensors"  # tiny-xl is judged by tiny's checker, the one shipped in sdlora/assets
    checker = load_checker(own if own.exists() else Path(__file__).resolve().parents[1] / "sdlora" / "assets" / "checker.safetensors")
    scenes = world.eval_scenes(args.eval_prompts)
    images = []
    for i, scene in enumerate(scenes):
        images += generate_images(base, world.caption(scene), seed=i, steps=args.eval_steps, guidance=7.5)
    verdict = judge(checker, images)
    colour = float(np.mean([v == s.shapes[0].colour for v, s in zip(verdict["colour"], scenes)]))
    shape = float(np.mean([v == s.shapes[0].kind for v, s in zip(verdict["shape"], scenes)]))
    plain = float(verdict["style"][:, world.STYLES.index("plain")].mean())
    styled = {s: float(verdict["style"][:, k].mean()) for k, s in enumerate(world.STYLES) if s != "plain"}
    read_as_styled = float((verdict["style"][:, 1:] > 0.5).any(1).mean())  # the plain base must not look styled
    grid(images[:32]).save(args.out / "samples.png")
    print(f"held-out prompts: colour {colour:.3f}, shape {shape:.3f}, plain-style {plain:.3f}, other styles {styled}, "
          f"read as styled {read_as_styled:.3f}", flush=True)
    return {"eval_prompts": len(scenes), "eval_colour_acc": colour, "eval_shape_acc": shape, "eval_plain_style": plain,
            "eval_other_style_scores": styled, "eval_read_as_styled": read_as_styled,
            "eval_sampler": f"DPM++ {args.eval_steps} steps, CFG 7.5, seeds 0-{len(scenes) - 1}"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--stage", choices=["vae", "checker", "unet", "eval", "all"], default="all")
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
    ap.add_argument("--checker-batch", type=int, default=256)
    ap.add_argument("--checker-lr", type=float, default=2e-3)
    ap.add_argument("--checker-init", type=Path, help="fine-tune the checker from these weights (e.g. sdlora/assets/checker.safetensors)")
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
    ap.add_argument("--eval-steps", type=int, default=20)
    ap.add_argument("--family", choices=["sd1", "sdxl"], default="sd1", help="sd1: the tiny base; sdxl: tiny-xl")
    ap.add_argument("--tiny-from", type=Path, default=Path(__file__).resolve().parents[1] / "sdlora" / "assets" / "tiny-base",
                    help="sdxl: the tiny base whose VAE (and text encoder, as a start) tiny-xl reuses")
    ap.add_argument("--smoke", action="store_true", help="toy sizes (a few images and steps) to check the builder on a CPU")
    ap.add_argument("--world", choices=["plain", "looks"], default="plain",
                    help="plain: the shipped base (4 styles, UNet on plain only); looks: issue 15's (scripts/tiny_looks_stages.py)")
    looks.add_args(ap)
    args = ap.parse_args()
    if args.smoke:
        args.vae_images, args.vae_steps, args.unet_images, args.unet_steps, args.unet_batch = 16, 2, 16, 2, 2
        args.checker_scenes, args.checker_steps, args.checker_batch = 8, 2, 8
        args.eval_prompts, args.eval_steps, args.warmup, args.workers = 1, 2, 1, 1
    if args.world == "looks":
        looks.apply_defaults(args, ap)  # its own defaults where the command line left one, and its own smoke sizes
    args.size = SIZE
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.backends.cuda.matmul.allow_tf32 = True
    args.out.mkdir(parents=True, exist_ok=True)
    log_path = args.out / "build_log.json"
    log = json.loads(log_path.read_text()) if log_path.exists() else {}
    log |= {"seed": args.seed, "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "torch": torch.__version__}
    if args.family == "sdxl":
        return build_sdxl(args, device, log, log_path)
    if args.world == "looks":
        return looks.build(args, device, log, log_path)
    if args.stage in ("vae", "checker", "all"):  # `checker` retrains it alone, on the VAE already in --out
        from diffusers import AutoencoderKL

        if args.stage != "checker":
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


def build_sdxl(args, device, log: dict, log_path: Path) -> None:
    """tiny-xl: the `vae` stage re-measures tiny's VAE (and copies the checker), `unet` trains, `eval` judges."""
    import tiny_xl_stages as xl

    log["family"] = "sdxl"
    if args.stage in ("vae", "checker", "all"):
        log |= xl.prepare_vae(args, device, render_pool, to_pixels)
    if args.stage in ("unet", "all"):
        log |= {f"run{len([k for k in log if k.startswith('run')]) + 1}": xl.train_unet_xl(args, device, render_pool, to_pixels)}
        log_path.write_text(json.dumps(log, indent=2) + "\n")
    if args.stage in ("unet", "eval", "all") and not args.no_eval:
        log |= evaluate(args, device)
    log_path.write_text(json.dumps(log, indent=2) + "\n")
    xl.write_card(args.out, log, args)
    print(json.dumps(log), flush=True)


if __name__ == "__main__":
    main()
