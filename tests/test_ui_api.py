"""`sdlora ui` over HTTP: paths stay under the root, limits and auth hold, bad input is a message, and the page's
actions (train, watch, stop/resume, mix, grid, file operations) do what the CLI does."""

import base64
import io
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("fastapi", reason="the ui extra (fastapi, uvicorn) is not installed")
pytest.importorskip("uvicorn", reason="the ui extra (fastapi, uvicorn) is not installed")

from urllib.parse import quote  # noqa: E402

from tests.ui_helpers import random_lora, ui_server  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
PASTEL = REPO / "datasets" / "pastel"


def _root(tmp_path, images: int = 6) -> Path:
    root = tmp_path / "root"
    d = root / "datasets" / "small"
    d.mkdir(parents=True)
    for png in sorted(PASTEL.glob("*.png"))[:images]:
        shutil.copy(png, d / png.name)
        shutil.copy(png.with_suffix(".txt"), d / png.with_suffix(".txt").name)
    return root


def _png(data_url: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(data_url.split(",", 1)[1]))))


def _png_bytes(color=(200, 30, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (32, 32), color).save(buf, format="PNG")
    return buf.getvalue()


def test_paths_outside_the_root_are_refused(tmp_path):
    root = _root(tmp_path, images=1)
    outside = tmp_path / "outside"
    outside.mkdir()
    random_lora(outside / "secret.safetensors")
    random_lora(root / "mine.safetensors")
    (root / "link.safetensors").symlink_to(outside / "secret.safetensors")
    (root / "linkdir").symlink_to(outside, target_is_directory=True)
    with ui_server(root) as c:
        assert c.get("/api/inspect?path=mine.safetensors")[0] == 200
        bad = ["../outside/secret.safetensors", str(outside / "secret.safetensors"), "link.safetensors",
               "linkdir/secret.safetensors", "datasets/../../outside/secret.safetensors", ".sdlora-ui/x.safetensors",
               "a\\b.safetensors", "C:/x.safetensors", "x;rm -rf.safetensors", "~/x.safetensors", ""]
        for path in bad:
            status, body = c.get(f"/api/inspect?path={quote(path)}")
            assert status == 400 and body["error"], (path, body)
        assert c.get("/api/image?path=../outside/secret.safetensors")[0] == 400
        assert c.get("/api/image?path=mine.safetensors")[0] == 400  # not an image
        for output in ["../evil.safetensors", str(tmp_path / "evil.safetensors"), "linkdir/evil.safetensors"]:
            status, body = c.post("/api/merge", {"loras": [{"path": "mine.safetensors"}], "output": output})
            assert status == 400, (output, body)
        status, body = c.post("/api/train", {"images": "../outside", "name": "x", "steps": 1})
        assert status == 400 and "root" in body["error"]
        for name in ["../x", "a/b", ".hidden", "x\ny"]:
            status, body = c.post("/api/train", {"images": "datasets/small", "name": name, "steps": 1})
            assert status == 400 and "run name" in body["error"], (name, body)
        status, body = c.post("/api/train", {"images": "datasets/small", "name": "x", "base": "/etc", "steps": 1})
        assert status == 400 and "relative" in body["error"]
        # nothing was written outside the root, nothing was started, and the server still answers
        assert sorted(p.name for p in outside.iterdir()) == ["secret.safetensors"]
        assert not (tmp_path / "evil.safetensors").exists()
        assert c.get("/api/jobs")[1]["jobs"] == []
        assert c.get("/api/info")[0] == 200
        assert [e["path"] for e in c.get("/api/library")[1]["loras"]] == ["mine.safetensors"]  # the link is left out


def test_uploads_are_checked_and_limited(tmp_path, monkeypatch):
    from sdlora.ui import routes

    root = _root(tmp_path, images=1)
    with ui_server(root) as c:
        status, body = c.upload("mine", [("a.png", _png_bytes()), ("a.txt", b"a red square"), ("b.png", _png_bytes())],
                                caption="sks mine, a square")
        assert status == 200 and body == {"folder": "datasets/mine", "images": 2, "captions": 2}
        assert (root / "datasets/mine/b.txt").read_text().strip() == "sks mine, a square"
        assert (root / "datasets/mine/a.txt").read_text() == "a red square"
        assert {"path": "datasets/mine", "images": 2} in c.get("/api/folders")[1]["folders"]
        cases = [
            ("mine", [("a.png", _png_bytes())], "already exists"),
            ("../up", [("c.png", _png_bytes())], "folder name"),
            ("other", [("../c.png", _png_bytes())], "file name"),
            ("other", [("c.png", b"not a png")], "not a readable image"),
            ("other", [("c.exe", b"MZ"), ("d.png", _png_bytes())], "only images"),
            ("other", [("c.txt", b"caption only")], "no images"),
        ]
        for folder, files, message in cases:
            status, body = c.upload(folder, files)
            assert status == 400 and message in body["error"], (folder, body)
        monkeypatch.setattr(routes, "MAX_UPLOAD_FILES", 2)
        status, body = c.upload("many", [(f"{i}.png", _png_bytes()) for i in range(3)])
        assert status == 400 and "files" in body["error"].lower()
        monkeypatch.setattr(routes, "MAX_UPLOAD_BYTES", 1000)
        status, body = c.upload("big", [("a.png", _png_bytes()), ("b.png", os.urandom(2000))])
        assert status == 400 and "too large" in body["error"]
        assert not (root / "datasets/other").exists() and not (root / "datasets/many").exists()


def test_auth_token_host_check_and_csrf_header(tmp_path):
    from sdlora.cli.ui import listen_plan
    from sdlora.errors import SdloraError

    assert listen_plan(None, None) == ("127.0.0.1", None, True)
    host, token, local = listen_plan("0.0.0.0", None)
    assert host == "0.0.0.0" and len(token) >= 16 and not local  # --listen without --auth: a generated token
    assert listen_plan("0.0.0.0", "s3cret-token")[1] == "s3cret-token"
    with pytest.raises(SdloraError, match="at least 8"):
        listen_plan("0.0.0.0", "short")
    root = _root(tmp_path, images=1)
    with ui_server(root) as c:
        assert c.get("/api/info", headers={"Host": "evil.example:7860"})[0] == 421  # DNS rebinding
        status, body = c.post("/api/meta", {"path": "x.safetensors"}, csrf=False)
        assert status == 403 and "X-Sdlora" in body["error"].replace("x-sdlora", "X-Sdlora")
    with ui_server(root, token="s3cret-token", local_only=False) as c:
        assert c.get("/api/info")[0] == 401
        assert c.get("/api/info", headers={"Authorization": "Bearer wrong-token"})[0] == 401
        assert c.get("/api/info", headers={"Authorization": "Bearer s3cret-token"})[0] == 200
        assert c.get("/api/info", headers={"Cookie": "sdlora_token=s3cret-token"})[0] == 200
        import urllib.request

        class NoRedirect(urllib.request.HTTPRedirectHandler):
            def redirect_request(self, *a, **k):
                return None

        try:
            urllib.request.build_opener(NoRedirect).open(c.url + "/?token=s3cret-token")
        except urllib.error.HTTPError as e:
            assert e.code == 303 and "sdlora_token=s3cret-token" in e.headers["set-cookie"]


def test_bad_input_gets_a_message_and_the_server_keeps_running(tmp_path):
    root = _root(tmp_path, images=1)
    with ui_server(root) as c:
        status, body = c.post("/api/generate", {"prompt": "x", "steps": 0})
        assert status == 422 and "steps" in body["error"]
        status, body = c.post("/api/generate", {"prompt": "x", "width": 100})
        assert status == 422 and "width" in body["error"]
        status, body = c.post("/api/generate", {"prompt": "  "})
        assert status == 400 and "prompt" in body["error"]
        status, body = c.post("/api/generate", {"prompt": "x", "mix": [{"path": "nope.safetensors"}]})
        assert status == 400 and "not found" in body["error"]
        status, body = c.call("POST", "/api/train", raw=b"{not json", headers={"Content-Type": "application/json"})
        assert status == 422 and body["error"]
        status, body = c.get("/api/jobs/job99")
        assert status == 400 and "no job" in body["error"]
        status, body = c.post("/api/train", {"images": "datasets/small", "name": "x", "steps": 1, "targets": "everything"})
        assert status == 400 and "targets" in body["error"]
        assert c.get("/api/nothing-here")[0] == 404
        assert c.get("/api/info")[0] == 200


@pytest.mark.slow
def test_train_watch_mix_grid_and_files(tmp_path):
    root = _root(tmp_path)
    with ui_server(root) as c:
        status, state = c.post("/api/train", {"images": "datasets/small", "name": "r1", "trigger": "sks pastel",
                                               "steps": 8, "sample_prompt": "sks pastel, a red circle", "sample_every": 4})
        assert status == 200 and state["status"] == "running" and state["total"] == 8, state
        status, body = c.post("/api/train", {"images": "datasets/small", "name": "r2", "steps": 8})
        assert status == 400 and "one job uses the device at a time" in body["error"]
        status, body = c.post("/api/generate", {"prompt": "a red circle"})
        assert status == 200 and body["waiting"] and "training" in body["message"]
        # a second tab re-attaches: the job list names the running job
        assert c.get("/api/jobs")[1]["active"] == state["id"]
        done = c.wait_job(state["id"], lambda s: s["status"] != "running")
        assert done["status"] == "done", done
        assert done["step"] == done["total"] == 8 and [r["step"] for r in done["losses"]][-1] == 8
        assert done["adapter"] == "runs/r1/r1.safetensors" and "runs/r1/samples/step-000004-0.png" in done["samples"]
        assert c.get(f"/api/image?path={done['samples'][0]}")[0] == 200
        lib = {e["path"]: e for e in c.get("/api/library")[1]["loras"]}
        entry = lib["runs/r1/r1.safetensors"]
        assert entry["trigger_words"] == ["sks pastel"] and entry["thumbnail"].startswith("/api/image?path=runs/r1/")

        gen = {"prompt": "sks pastel, a red circle", "seed": 3, "steps": 6}
        lora = {"path": "runs/r1/r1.safetensors", "strength": 1.0}
        status, plain = c.post("/api/generate", {**gen, "mix": []})
        assert status == 200, plain
        styled = c.post("/api/generate", {**gen, "mix": [lora]})[1]
        assert styled["loaded"] == ["runs/r1/r1.safetensors"] and styled["applied"][0]["strength"] == 1.0
        assert np.abs(_png(styled["image"]).astype(int) - _png(plain["image"])).mean() > 0.5
        zero = c.post("/api/generate", {**gen, "mix": [{**lora, "strength": 0.0}]})[1]
        assert zero["loaded"] == [] and np.array_equal(_png(zero["image"]), _png(plain["image"]))  # in place, exact
        off = c.post("/api/generate", {**gen, "mix": [{**lora, "lbw": "NONE"}]})[1]
        assert off["applied"][0]["lbw"] == "NONE" and np.array_equal(_png(off["image"]), _png(plain["image"]))
        status, grid = c.post("/api/grid", {**gen, "mix": [lora], "x": {"kind": "strength", "values": [0, 1]},
                                            "y": {"kind": "lbw", "values": ["ALL", "OUTALL"]}})
        assert status == 200 and grid["cells"] == 4 and _png(grid["image"]).shape[1] > 2 * 128

        path = "runs/r1/r1.safetensors"
        report = c.get(f"/api/inspect?path={path}")[1]
        assert report["report"]["trigger_words"] == ["sks pastel"] and "trigger:" in report["text"]
        meta = c.post("/api/meta", {"path": path, "set": {"description": "pastel test style"}})[1]
        assert meta["changed"] == ["modelspec.description"]
        assert c.get(f"/api/inspect?path={path}")[1]["report"]["description"] == "pastel test style"
        resized = c.post("/api/resize", {"path": path, "rank": 2})[1]
        assert resized["output"] == "runs/r1/r1-r2.safetensors" and (root / resized["output"]).is_file()
        converted = c.post("/api/convert", {"path": path, "to": "diffusers"})[1]
        assert (root / converted["output"]).is_file()
        merged = c.post("/api/merge", {"loras": [{**lora, "lbw": "OUTALL"}], "output": "merged/out.safetensors"})[1]
        assert merged["modules"] < c.get(f"/api/inspect?path={path}")[1]["report"]["modules"]
        status, body = c.post("/api/merge", {"loras": [lora], "output": "merged/out.safetensors"})
        assert status == 400 and "already exists" in body["error"]


@pytest.mark.slow
def test_stop_is_ctrl_c_and_the_run_resumes(tmp_path):
    import signal

    # as under `sdlora ui &` from a script: the server, and so its jobs, start with SIGINT ignored
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        _stop_and_resume(tmp_path)
    finally:
        signal.signal(signal.SIGINT, previous)


def _stop_and_resume(tmp_path):
    root = _root(tmp_path, images=4)
    with ui_server(root) as c:
        state = c.post("/api/train", {"images": "datasets/small", "name": "long", "steps": 5000, "save_every": 5,
                                      "text_encoder": False})[1]
        first_checkpoint = root / "runs/long/checkpoints/step-000005"
        c.wait_job(state["id"], lambda s: first_checkpoint.is_dir() or s["status"] != "running", timeout=240)
        stopped = c.post(f"/api/jobs/{state['id']}/stop")[1]
        assert stopped["status"] in ("stopping", "stopped")
        stopped = c.wait_job(state["id"], lambda s: s["status"] not in ("running", "stopping"))
        assert stopped["status"] == "stopped" and stopped["resumable"], stopped
        assert stopped["message"].startswith("interrupted at step") and "--resume" in stopped["message"]
        step = int(stopped["message"].split("step ")[1].split("/")[0])
        assert (root / f"runs/long/checkpoints/step-{step:06d}").is_dir()
        resumed = c.post("/api/resume", {"run": "long"})[1]
        assert resumed["status"] == "running" and resumed["total"] == 5000
        c.wait_job(resumed["id"], lambda s: (root / "runs/long/checkpoints").is_dir() and any(
            int(p.name.split("-")[1]) > step for p in (root / "runs/long/checkpoints").glob("step-*")), timeout=240)
        c.post(f"/api/jobs/{resumed['id']}/stop")
        again = c.wait_job(resumed["id"], lambda s: s["status"] not in ("running", "stopping"))
        assert again["status"] == "stopped"
        assert int(again["message"].split("step ")[1].split("/")[0]) > step  # it continued, not restarted


def test_sdlora_ui_command_listens_with_a_generated_token(tmp_path):
    import signal
    import socket
    import subprocess
    import sys
    import time

    from tests.ui_helpers import Client

    root = _root(tmp_path, images=1)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "sdlora", "ui", "--root", str(root), "--port", str(port),
                             "--listen", "127.0.0.1"], stderr=subprocess.PIPE, text=True)
    try:
        lines = []
        while not any("sdlora ui on" in ln for ln in lines):
            line = proc.stderr.readline()
            assert line, f"sdlora ui exited: {''.join(lines)}"
            lines.append(line)
        token = next(ln for ln in lines if "generated the token" in ln).split()[-1]
        assert f"?token={token}" in lines[-1]
        c = Client(f"http://127.0.0.1:{port}")
        deadline = time.time() + 60
        while True:
            try:
                status, _ = c.get("/api/info")
                break
            except OSError:
                assert time.time() < deadline
                time.sleep(0.2)
        assert status == 401
        status, info = c.get("/api/info", headers={"Authorization": f"Bearer {token}"})
        assert status == 200 and info["root"] == str(root.resolve())
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(30)
    bad = subprocess.run([sys.executable, "-m", "sdlora", "ui", "--root", str(tmp_path / "nope")], capture_output=True,
                         text=True)
    assert bad.returncode == 2 and bad.stderr.strip() == f"sdlora: error: --root is not a folder: {tmp_path / 'nope'}"
