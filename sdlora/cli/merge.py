"""`sdlora merge` and `sdlora resize`: thin argument parsing over sdlora.merge and sdlora.resize."""

from __future__ import annotations

import argparse
from pathlib import Path

from sdlora.errors import SdloraError
from sdlora.util import DTYPE_NAMES
from sdlora.util import info as _info

EPILOG_MERGE = """examples:
  sdlora merge --base ./sd15 --lora a.safetensors:0.8 --lora b.safetensors:0.5 --output ./sd15-merged
  sdlora merge --base ./sd15 --lora a.safetensors:0.8 --output sd15-merged.safetensors   # one LDM-layout file
  sdlora merge --lora a.safetensors:1 --lora b.safetensors:0.5 --output ab.safetensors   # exact (ranks add up)
  sdlora merge --lora a.safetensors --lora b.safetensors --rank 16 --output ab16.safetensors  # SVD to rank 16"""

EPILOG_RESIZE = """examples:
  sdlora resize lora.safetensors --rank 8                 # writes lora-r8.safetensors
  sdlora resize lora.safetensors --energy 0.9 --output small.safetensors
The new alpha keeps each module's alpha/rank scale (kohya's rule); the error is measured on the written file."""



def register(subparsers) -> None:
    m = subparsers.add_parser("merge", help="bake LoRAs into a base model, or combine LoRAs into one LoRA file",
                              epilog=EPILOG_MERGE, formatter_class=argparse.RawDescriptionHelpFormatter)
    m.add_argument("--base", help="base to bake into ('tiny', a diffusers folder or a hub id); without it the LoRAs "
                                  "are combined into one LoRA file")
    m.add_argument("--lora", action="append", required=True, metavar="FILE[:S[:TE]][:lbw=BLOCKS]",
                   help="LoRA at UNet strength S and text-encoder strength TE (default 1; negative allowed), per-block "
                        "strengths baked in with lbw= a preset (OUTALL...) or 17/26 (SD1) or 12/20 (SDXL) values; repeatable")
    m.add_argument("--output", required=True, help="a folder (diffusers) or FILE.safetensors")
    m.add_argument("--rank", type=int, help="LoRA merge only: SVD of the summed update to this rank per module "
                                            "(default: exact, ranks concatenated)")
    m.add_argument("--save-dtype", choices=DTYPE_NAMES, default="fp16", help="dtype of the written weights (default: fp16)")
    m.add_argument("--overwrite", action="store_true", help="replace an existing output")
    m.set_defaults(func=cmd_merge)

    r = subparsers.add_parser("resize", help="reduce a LoRA's rank by SVD, reporting retained energy and error",
                              epilog=EPILOG_RESIZE, formatter_class=argparse.RawDescriptionHelpFormatter)
    r.add_argument("file", help="LoRA .safetensors file")
    target = r.add_mutually_exclusive_group(required=True)
    target.add_argument("--rank", type=int, help="new rank of every module (modules already smaller keep theirs)")
    target.add_argument("--energy", type=float, help="per module, the smallest rank keeping this fraction of the "
                                                     "squared singular values, e.g. 0.9")
    r.add_argument("--output", help="output file (default: FILE-rR.safetensors or FILE-eE.safetensors beside FILE)")
    r.add_argument("--save-dtype", choices=DTYPE_NAMES, default="fp16", help="dtype of the written file (default: fp16)")
    r.add_argument("--overwrite", action="store_true", help="replace an existing output")
    r.set_defaults(func=cmd_resize)


def _check_output(path: Path, overwrite: bool) -> None:
    if path.exists() and not overwrite:
        raise SdloraError(f"{path} already exists; pass --overwrite or another --output")


def cmd_merge(args: argparse.Namespace) -> int:
    from sdlora.lora.specs import parse_lora_spec
    from sdlora.tools.merge import bake_into_base, merge_loras

    specs = [parse_lora_spec(s) for s in args.lora]
    for s in specs:
        if not Path(s.path).is_file():
            raise SdloraError(f"adapter file not found: {s.path}")
    output = Path(args.output)
    if args.base:
        if args.rank is not None:
            raise SdloraError("--rank applies to combining LoRAs into one file; baking into --base is always exact")
        result = bake_into_base(args.base, specs, output, args.save_dtype, args.overwrite)
        _info(f"baked {len(specs)} LoRA(s) into {args.base} ({result.modules} layers changed): {output}")
    else:
        _check_output(output, args.overwrite)
        result = merge_loras(specs, output, args.rank, args.save_dtype)
        how = f"SVD to rank {args.rank}" if args.rank is not None else "exact, ranks concatenated"
        _info(f"merged {len(specs)} LoRA(s) into {result.modules} modules ({how}), sha256 {result.sha256[:10]}")
        if result.report:
            _info(result.report.summary())
    print(output)
    return 0


def cmd_resize(args: argparse.Namespace) -> int:
    from sdlora.tools.resize import resize_file

    src = Path(args.file)
    if args.output:
        output = Path(args.output)
    else:
        tag = f"r{args.rank}" if args.rank is not None else f"e{args.energy:g}"
        output = src.with_name(f"{src.stem}-{tag}.safetensors")
    _check_output(output, args.overwrite)
    sha, report = resize_file(src, output, args.rank, args.energy, args.save_dtype)
    ranks = sorted(set(report.ranks.values()))
    shown = str(ranks[0]) if len(ranks) == 1 else f"{ranks[0]}-{ranks[-1]}"
    _info(f"resized {len(report.ranks)} modules to rank {shown}, sha256 {sha[:10]}; {report.summary()}")
    print(output)
    return 0
