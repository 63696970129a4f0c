"""`sdlora` command line: a thin layer over the Python API. Errors become one line, never a traceback."""

from __future__ import annotations

import argparse
import os
import sys
import types
import typing
from dataclasses import MISSING, fields
from pathlib import Path

from sdlora.cli import eval as cli_eval
from sdlora.cli import files as cli_files
from sdlora.cli import merge as cli_merge
from sdlora.errors import SdloraError
from sdlora.training.config import TrainConfig, make_config

EPILOG_TRAIN = """examples:
  sdlora train --images datasets/sketch --trigger "sks sketch" --rank 4
  sdlora train --config configs/sd15-style.toml --images ./my_style --base ./stable-diffusion-v1-5
  sdlora train --resume output/lora            # continue an interrupted run
Options in a --config TOML file use the flag names with underscores; flags given here override them."""


def _field_type(f) -> type:
    t = f.type if not isinstance(f.type, str) else eval(f.type, vars(typing) | {"Path": Path})  # noqa: S307 - our own annotations
    if isinstance(t, types.UnionType) or typing.get_origin(t) is typing.Union:
        t = next(a for a in typing.get_args(t) if a is not type(None))
    return typing.get_origin(t) or t


def add_train_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="TOML file with any of these options (flags override it)")
    for f in fields(TrainConfig):
        if f.metadata.get("hidden"):
            continue
        flag = "--" + f.name.replace("_", "-")
        default = f.default if f.default is not MISSING else f.default_factory()
        kw = {"dest": f.name, "default": argparse.SUPPRESS, "help": f.metadata["help"]}
        t = _field_type(f)
        if t is bool:
            p.add_argument(flag, action=argparse.BooleanOptionalAction, **kw)
            continue
        if f.metadata.get("action") == "append":
            p.add_argument(flag, action="append", metavar=f.name.upper(), **kw)
            continue
        if default not in (None, "", []):
            kw["help"] += f" (default: {default})"
        if "choices" in f.metadata:
            kw["choices"] = f.metadata["choices"]
        p.add_argument(flag, type=t, metavar=None if "choices" in f.metadata else f.name.split("_")[-1].upper(), **kw)


def cmd_train(args: argparse.Namespace) -> int:
    from sdlora.training.loop import resume_config, train

    given = {k: v for k, v in vars(args).items() if k not in ("command", "config", "func")}
    if given.get("resume") and not given.get("images") and not args.config:
        resume = given.pop("resume")
        cfg, _ = resume_config(given, resume)
    else:
        cfg = make_config(args.config, **given)
    result = train(cfg)
    if result.interrupted:
        return 130
    print(result.adapter)
    return 0


def add_generate_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--base", default="tiny", help="base model: 'tiny', a diffusers folder, an SD1.x .safetensors/.ckpt file or a hub id (default: tiny)")
    p.add_argument("--prompt", required=True, help="prompt; A1111 tags like <lora:NAME:0.8> load LoRAs from --lora-dir")
    p.add_argument("--negative", default="", help="negative prompt")
    p.add_argument("--lora", action="append", default=[], metavar="FILE[:S[:TE]]",
                   help="LoRA file at UNet strength S and text-encoder strength TE (default 1; negative allowed); repeatable")
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


def cmd_generate(args: argparse.Namespace) -> int:
    import torch

    from sdlora.formats.kohya import load_adapter
    from sdlora.lora.mixer import LoraMixer, parse_lora_spec
    from sdlora.models.base import load_base
    from sdlora.sample.generate import extract_prompt_loras, generate_images, save_images

    if args.num_images < 1 or args.steps < 1:
        raise SdloraError("--num-images and --steps must be at least 1")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    precision = args.precision or ("fp16" if device.startswith("cuda") else "fp32")
    prompt, tag_specs = extract_prompt_loras(args.prompt, args.lora_dir)
    specs = [parse_lora_spec(s) for s in args.lora] + tag_specs
    adapters = [load_adapter(spec.path) for spec in specs]  # bad files fail before the base loads
    base = load_base(args.base, precision, device)
    mixer = LoraMixer(base)
    for spec, adapter in zip(specs, adapters):
        mixer.add(adapter, spec.strength, spec.te_strength)
    run = lambda: generate_images(  # noqa: E731
        base, prompt, args.negative, args.seed, args.steps, args.guidance, args.width, args.height, args.num_images, args.scheduler,
        args.cuda_graph,
    )
    if args.fuse and specs:
        with mixer.fused():
            images = run()
    else:
        images = run()
    loras = ", ".join(f"{Path(s.path).stem}:{s.strength}" for s in specs)
    params = (f"{prompt}\nNegative prompt: {args.negative}\nSteps: {args.steps}, Sampler: {args.scheduler}, "
              f"CFG scale: {args.guidance}, Seed: {args.seed}, Model: {args.base}" + (f", LoRAs: {loras}" if loras else ""))
    for p in save_images(images, Path(args.output), f"{args.seed}", params):
        print(p)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sdlora", description="Train and mix Stable Diffusion style LoRAs (kohya-format files).")
    sub = parser.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train a LoRA from a folder of captioned images", epilog=EPILOG_TRAIN,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    add_train_arguments(t)
    t.set_defaults(func=cmd_train)
    g = sub.add_parser("generate", help="generate images with a base and any number of LoRAs at chosen strengths")
    add_generate_arguments(g)
    g.set_defaults(func=cmd_generate)
    for module in (cli_eval, cli_merge, cli_files):  # each adds its subcommands and keeps its handlers to itself
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # import-time notices are not for our users
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except SdloraError as e:
        print(f"sdlora: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("sdlora: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # out of memory is the one runtime failure users can fix with options
        import torch

        if isinstance(e, torch.cuda.OutOfMemoryError):
            print("sdlora: error: out of GPU memory; reduce it with --batch-size 1, --gradient-checkpointing, "
                  "--mixed-precision bf16, --precision fp16, a lower --resolution or --no-text-encoder", file=sys.stderr)
            return 3
        raise


if __name__ == "__main__":
    sys.exit(main())
