"""`sdlora ui`: a FastAPI app serving one static page and a JSON API over the same functions the CLI calls.

FastAPI + one HTML/JS page rather than Gradio: no build step and two small dependencies, and every action is a
plain HTTP call that tests (and scripts) drive directly. Safe by default: the paths it touches resolve under
--root; a token guards it when it listens beyond this machine; POSTs need a header a cross-site form cannot send;
bad input is a message, never a traceback.
"""

from __future__ import annotations

import hmac
import os
import sys
import traceback
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from sdlora import __version__
from sdlora.errors import SdloraError
from sdlora.ui import routes
from sdlora.ui.jobs import Jobs
from sdlora.ui.library import Library
from sdlora.ui.studio import Studio

STATIC = Path(__file__).parent / "static"
COOKIE = "sdlora_token"
CSRF_HEADER = "x-sdlora"
LOCAL_HOSTS = ("127.0.0.1", "localhost", "[::1]")


class App:
    """The server's state: the root, the jobs, the studio (one base, loaded on first use) and the library."""

    def __init__(self, root: Path, base: str = "tiny", device: str | None = None, precision: str | None = None,
                 token: str | None = None, local_only: bool = True):
        self.root = root.resolve()
        if not self.root.is_dir():
            raise SdloraError(f"--root is not a folder: {root}")
        self.base = base
        self.token = token
        self.local_only = local_only
        self.jobs = Jobs(self.root, self.root / ".sdlora-ui" / "jobs")
        self.studio = Studio(self.root, base, device, precision, self._device_busy)
        self.library = Library(self.root)

    def _device_busy(self) -> str | None:
        job = self.jobs.busy()
        if job is None:
            return None
        state = self.jobs.state(job.id)
        step = f"step {state['step']}/{state['total']}" if state["total"] else f"step {state['step']}"
        return f"waiting: '{job.name}' is training on the device ({step}); generation starts when it finishes"


def create_app(root: str | Path, base: str = "tiny", device: str | None = None, precision: str | None = None,
               token: str | None = None, local_only: bool = True) -> FastAPI:
    state = App(Path(root), base, device, precision, token, local_only)

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        yield
        state.jobs.shutdown()

    app = FastAPI(title="sdlora", version=__version__, lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url=None)
    app.state.sdlora = state

    @app.middleware("http")
    async def guard(request: Request, call_next):
        host = _hostname(request.headers.get("host") or "")
        if state.local_only and host not in LOCAL_HOSTS:
            return _error(421, f"this server answers for 127.0.0.1 only, not '{host}'")
        if state.token:
            given = request.cookies.get(COOKIE) or request.headers.get("authorization", "").removeprefix("Bearer ")
            query = request.query_params.get("token")
            if request.url.path == "/" and query and hmac.compare_digest(query, state.token):
                response = RedirectResponse("/", status_code=303)
                response.set_cookie(COOKIE, state.token, httponly=True, samesite="strict")
                return response
            if not given or not hmac.compare_digest(given, state.token):
                if request.url.path == "/":
                    return Response("sdlora ui: open the address with ?token=... as printed when the server started",
                                    status_code=401, media_type="text/plain")
                return _error(401, "not authorised: open the page with ?token=... as the server printed")
        if request.method not in ("GET", "HEAD", "OPTIONS") and request.headers.get(CSRF_HEADER) != "1":
            return _error(403, f"requests that change something need the '{CSRF_HEADER}: 1' header (the page sends it)")
        return await call_next(request)

    @app.exception_handler(SdloraError)
    async def sdlora_error(_: Request, exc: SdloraError):
        return _error(400, str(exc))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException):
        return _error(exc.status_code, str(exc.detail))

    @app.exception_handler(RequestValidationError)
    async def bad_request(_: Request, exc: RequestValidationError):
        parts = []
        for e in exc.errors():
            where = ".".join(str(p) for p in e.get("loc", ()) if p not in ("body", "query"))
            parts.append(f"{where}: {e.get('msg')}" if where else str(e.get("msg")))
        return _error(422, "; ".join(parts) or "bad request")

    @app.exception_handler(Exception)
    async def internal(_: Request, exc: Exception):
        traceback.print_exception(exc, file=sys.stderr)  # for the server's log; the page gets one line
        import torch

        if isinstance(exc, torch.cuda.OutOfMemoryError):
            return _error(500, "out of GPU memory: use a smaller size or fewer LoRAs, or wait for training to end")
        return _error(500, f"internal error ({type(exc).__name__}); the server log has the details")

    @app.get("/", include_in_schema=False)
    def index():
        return FileResponse(STATIC / "index.html", headers={"cache-control": "no-store"})

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    app.include_router(routes.router)
    return app


def app_from_env() -> FastAPI:
    """The app `sdlora ui` starts (uvicorn's factory): its settings come as SDLORA_UI_* variables."""
    env = os.environ.get
    return create_app(env("SDLORA_UI_ROOT", "."), env("SDLORA_UI_BASE", "tiny"), env("SDLORA_UI_DEVICE"),
                      env("SDLORA_UI_PRECISION"), env("SDLORA_UI_TOKEN"), env("SDLORA_UI_LOCAL", "1") == "1")


def _hostname(header: str) -> str:
    """The Host header without its port ('[::1]:7860' -> '[::1]')."""
    if header.startswith("["):
        return header.split("]")[0] + "]"
    return header.rsplit(":", 1)[0] if header.count(":") == 1 else header


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)
