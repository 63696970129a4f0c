"""The SDXL stages of scripts/build_tiny_base.py (`--family sdxl`): the tiny-xl base on the same procedural world.

Stage `vae`: tiny's VAE is reused as it is (same architecture as SDXL's); only its scaling factor is re-chosen the way
SDXL's 0.13025 was, one over the standard deviation of its latents, measured here on renders of every style. The
world checker is tiny's, shipped in sdlora/assets (it judges images, whichever model drew them).
Stage `unet`: the SDXL UNet (sdlora/models/tiny_xl.py) and both text encoders, text encoder 1 starting from tiny's,
trained together on plain-style renders with SDXL's conditioning: the two encoders' penultimate hidden states
concatenated, encoder 2's pooled projection and six time ids. 10% of captions are dropped for classifier-free guidance
by zeroing both embeddings, as SGM trained SDXL (so `force_zeros_for_empty_prompt` is right at inference). Half the
samples claim a larger original size (128-512 px): a procedural render downscaled to 128 px is the same picture, so
the model learns to draw the same thing whatever size it is told, as LoRA datasets of any size will tell it.
"""

from __future__ import annotations

import copy
import json
import shutil
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from sdlora.eval import world
from sdlora.models import tiny_xl
from sdlora.models.sdxl import bundled_config
from sdlora.models.tiny import TOKENIZER_DIR

INDEX = {"_class_name": "StableDiffusionXLPipeline", "_diffusers_version": "0.42.1", "force_zeros_for_empty_prompt": True,
         "feature_extractor": [None, None], "image_encoder": [None, None],
         "scheduler": ["diffusers", "EulerDiscreteScheduler"], "text_encoder": ["transformers", "CLIPTextModel"],
         "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"], "tokenizer": ["transformers", "CLIPTokenizer"],
         "tokenizer_2": ["transformers", "CLIPTokenizer"], "unet": ["diffusers", "UNet2DConditionModel"],
         "vae": ["diffusers", "AutoencoderKL"]}


def prepare_vae(args, device, render_pool, to_pixels) -> dict:
    """tiny's VAE with the SDXL rule for its scaling factor."""
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(args.tiny_from / "vae").float().to(device).eval()
    n = max(8, min(args.vae_images, 2048))
    images, _, _ = render_pool(list(world.STYLES), n, args.seed + 3, args.workers)
    with torch.no_grad():
        z = torch.cat([vae.encode(to_pixels(images[i : i + 256], device)).latent_dist.mean for i in range(0, n, 256)])
    std = float(z.float().std())
    vae.register_to_config(scaling_factor=1.0 / std)
    vae.to(torch.float16).save_pretrained(args.out / "vae")
    print(f"vae: tiny's, latent std {std:.4f} over {n} renders -> scaling_factor {1 / std:.4f}", flush=True)
    return {"vae_from": str(args.tiny_from / "vae"), "vae_latent_std": std, "vae_scaling_factor": 1.0 / std,
            "vae_std_images": n}


def _encode(te1, te2, ids1, ids2):
    o1 = te1(ids1, output_hidden_states=True)
    o2 = te2(ids2, output_hidden_states=True)
    return torch.cat([o1.hidden_states[-2], o2.hidden_states[-2]], -1), o2.text_embeds


def train_unet_xl(args, device, render_pool, to_pixels) -> dict:
    from diffusers import AutoencoderKL, DDPMScheduler, EulerDiscreteScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    size = args.size
    vae = AutoencoderKL.from_pretrained(args.out / "vae").float().to(device).eval()
    tok1 = CLIPTokenizer.from_pretrained(TOKENIZER_DIR)
    tok2 = CLIPTokenizer.from_pretrained(TOKENIZER_DIR, pad_token="!")
    t0 = time.time()
    images, captions, _ = render_pool(["plain"], args.unet_images, args.seed + 2, args.workers)
    with torch.no_grad():
        moments = torch.cat([
            torch.cat([d.mean, d.logvar], 1)
            for d in (vae.encode(to_pixels(images[i : i + 256], device)).latent_dist for i in range(0, len(images), 256))
        ]).float()
    tokens = lambda tok: tok(captions, padding="max_length", max_length=77, truncation=True,  # noqa: E731
                             return_tensors="pt").input_ids.to(device)
    ids1, ids2 = tokens(tok1), tokens(tok2)
    print(f"rendered + encoded {len(images)} plain images in {time.time() - t0:.0f}s", flush=True)
    del images
    torch.manual_seed(args.seed)
    if args.init_from:
        unet = UNet2DConditionModel.from_pretrained(args.init_from / "unet").float().to(device)
        te1 = CLIPTextModel.from_pretrained(args.init_from / "text_encoder").float().to(device)
        te2 = CLIPTextModelWithProjection.from_pretrained(args.init_from / "text_encoder_2").float().to(device)
    else:
        unet = UNet2DConditionModel(**tiny_xl.UNET_CONFIG).to(device)
        te1 = CLIPTextModel.from_pretrained(args.tiny_from / "text_encoder").float().to(device)  # tiny's, a head start
        te2 = CLIPTextModelWithProjection(CLIPTextConfig(**tiny_xl.TEXT_CONFIG_2)).to(device)
    models = (unet, te1, te2)
    emas = [copy.deepcopy(m).requires_grad_(False) for m in models]
    sched_config = bundled_config("scheduler")
    sched = DDPMScheduler.from_config(sched_config)
    sched.alphas_cumprod = sched.alphas_cumprod.to(device)
    params = [p for m in models for p in m.parameters()]
    opt = torch.optim.AdamW(params, lr=args.unet_lr, weight_decay=1e-2, fused=device.type == "cuda")
    g = torch.Generator(device=device).manual_seed(args.seed)
    scale = vae.config.scaling_factor
    sizes = torch.arange(size, 4 * size + 1, 64, device=device).float()
    t0, step, ema_loss = time.time(), 0, None
    while step < args.unet_steps and (time.time() - t0) < args.unet_minutes * 60:
        for grp in opt.param_groups:
            grp["lr"] = args.unet_lr * min(1.0, (step + 1) / args.warmup)
        b = args.unet_batch
        idx = torch.randint(0, len(moments), (b,), device=device, generator=g)
        mean, logvar = moments[idx].chunk(2, dim=1)
        lat = (mean + torch.exp(0.5 * logvar) * torch.randn(mean.shape, device=device, generator=g)) * scale
        noise = torch.randn(lat.shape, device=device, generator=g)
        t = torch.randint(0, sched.config.num_train_timesteps, (b,), device=device, generator=g)
        keep = (torch.rand(b, device=device, generator=g) >= 0.1).float()
        claimed = sizes[torch.randint(0, len(sizes), (b,), device=device, generator=g)]
        original = torch.where(torch.rand(b, device=device, generator=g) < 0.5, torch.full_like(claimed, size), claimed)
        zeros, target = torch.zeros_like(original), torch.full_like(original, size)
        time_ids = torch.stack([original, original, zeros, zeros, target, target], 1)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            context, pooled = _encode(te1, te2, ids1[idx], ids2[idx])
            context, pooled = context * keep[:, None, None], pooled * keep[:, None]
            pred = unet(sched.add_noise(lat, noise, t), t, context,
                        added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}).sample
        loss = F.mse_loss(pred.float(), noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        step += 1
        decay = min(args.ema, (1 + step) / (10 + step))
        with torch.no_grad():
            for src, dst in zip(models, emas):
                torch._foreach_lerp_(list(dst.parameters()), list(src.parameters()), 1 - decay)
        ema_loss = loss.item() if ema_loss is None else 0.99 * ema_loss + 0.01 * loss.item()
        if step % 500 == 0:
            print(f"unet step {step} loss {ema_loss:.4f} ({time.time() - t0:.0f}s)", flush=True)
    for m, name in zip(emas, ("unet", "text_encoder", "text_encoder_2")):
        m.to(torch.float16).save_pretrained(args.out / name)  # shipped in fp16
    save_tokenizers(args.out)
    EulerDiscreteScheduler.from_config(sched_config).save_pretrained(args.out / "scheduler")
    (args.out / "model_index.json").write_text(json.dumps(INDEX, indent=2) + "\n")
    if (args.tiny_from / "sdlora_defaults.json").exists():  # tiny's LoRA defaults, until tuned on tiny-xl itself
        shutil.copy(args.tiny_from / "sdlora_defaults.json", args.out / "sdlora_defaults.json")
    return {"unet_steps": step, "unet_seconds": round(time.time() - t0), "unet_batch": args.unet_batch,
            "unet_lr": args.unet_lr, "unet_init_from": str(args.init_from) if args.init_from else None,
            "unet_final_loss": ema_loss, "unet_images": args.unet_images, "te1_init": str(args.tiny_from / "text_encoder")}


def save_tokenizers(out: Path) -> None:
    """The bundled BPE files as they are (1.5 MB, not transformers 5's 3.6 MB tokenizer.json), tokenizer_2 padding
    with '!' as SDXL's OpenCLIP tokenizer does."""
    for name, pad in (("tokenizer", None), ("tokenizer_2", "!")):
        shutil.copytree(TOKENIZER_DIR, out / name, dirs_exist_ok=True)
        if pad:
            for f in ("tokenizer_config.json", "special_tokens_map.json"):
                data = json.loads((out / name / f).read_text()) | {"pad_token": pad}
                (out / name / f).write_text(json.dumps(data, indent=2) + "\n")


CARD = """# sdlora tiny-xl base (model card)

An SDXL-architecture text-to-image model small enough for a laptop CPU, trained by
`scripts/build_tiny_base.py --family sdxl` on the procedural world of `sdlora/eval/world.py`. It is what
`--base tiny-xl` loads: SDXL LoRAs (lora_unet_input_blocks_*, lora_te1_*, lora_te2_*) train, mix and get measured
offline on it, as LoRAs for SD 1.x do on `tiny`.

## Architecture (SDXL's classes, block pattern and module names; small widths)
- UNet2DConditionModel: DownBlock2D + 2 CrossAttnDownBlock2D, transformer depths 1/2/10 (mid block 10), 2 layers per
  block, widths {widths}, Linear proj_in/proj_out, context {context} (= {te1} + {te2}), added conditioning = pooled
  text embedding ({pooled}) + 6 time ids x {tdim}: 70 transformer blocks, 722 kohya LoRA modules as in SDXL 1.0.
- Text encoder 1: CLIPTextModel, 12 layers, hidden {te1} (started from tiny's); text encoder 2:
  CLIPTextModelWithProjection, 32 layers, hidden {te2}, gelu, pooled projection {pooled}; tokenizer_2 pads with '!'
  as SDXL's does. Context = penultimate hidden states of both, concatenated.
- AutoencoderKL: tiny's (4 levels, 8x down), scaling factor {scale:.4f} (1 / latent std {std:.4f}, the rule SDXL's
  0.13025 came from). 128x128 images <-> 16x16x4 latents. SDXL's scaled-linear schedule, epsilon prediction.
- fp16 safetensors, {mb:.1f} MB in all. `sdlora_defaults.json` holds tiny's LoRA defaults (not re-tuned on tiny-xl).

## Training ({date}, {device}, torch {torch})
UNet + both text encoders: {steps} steps at batch {batch}, lr {lr}, EMA {ema}, seed {seed}, {seconds} s, on {images}
plain-style renders (10% of captions dropped by zeroing both embeddings; half the samples told a 128-512 px original
size). `build_log.json` beside this file is the builder's own record.

## Quality (`scripts/build_tiny_base.py --family sdxl --stage eval`, DPM++ 20 steps, CFG 7.5, seeds 0-{last})
On the {prompts} held-out prompts the world checker reads the prompted colour right {colour:.1%} and the shape right
{shape:.1%} of the time (tiny's bar: 80% / 70%); plain-style score {plain:.3f}, read as styled {styled:.3f}.
"""


def write_card(out: Path, log: dict, args) -> None:
    """The model card from the build log; only once there are evaluation numbers to put in it."""
    if "eval_colour_acc" not in log:
        return
    run = log[max((k for k in log if k.startswith("run")), key=lambda k: int(k[3:]))]
    cfg, t1, t2 = tiny_xl.UNET_CONFIG, tiny_xl.TEXT_CONFIG_1, tiny_xl.TEXT_CONFIG_2
    mb = sum(f.stat().st_size for f in out.rglob("*.safetensors") if f.name != "checker.safetensors") / 1e6
    text = CARD.format(
        widths="/".join(map(str, cfg["block_out_channels"])), context=cfg["cross_attention_dim"], te1=t1["hidden_size"],
        te2=t2["hidden_size"], pooled=t2["projection_dim"], tdim=cfg["addition_time_embed_dim"],
        scale=log["vae_scaling_factor"], std=log["vae_latent_std"], mb=mb, date=time.strftime("%Y-%m-%d"),
        device=log["device"], torch=log["torch"], steps=run["unet_steps"], batch=run["unet_batch"], lr=run["unet_lr"],
        ema=args.ema, seed=args.seed, seconds=run["unet_seconds"], images=run["unet_images"],
        last=log["eval_prompts"] - 1, prompts=log["eval_prompts"], colour=log["eval_colour_acc"],
        shape=log["eval_shape_acc"], plain=log["eval_plain_style"], styled=log["eval_read_as_styled"])
    (out / "README.md").write_text(text)
