"""`sdlora inspect`, `sdlora meta` and `sdlora convert`: thin commands over the file tools in the library."""

from __future__ import annotations

import argparse
import json

from sdlora.errors import SdloraError


def cmd_inspect(args: argparse.Namespace) -> int:
    from sdlora.tools.inspect import format_report, inspect_adapter

    report = inspect_adapter(args.file)
    print(json.dumps(report, indent=2) if args.json else format_report(report))
    return 0


def _pair(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise SdloraError(f"--set '{text}': expected KEY=VALUE")
    return key.strip(), value


def cmd_meta(args: argparse.Namespace) -> int:
    from sdlora.formats.header import edit_metadata, read_header

    if not args.set and not args.unset:
        _, header = read_header(args.file)  # no edits: show the metadata
        print(json.dumps(header.get("__metadata__") or {}, indent=2, ensure_ascii=False))
        return 0
    result = edit_metadata(args.file, dict(_pair(s) for s in args.set), args.unset, force=args.force)
    if not result.changed:
        print("metadata unchanged")
    else:
        print(f"updated {', '.join(result.changed)}")
    if result.rehashed:
        print("ss_* metadata changed: recomputed sshs_model_hash and sshs_legacy_hash")
    print(f"sha256 {result.sha256} (AutoV2 {result.sha256[:10]})")
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    from sdlora.tools.convert import convert_adapter

    out, digest = convert_adapter(args.file, args.to, args.output)
    print(out)
    print(f"sha256 {digest} (AutoV2 {digest[:10]})")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("inspect", help="show an adapter file's format, architecture, ranks, targets, metadata and hashes")
    p.add_argument("file", help="adapter .safetensors file")
    p.add_argument("--json", action="store_true", help="print machine-readable JSON")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("meta", help="edit an adapter file's metadata in place (tensors untouched); no edits: show it",
                       epilog='example: sdlora meta style.safetensors --set trigger_phrase="sks style" --unset modelspec.tags')
    p.add_argument("file", help="adapter .safetensors file")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="trigger_phrase, description, title, author, license, tags, usage_hint (stored as modelspec.KEY) "
                        "or a full ss_*/modelspec.* key; repeatable")
    p.add_argument("--unset", action="append", default=[], metavar="KEY", help="remove a key; repeatable")
    p.add_argument("--force", action="store_true", help="edit a read-only file too (it keeps its mode)")
    p.set_defaults(func=cmd_meta)

    p = sub.add_parser("convert", help="rewrite a LoRA file in the kohya or the diffusers/peft layout")
    p.add_argument("file", help="adapter .safetensors file")
    p.add_argument("--to", required=True, choices=["kohya", "diffusers"], help="target layout")
    p.add_argument("--output", help="output file (default: FILE.<layout>.safetensors beside the input)")
    p.set_defaults(func=cmd_convert)
