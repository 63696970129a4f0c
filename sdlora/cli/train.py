"""`sdlora train`: flags generated from TrainConfig, resume, and the call into sdlora.training."""

from __future__ import annotations

import argparse
import os
import signal
import types
import typing
from dataclasses import MISSING, fields
from pathlib import Path

from sdlora.cli.launch import add_gpus_argument, relaunched
from sdlora.training.config import TrainConfig, make_config
from sdlora.util import check_output_folder

STOP_ON_SIGINT = "SDLORA_STOP_ON_SIGINT"  # set by `sdlora ui` for its jobs: SIGINT stops the run even where it was ignored
EPILOG_TRAIN = """examples:
  sdlora train --images datasets/sketch --trigger "sks sketch" --rank 4
  sdlora train --config configs/sd15-style.toml --images ./my_style --base ./stable-diffusion-v1-5
  sdlora train --resume output/lora            # continue an interrupted run
  sdlora train --gpus 2 --images ./my_style --batch-size 4   # 2 GPUs x 4 images per step
  accelerate launch --num_processes 2 -m sdlora train --images ./my_style   # the same, started by accelerate
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
    from sdlora.training import dist
    from sdlora.training.loop import resume_config, train

    given = {k: v for k, v in vars(args).items() if k not in ("command", "config", "func", "gpus", "argv")}
    resuming = given.get("resume") and not given.get("images") and not args.config
    if resuming:
        resume = given.pop("resume")
        before_launch = (args.gpus or 1) > 1 and not dist.launched()  # the launched processes report the re-cut batch
        cfg, _ = resume_config(given, resume, **({"info": lambda msg: None} if before_launch else {}))
    else:
        cfg = make_config(args.config, **given)
    check_output_folder(cfg.resolved_output())
    if (code := relaunched(args, cfg.device, lambda: check_images(cfg))) is not None:
        return code
    if os.environ.get(STOP_ON_SIGINT) and signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        # a job of `sdlora ui` whose server started in the background (`sdlora ui &`: the shell ignores SIGINT in it
        # and its children): the page's Stop is SIGINT, so take it as Ctrl-C again
        signal.signal(signal.SIGINT, signal.default_int_handler)
    result = train(cfg)
    if result.interrupted:
        return 130
    if dist.current().is_main:
        print(result.adapter)
    return 0


def check_images(cfg: TrainConfig) -> None:
    """The image folder is read before the processes start, so a bad one fails once, with one line."""
    from sdlora.data.folder import scan_images

    if cfg.images:
        scan_images(cfg.images, cfg.caption_ext, cfg.trigger, lambda msg: None)


def register(sub) -> None:
    t = sub.add_parser("train", help="train a LoRA from a folder of captioned images", epilog=EPILOG_TRAIN,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    add_train_arguments(t)
    add_gpus_argument(t, "--batch-size is per GPU")
    t.set_defaults(func=cmd_train)
