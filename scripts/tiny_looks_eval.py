"""The looks base's evaluation and model card (scripts/tiny_looks_stages.py): content-only prompts of the held-out scenes
(world.eval_scenes) judged by the new checker (colour, shape, the plain look), then one row per training look named in
the prompt (does the base draw the look it is asked for); README.md is written from build_log.json.
"""

from __future__ import annotations

import random
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tiny_build_common import grid

from sdlora.eval import world
from sdlora.eval.looks import ALL_LOOKS, HELD_OUT_LOOKS, TRAINING_LOOKS, look_caption
from sdlora.models.tiny import LOOKS_UNET_CONFIG, LOOKS_VAE_CONFIG


@torch.no_grad()
def _generate(base, prompts: list[str], seeds: list[int], args, device, size: int, batch: int = 64) -> list[Image.Image]:
    """Batched DPM++ with CFG 7.5, each image from its seed's CPU noise as sdlora.sample.generate draws it, decoded by
    the VAE in its own dtype (fp32 under fp16) as generate does."""
    from sdlora.sample.generate import decode_latents

    pipe, images = base.pipeline(), []
    f, c = base.vae_scale_factor, base.unet.config.in_channels
    for i in range(0, len(prompts), batch):
        chunk = prompts[i : i + batch]
        lat = torch.stack([torch.randn((c, size // f, size // f), generator=torch.Generator().manual_seed(k)) for k in seeds[i : i + batch]])
        out = pipe(chunk, negative_prompt=[""] * len(chunk), num_inference_steps=args.eval_steps, guidance_scale=7.5,
                   latents=lat.to(device, base.unet.dtype), output_type="latent").images
        images += decode_latents(base, out, pipe.image_processor)
    return images


def evaluate(args, device, size: int) -> dict:
    from sdlora.eval.checker import judge, load_checker
    from sdlora.models.base import load_base

    t0 = time.time()
    base = load_base(str(args.out), "fp16" if device.type == "cuda" else "fp32", device)
    checker, names = load_checker(args.out / "checker.safetensors"), list(ALL_LOOKS)
    scenes = world.eval_scenes(args.eval_prompts)
    images = _generate(base, [world.caption(s) for s in scenes], list(range(len(scenes))), args, device, size)
    v = judge(checker, images)
    colour = float(np.mean([c == s.shapes[0].colour for c, s in zip(v["colour"], scenes)]))
    shape = float(np.mean([k == s.shapes[0].kind for k, s in zip(v["shape"], scenes)]))
    plain = float(v["style"][:, names.index("plain")].mean())
    top = {n: float(np.mean(v["style"].argmax(1) == k)) for k, n in enumerate(names) if np.any(v["style"].argmax(1) == k)}
    out = {"eval_prompts": len(scenes), "eval_colour_acc": colour, "eval_shape_acc": shape, "eval_plain_style": plain,
           "eval_top_look_share": top, "eval_sampler": f"DPM++ {args.eval_steps} steps, CFG 7.5, seeds 0-{len(scenes) - 1}",
           "eval_bars_met": {"colour >= 0.8": colour >= 0.8, "shape >= 0.7": shape >= 0.7, "plain >= 0.8": plain >= 0.8}}
    print(f"held-out prompts: colour {colour:.3f} shape {shape:.3f} plain {plain:.3f}", flush=True)
    grid(images[:32]).save(args.out / "samples.png")
    rows, sheet, rng = {}, [], random.Random(f"eval-looks/{args.seed}")
    few = scenes[: args.eval_look_prompts]  # each look from the same prompts' content and the same seeds
    named = _generate(base, [look_caption(s, look, True, rng) for look in TRAINING_LOOKS for s in few],
                      list(range(len(few))) * len(TRAINING_LOOKS), args, device, size)
    for n, look in enumerate(TRAINING_LOOKS):  # the look named in the prompt: does the base draw it?
        ims = named[n * len(few) : (n + 1) * len(few)]
        lv, k = judge(checker, ims), names.index(look)
        rows[look] = {"style_score": float(lv["style"][:, k].mean()), "top_look": float(np.mean(lv["style"].argmax(1) == k)),
                      "colour_acc": float(np.mean([c == s.shapes[0].colour for c, s in zip(lv["colour"], few)]))}
        sheet += ims[:8]
    grid(sheet, 8).save(args.out / "samples_looks.png")
    out |= {"eval_named_looks": rows, "eval_look_prompts": len(few), "eval_seconds": round(time.time() - t0),
            "eval_named_look_mean_score": float(np.mean([r["style_score"] for r in rows.values()]))}
    print("named looks: " + ", ".join(f"{k} {r['style_score']:.2f}" for k, r in rows.items()), flush=True)
    return out


def _pct(x) -> str:
    return "—" if x is None else f"{100 * x:.1f}%"


def _num(x) -> str:
    return "—" if x is None else f"{x:.1f}"


STYLE_SECTION = "## Style learning"


def write_card(out: Path, log: dict) -> None:
    r, u, c = log.get("vae_round_trip", {}), log.get("unet", {}), log.get("checker_per_look", {})
    n = u.get("parameters", {})
    rows = "\n".join(f"| {k} | {'held out' if v['held_out'] else 'training'} | {_pct(v['colour_acc'])} | {_pct(v['colour_acc_render'])} "
                     f"| {v['mae']:.1f} | {_num(v['line_mae'])} "
                     f"| {_pct(c.get(k, {}).get('style_acc'))} |" for k, v in r.items())
    named = "\n".join(f"| {k} | {v['style_score']:.3f} | {_pct(v['top_look'])} | {_pct(v['colour_acc'])} |"
                      for k, v in log.get("eval_named_looks", {}).items())
    text = f"""# sdlora tiny looks base (model card)

A Stable Diffusion 1.x-architecture text-to-image model at CPU size, trained from scratch by
`scripts/build_tiny_base.py --world looks` (scripts/tiny_looks_stages.py) on the procedural world drawn in the
{len(TRAINING_LOOKS)} training looks of `sdlora/eval/looks.py` (issue 15). The {len(HELD_OUT_LOOKS)} held-out looks
({', '.join(HELD_OUT_LOOKS)}) were never drawn nor named in its training data: they are for style LoRAs to teach.

## Architecture (same classes and module names as SD1.5)
- UNet2DConditionModel: widths {LOOKS_UNET_CONFIG['block_out_channels']}, 2 layers per block, cross-attention dim 64,
  transformer blocks at 16x16 and 8x8 only (none at 32x32, as SDXL has none at its top level), sample size 32 ({n.get('unet', 0) / 1e6:.1f}M parameters). Epsilon prediction, SD's DDPM schedule.
- AutoencoderKL: 3 levels (4x down), widths {LOOKS_VAE_CONFIG['block_out_channels']}, 4 latent channels
  ({n.get('vae', 0) / 1e6:.1f}M parameters), scaling factor {log.get('vae_scaling_factor', 0):.4f} (1 / latent std).
  128x128 images <-> 32x32x4 latents.
- CLIPTextModel: 12 layers, hidden 64, OpenAI CLIP's BPE tokenizer; the 49,408-row token table is kept (3.2M
  parameters, 6.3 MB in fp16) so the folder stays an ordinary SD1 folder ({n.get('text_encoder', 0) / 1e6:.1f}M parameters).
- Weights in fp16 safetensors, {u.get('weights_bytes_fp16', 0) / 1e6:.1f} MB in all.

## Data
Rendered on the fly, deterministic from the seed: the world's scenes (200 single-object combinations,
`world.eval_scenes`, excluded) in the training looks, cycled. The VAE and UNet saw the same {log.get('vae_images', 0):,}
renders, {_pct(u.get('plain_share'))} of them plain. {_pct(u.get('look_named'))} of the other looks' captions name the look
(`look_caption`) and {_pct(u.get('plain_named'))} of plain's, the rest describe content only (so that a content-only prompt
draws plain, as the base should before a style LoRA), and 10% were dropped for classifier-free guidance.

## Training ({log.get('device')}, torch {log.get('torch')}, seed {log.get('seed')})
| stage | steps | batch | lr | time |
|---|---|---|---|---|
| VAE (L1 + 0.5 MSE on luma and chroma x {log.get('vae_chroma_weight', 0)}, jitter {log.get('vae_jitter', 0)}, + KL) | {log.get('vae_steps')} | {log.get('vae_batch')} | {log.get('vae_lr')} | {log.get('vae_seconds')} s |
| checker ({len(ALL_LOOKS)} looks + two-look composites, width {log.get('checker_width')}) | {log.get('checker_steps')} | — | — | {log.get('checker_seconds')} s |
| UNet + text encoder (EMA {u.get('ema')}, warm-up {u.get('warmup')}) | {u.get('unet_steps')} | {u.get('unet_batch')} | {u.get('unet_lr')} | {u.get('unet_seconds')} s |

`build_log.json` beside this file is the builder's own record.

## VAE round trip (latent mean -> decode) and the checker, per look
Colour: the hue judge (`looks.hue_name`) names each object's colour from its pixels, after the round trip and, for
reference, on the render itself (bar: 97% after). MAE in 0..255 over the image and over thin lines.

| look | split | colour after | colour render | MAE | line MAE | checker style |
|---|---|---|---|---|---|---|
{rows}

Checker on {log.get('checker_held_scenes')} held-out scenes: colour {_pct(log.get('checker_colour_acc'))}, shape
{_pct(log.get('checker_shape_acc'))}, look {_pct(log.get('checker_style_acc'))}; two-look composites read as exactly
both looks {_pct(log.get('checker_mix_both_looks_acc'))}.

## Quality ({log.get('eval_sampler', 'not evaluated')})
On {log.get('eval_prompts')} held-out content-only prompts the new checker reads colour {_pct(log.get('eval_colour_acc'))},
shape {_pct(log.get('eval_shape_acc'))} and a plain-style score of {log.get('eval_plain_style', float('nan')):.3f} (bars: 80% / 70% / 0.8).
With a training look named in the prompt ({log.get('eval_look_prompts')} prompts each):

| look named | its checker score | top look | colour |
|---|---|---|---|
{named}
"""
    card = out / "README.md"  # what the style protocol measured on this base (written by hand) survives a rewrite
    kept = card.read_text().partition(STYLE_SECTION)[1:] if card.exists() else ("", "")
    card.write_text(text + ("\n" + "".join(kept) if kept[0] else ""))
