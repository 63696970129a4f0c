"""`sdlora` command line: a thin layer over the Python API. Errors become one line, never a traceback."""

from __future__ import annotations

import argparse
import os
import sys

from sdlora.cli import eval as cli_eval
from sdlora.cli import files as cli_files
from sdlora.cli import generate as cli_generate
from sdlora.cli import merge as cli_merge
from sdlora.cli import train as cli_train
from sdlora.cli import ui as cli_ui
from sdlora.errors import SdloraError
from sdlora.util import configure_cpu_threads, describe_os_error

# Every command module, in --help order; each has register(subparsers).
COMMANDS = (cli_train, cli_generate, cli_eval, cli_merge, cli_files, cli_ui)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sdlora", description="Train and mix Stable Diffusion style LoRAs (kohya-format files).")
    sub = parser.add_subparsers(dest="command", required=True)
    for module in COMMANDS:  # each adds its subcommands and keeps its handlers to itself
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # import-time notices are not for our users
    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # what --gpus re-runs in each process
    try:
        if args.command in ("train", "generate", "eval", "merge"):  # the commands that compute; others start faster
            configure_cpu_threads(announce=lambda m: print(f"sdlora: {m}", file=sys.stderr))
        return args.func(args)
    except SdloraError as e:
        if os.environ.get("RANK", "0") == "0":  # several processes fail alike: the main one says so
            print(f"sdlora: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a path or permission mistake the commands did not phrase better: still one line
        print(f"sdlora: error: {describe_os_error(e)}", file=sys.stderr)
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
    finally:
        leave_process_group()


def leave_process_group() -> None:
    """A launched process leaves its process group before exiting, as torch asks (nccl warns otherwise)."""
    torch = sys.modules.get("torch")
    if torch is not None and torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
