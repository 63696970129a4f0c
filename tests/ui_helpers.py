"""A `sdlora ui` server on a free port in a thread, and a small HTTP client for it (stdlib only)."""

from __future__ import annotations

import json
import socket
import threading
import time
import urllib.error
import urllib.request
import uuid
from contextlib import contextmanager
from pathlib import Path


class Client:
    def __init__(self, url: str):
        self.url = url

    def call(self, method: str, path: str, body=None, headers: dict | None = None, csrf: bool = True,
             raw: bytes | None = None) -> tuple[int, dict]:
        h = {"X-Sdlora": "1"} if csrf else {}
        h.update(headers or {})
        data = raw
        if body is not None:
            data = json.dumps(body).encode()
            h["Content-Type"] = "application/json"
        req = urllib.request.Request(self.url + path, data=data, method=method, headers=h)
        try:
            with urllib.request.urlopen(req, timeout=300) as r:
                payload = r.read()
                status = r.status
        except urllib.error.HTTPError as e:
            payload, status = e.read(), e.code
        try:
            return status, json.loads(payload)
        except ValueError:
            return status, {"raw": payload.decode(errors="replace")}

    def get(self, path: str, **kw) -> tuple[int, dict]:
        return self.call("GET", path, **kw)

    def post(self, path: str, body=None, **kw) -> tuple[int, dict]:
        return self.call("POST", path, body if body is not None else {}, **kw)

    def upload(self, folder: str, files: list[tuple[str, bytes]], caption: str = "") -> tuple[int, dict]:
        boundary = uuid.uuid4().hex
        parts = []
        for name, value in (("folder", folder), ("caption", caption)):
            parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode())
        for filename, content in files:
            parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="files"; filename="{filename}"\r\n'
                         f"Content-Type: application/octet-stream\r\n\r\n".encode() + content + b"\r\n")
        parts.append(f"--{boundary}--\r\n".encode())
        return self.call("POST", "/api/upload", raw=b"".join(parts),
                         headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})

    def wait_job(self, job_id: str, until, timeout: float = 300) -> dict:
        """Poll the job until `until(state)` holds; fails with the last state after `timeout` seconds."""
        deadline = time.time() + timeout
        while True:
            status, state = self.get(f"/api/jobs/{job_id}")
            assert status == 200, state
            if until(state):
                return state
            assert time.time() < deadline, f"job did not get there in {timeout}s: {state}"
            time.sleep(0.5)


def random_lora(path: Path, seed: int = 0) -> Path:
    """A small LoRA on the tiny base's cross-attention keys and values (random, strong), without training."""
    import torch

    from sdlora.formats.kohya import ModuleWeights, save_adapter

    g = torch.Generator().manual_seed(seed)
    mods = {}
    for block, ch in (("down_blocks_1", 96), ("mid_block", 96), ("up_blocks_3", 48)):
        for kind in ("k", "v"):
            name = f"lora_unet_{block}_attentions_0_transformer_blocks_0_attn2_to_{kind}"
            mods[name] = ModuleWeights(torch.randn(2, 64, generator=g), torch.randn(ch, 2, generator=g), 2.0)
    save_adapter(path, mods, {"ss_output_name": path.stem, "modelspec.trigger_phrase": "sks rand"}, torch.float32)
    return path


@contextmanager
def ui_server(root: Path, token: str | None = None, local_only: bool = True):
    """Serve `create_app(root)` on 127.0.0.1:<free port> until the block ends (running jobs are interrupted)."""
    import uvicorn

    from sdlora.ui.server import create_app

    app = create_app(root, token=token, local_only=local_only)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not server.started:
        assert time.time() < deadline and thread.is_alive(), "the ui server did not start"
        time.sleep(0.05)
    try:
        yield Client(f"http://127.0.0.1:{port}")
    finally:
        server.should_exit = True
        thread.join(600)  # a generation still running finishes first (torch threads must not outlive the process)
        sock.close()
