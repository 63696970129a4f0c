"""`--gpus N` for train, generate and eval: the command re-runs itself in N processes through `accelerate launch`
(sdlora/training/dist.py starts them), or runs here when it already is one of them."""

from __future__ import annotations

import argparse


def add_gpus_argument(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--gpus", type=int, metavar="N",
                   help=f"run on N GPUs of this host, as N processes started through `accelerate launch` ({what}); "
                        "with --device cpu, N CPU processes over gloo")


def relaunched(args: argparse.Namespace, device: str | None, check=None) -> int | None:
    """The exit code of this command re-run in --gpus processes, or None when it is to run in this process.
    `check()` validates the input first, so bad input fails once here rather than in every process."""
    from sdlora.training import dist

    if args.gpus is None:
        return None
    dist.check_processes(args.gpus, device)
    if args.gpus == 1 or dist.launched():
        return None
    if check is not None:
        check()
    return dist.launch(dist.strip_option(args.argv, "--gpus"), args.gpus)
