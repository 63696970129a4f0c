"""`sdlora train`: flags generated from TrainConfig, resume, and the call into sdlora.training."""

from __future__ import annotations

import argparse
import types
import typing
from dataclasses import MISSING, fields
from pathlib import Path

from sdlora.training.config import TrainConfig, make_config
from sdlora.util import check_output_folder

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
    check_output_folder(cfg.resolved_output())
    result = train(cfg)
    if result.interrupted:
        return 130
    print(result.adapter)
    return 0



def register(sub) -> None:
    t = sub.add_parser("train", help="train a LoRA from a folder of captioned images", epilog=EPILOG_TRAIN,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    add_train_arguments(t)
    t.set_defaults(func=cmd_train)
