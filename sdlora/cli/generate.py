"""`sdlora generate`: flags -> a LoRA mix on a base -> PNG files (sdlora.sample does the work)."""

from __future__ import annotations

import argparse
import contextlib
from pathlib import Path

from sdlora.cli.launch import add_gpus_argument
from sdlora.errors import SdloraError


def add_generate_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--base", default="tiny", help="base model: 'tiny', 'tiny-xl', 'tiny-looks', a diffusers folder, an SD 1.x/2.x/SDXL .safetensors/.ckpt file or a hub id (default: tiny)")
    p.add_argument("--vae", help="a VAE to use instead of the base's (diffusers folder, hub id or .safetensors); fp16 only if its config says force_upcast false")
    p.add_argument("--v-prediction", action="store_true", help="the base predicts v though its config or file does not say so")
    p.add_argument("--zero-terminal-snr", action="store_true", help="the base was trained with a zero-terminal-SNR schedule")
    p.add_argument("--prompt", required=True, help="prompt; A1111 tags like <lora:NAME:0.8> load LoRAs from --lora-dir")
    p.add_argument("--negative", default="", help="negative prompt")
    p.add_argument("--lora", action="append", default=[], metavar="FILE[:S[:TE]][:lbw=BLOCKS]",
                   help="LoRA file at UNet strength S and text-encoder strength TE (default 1; negative allowed), "
                        "per-block strengths lbw= a preset (ALL, INALL, MIDD, OUTALL...) or 17 comma-separated "
                        "values (BASE,IN01,IN02,IN04,IN05,IN07,IN08,MID,OUT03..OUT11); repeatable")
    p.add_argument("--lora-dir", help="folder searched for <lora:NAME:...> tags in the prompt")
    p.add_argument("--seed", type=int, default=0, help="seed of the first image; image i uses seed+i (default: 0)")
    p.add_argument("--steps", type=int, default=20, help="sampling steps (default: 20)")
    p.add_argument("--guidance", type=float, default=7.5, help="classifier-free guidance scale (default: 7.5)")
    p.add_argument("--width", type=int, help="image width (default: the base's native size)")
    p.add_argument("--height", type=int, help="image height (default: the base's native size)")
    p.add_argument("--num-images", type=int, default=1, help="images to make (default: 1)")
    p.add_argument("--scheduler", default="dpm++", choices=["dpm++", "euler", "euler-a", "ddim", "pndm"], help="sampler (default: dpm++)")
    p.add_argument("--precision", choices=["fp32", "fp16", "bf16"], help="weight dtype (default: fp32 on CPU, fp16 on GPU)")
    p.add_argument("--device", help="cpu, cuda... (default: cuda when available)")
    p.add_argument("--fuse", action="store_true", help="merge the LoRA mix into the weights while sampling (faster), unmerged exactly after")
    p.add_argument("--cuda-graph", action=argparse.BooleanOptionalAction, default=True,
                   help="on a GPU, replay the UNet steps from CUDA graphs (default: on)")
    p.add_argument("--output", default="output/images", help="folder for the PNGs (default: output/images)")
    add_gpus_argument(p, "the images are split across them; the same images as one GPU")


def cmd_generate(args: argparse.Namespace) -> int:
    import dataclasses

    import torch

    from sdlora.cli.launch import relaunched
    from sdlora.formats.kohya import load_adapter
    from sdlora.lora.mixer import LoraMixer
    from sdlora.lora.specs import extract_prompt_loras, parse_lora_spec
    from sdlora.models.base import load_base
    from sdlora.sample.generate import GenerateOptions, a1111_parameters, generate, save_images
    from sdlora.training import dist as dist_seam
    from sdlora.util import check_output_folder, default_device

    if args.num_images < 1 or args.steps < 1:
        raise SdloraError("--num-images and --steps must be at least 1")
    check_output_folder(args.output)
    prompt, tag_specs = extract_prompt_loras(args.prompt, args.lora_dir)
    specs = [parse_lora_spec(s) for s in args.lora] + tag_specs
    adapters = [load_adapter(spec.path) for spec in specs]  # bad files fail before the base loads
    for adapter in adapters:
        adapter.require_finite()
    if (code := relaunched(args, args.device)) is not None:
        return code
    proc = dist_seam.current()
    device = str(proc.device(torch.device(default_device(args.device))))
    proc.init(cpu=device == "cpu")
    precision = args.precision or ("fp16" if device.startswith("cuda") else "fp32")
    base = load_base(args.base, precision, device, args.vae, args.v_prediction, args.zero_terminal_snr)
    mixer = LoraMixer(base)
    for spec, adapter in zip(specs, adapters):
        mixer.add(adapter, spec.strength, spec.te_strength, blocks=spec.blocks)
    opts = GenerateOptions(prompt, args.negative, args.seed, args.steps, args.guidance, args.width, args.height,
                           args.num_images, args.scheduler, args.cuda_graph)
    mine = proc.share(args.num_images)  # image i is seeded seed + i, so any split makes the same images
    opts_mine = dataclasses.replace(opts, seed=opts.seed + mine.start, num_images=len(mine))
    images = []
    if len(mine):
        with mixer.fused() if args.fuse and specs else contextlib.nullcontext():
            images = generate(base, opts_mine)
    images = [img for part in proc.gather(images) for img in part]
    if proc.is_main:
        for p in save_images(images, Path(args.output), f"{args.seed}", a1111_parameters(opts, args.base, specs)):
            print(p)
    return 0


def register(sub) -> None:
    g = sub.add_parser("generate", help="generate images with a base and any number of LoRAs at chosen strengths")
    add_generate_arguments(g)
    g.set_defaults(func=cmd_generate)
