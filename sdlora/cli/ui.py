"""`sdlora ui`: start the browser page (train, watch, mix, files) on this machine."""

from __future__ import annotations

import argparse
import importlib.util
import os
import secrets
import sys
from pathlib import Path

from sdlora.errors import SdloraError

EPILOG = """examples:
  sdlora ui                                  # http://127.0.0.1:7860, files under the current folder
  sdlora ui --root ~/loras --port 7861
  sdlora ui --listen --auth SECRET           # other machines may connect, with the token
Needs the ui extra: pip install -e ".[ui]"."""


def register(subparsers) -> None:
    p = subparsers.add_parser("ui", help="open the browser page: train, watch progress, mix LoRAs, edit files",
                              epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", default=".", help="the folder the page may read and write; every path stays under it "
                                               "(default: the current folder)")
    p.add_argument("--port", type=int, default=7860, help="port (default: 7860)")
    p.add_argument("--listen", nargs="?", const="0.0.0.0", metavar="ADDRESS",
                   help="answer on ADDRESS (default 0.0.0.0: every interface) instead of 127.0.0.1; needs --auth, "
                        "or a token is generated and printed")
    p.add_argument("--auth", metavar="TOKEN", help="token the page must be opened with (?token=TOKEN)")
    p.add_argument("--base", default="tiny", help="base model for Mix & generate (default: tiny)")
    p.add_argument("--device", help="device for generation: cpu, cuda... (default: cuda when available)")
    p.add_argument("--precision", choices=["fp32", "fp16", "bf16"], help="weight dtype for generation")
    p.set_defaults(func=cmd_ui)


def listen_plan(listen: str | None, auth: str | None) -> tuple[str, str | None, bool]:
    """(host, token, local only): 127.0.0.1 by default; any other address only with a token (generated if none)."""
    if auth is not None and len(auth) < 8:
        raise SdloraError("--auth needs a token of at least 8 characters")
    if listen is None:
        return "127.0.0.1", auth, True
    return listen, auth or secrets.token_urlsafe(18), False


def cmd_ui(args: argparse.Namespace) -> int:
    """uvicorn loads the app by name (`sdlora.ui.server:app_from_env`): the ui room stays imported by nothing."""
    missing = [m for m in ("fastapi", "uvicorn", "multipart") if importlib.util.find_spec(m) is None]
    if missing:
        raise SdloraError(f"sdlora ui needs the ui extra ({', '.join(missing)} missing): pip install -e \".[ui]\"")
    if not 0 < args.port < 65536:
        raise SdloraError("--port must be 1..65535")
    root = Path(args.root).expanduser().resolve()
    if not root.is_dir():
        raise SdloraError(f"--root is not a folder: {args.root}")
    host, token, local = listen_plan(args.listen, args.auth)
    settings = {"ROOT": str(root), "BASE": args.base, "DEVICE": args.device, "PRECISION": args.precision,
                "TOKEN": token, "LOCAL": "1" if local else "0"}
    os.environ.update({f"SDLORA_UI_{k}": v for k, v in settings.items() if v is not None})
    shown = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    url = f"http://{shown}:{args.port}/" + (f"?token={token}" if token else "")
    if not local and not args.auth:
        print(f"--listen without --auth: generated the token {token}", file=sys.stderr)
    print(f"sdlora ui on {url} (files under {root}); Ctrl-C to stop", file=sys.stderr)
    import uvicorn

    uvicorn.run("sdlora.ui.server:app_from_env", factory=True, host=host, port=args.port, log_level="warning")
    return 0
