"""The page's JSON API. Requests are checked here (types by pydantic, paths by ui.paths); the work is the CLI's."""

from __future__ import annotations

import re
from typing import Literal

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse
from pydantic import BaseModel, Field

from sdlora import __version__
from sdlora.errors import SdloraError
from sdlora.lora.blocks import LAYOUTS, PRESETS
from sdlora.ui.paths import IMAGE_SUFFIXES, check_name, relative, under_root, walk_files
from sdlora.ui.studio import MixEntry, Settings

router = APIRouter(prefix="/api")

MAX_UPLOAD_FILES = 500
MAX_UPLOAD_FILE_BYTES = 20 << 20
MAX_UPLOAD_BYTES = 200 << 20
MAX_CAPTION_BYTES = 16 << 10
MAX_FOLDER_SCAN = 20000


def _app(request: Request):
    return request.app.state.sdlora


class Lora(BaseModel):
    path: str = Field(max_length=1000)
    strength: float = Field(1.0, ge=-20, le=20)
    te_strength: float | None = Field(None, ge=-20, le=20)
    lbw: str | None = Field(None, max_length=400)


class GenerateRequest(BaseModel):
    mix: list[Lora] = Field(default_factory=list, max_length=16)
    prompt: str = Field(max_length=2000)
    negative: str = Field("", max_length=2000)
    seed: int = Field(0, ge=0, le=2**32 - 1)
    steps: int = Field(20, ge=1, le=150)
    guidance: float = Field(7.5, ge=0, le=30)
    width: int | None = Field(None, ge=64, le=2048, multiple_of=8)
    height: int | None = Field(None, ge=64, le=2048, multiple_of=8)
    scheduler: Literal["dpm++", "euler", "euler-a", "ddim", "pndm"] = "dpm++"


class Axis(BaseModel):
    kind: Literal["strength", "te", "lbw"]
    index: int = Field(0, ge=0, le=15)
    values: list[str | float] = Field(min_length=1, max_length=12)


class GridRequest(GenerateRequest):
    x: Axis
    y: Axis | None = None


class TrainRequest(BaseModel):
    images: str = Field(max_length=1000)
    name: str = Field(max_length=100)
    trigger: str = Field("", max_length=200)
    base: str = Field("tiny", max_length=1000)
    rank: int = Field(4, ge=1, le=256)
    steps: int = Field(500, ge=1, le=1_000_000)
    unet_lr: float | None = Field(None, gt=0, le=1)
    targets: str | None = Field(None, max_length=100)
    text_encoder: bool = True
    batch_size: int = Field(1, ge=1, le=64)
    resolution: int | None = Field(None, ge=64, le=2048, multiple_of=64)
    seed: int = Field(42, ge=0, le=2**32 - 1)
    sample_prompt: str = Field("", max_length=1000)
    sample_every: int | None = Field(None, ge=1)
    save_every: int | None = Field(None, ge=1)
    validation_split: float = Field(0.0, ge=0, le=0.5)
    overwrite: bool = False


class ResumeRequest(BaseModel):
    run: str = Field(max_length=100)


class MetaRequest(BaseModel):
    path: str = Field(max_length=1000)
    set: dict[str, str] = Field(default_factory=dict, max_length=20)
    unset: list[str] = Field(default_factory=list, max_length=20)


class MergeRequest(BaseModel):
    loras: list[Lora] = Field(min_length=1, max_length=16)
    output: str = Field(max_length=1000)
    rank: int | None = Field(None, ge=1, le=1024)
    save_dtype: Literal["fp16", "bf16", "fp32"] = "fp16"
    base: str | None = Field(None, max_length=1000)
    overwrite: bool = False


class ResizeRequest(BaseModel):
    path: str = Field(max_length=1000)
    rank: int | None = Field(None, ge=1, le=1024)
    energy: float | None = Field(None, gt=0, le=1)
    output: str | None = Field(None, max_length=1000)
    save_dtype: Literal["fp16", "bf16", "fp32"] = "fp16"
    overwrite: bool = False


class ConvertRequest(BaseModel):
    path: str = Field(max_length=1000)
    to: Literal["kohya", "diffusers"]
    output: str | None = Field(None, max_length=1000)
    overwrite: bool = False


def _one_line(text: str, what: str) -> str:
    if re.search(r"[\x00-\x1f]", text):
        raise SdloraError(f"{what} must be one line of text")
    return text.strip()


@router.get("/info")
def info(request: Request) -> dict:
    app = _app(request)
    return {"version": __version__, "root": str(app.root), "base": app.base, "presets": PRESETS,
            "layouts": {str(k): list(v) for k, v in LAYOUTS.items()},
            "limits": {"upload_files": MAX_UPLOAD_FILES, "upload_file_mb": MAX_UPLOAD_FILE_BYTES >> 20,
                       "upload_total_mb": MAX_UPLOAD_BYTES >> 20}}


@router.get("/folders")
def folders(request: Request) -> dict:
    """Folders of training images under the root (a kohya `N_name` subfolder counts for its parent)."""
    root = _app(request).root
    counts: dict[str, int] = {}
    for p in walk_files(root, IMAGE_SUFFIXES, skip=("samples", "checkpoints"))[:MAX_FOLDER_SCAN]:
        folder = p.parent.parent if re.match(r"^\d+_", p.parent.name) and p.parent.parent != root else p.parent
        if folder != root:
            counts[relative(root, folder)] = counts.get(relative(root, folder), 0) + 1
    return {"folders": [{"path": k, "images": v} for k, v in sorted(counts.items())]}


@router.post("/upload")
async def upload(request: Request) -> dict:
    """Images (+ same-stem .txt captions) into a new or existing folder datasets/<folder>; never overwrites."""
    root = _app(request).root
    size = request.headers.get("content-length")
    if size is None or not size.isdigit():
        raise SdloraError("uploads need a Content-Length")
    if int(size) > MAX_UPLOAD_BYTES:
        raise SdloraError(f"upload too large ({int(size) >> 20} MB); at most {MAX_UPLOAD_BYTES >> 20} MB at a time")
    form = await request.form(max_files=MAX_UPLOAD_FILES, max_fields=10, max_part_size=MAX_CAPTION_BYTES)
    folder = check_name(str(form.get("folder") or ""), "folder name")
    caption = _one_line(str(form.get("caption") or ""), "caption")
    files = [f for f in form.getlist("files") if hasattr(f, "filename")]
    if not files:
        raise SdloraError("no files in the upload")
    dest = under_root(root, f"datasets/{folder}", "folder", must_exist=False)
    names = [check_name(f.filename or "", "file name") for f in files]
    if len(set(names)) != len(names):
        raise SdloraError("two uploaded files have the same name")
    images = [n for n in names if n.lower().endswith(IMAGE_SUFFIXES)]
    if not images:
        raise SdloraError(f"no images in the upload (accepted: {', '.join(IMAGE_SUFFIXES)}, with .txt captions)")
    for f, name in zip(files, names):
        if not name.lower().endswith((*IMAGE_SUFFIXES, ".txt")):
            raise SdloraError(f"{name}: only images and .txt captions can be uploaded")
        if (f.size or 0) > (MAX_CAPTION_BYTES if name.endswith(".txt") else MAX_UPLOAD_FILE_BYTES):
            raise SdloraError(f"{name} is too large (images up to {MAX_UPLOAD_FILE_BYTES >> 20} MB, captions 16 KB)")
        if (dest / name).exists():
            raise SdloraError(f"{relative(root, dest)}/{name} already exists; upload into a new folder")
    from PIL import Image

    for f, name in zip(files, names):
        if name.lower().endswith(IMAGE_SUFFIXES):
            try:
                with Image.open(f.file) as im:
                    im.verify()
            except Exception:
                raise SdloraError(f"{name} is not a readable image") from None
            f.file.seek(0)
    dest.mkdir(parents=True, exist_ok=True)
    stems = {n.rsplit(".", 1)[0] for n in names if n.endswith(".txt")}
    captions = len(stems)
    for f, name in zip(files, names):
        (dest / name).write_bytes(await f.read())
        stem = name.rsplit(".", 1)[0]
        if caption and name.lower().endswith(IMAGE_SUFFIXES) and stem not in stems and not (dest / f"{stem}.txt").exists():
            (dest / f"{stem}.txt").write_text(caption + "\n", encoding="utf-8")
            captions += 1
    return {"folder": relative(root, dest), "images": len(images), "captions": captions}


@router.post("/train")
def train(request: Request, body: TrainRequest) -> dict:
    app = _app(request)
    name = check_name(body.name, "run name")
    images = under_root(app.root, body.images, "image folder", kind="dir")
    if not walk_files(images, IMAGE_SUFFIXES)[:1]:
        raise SdloraError(f"no images in {body.images}")
    output = under_root(app.root, f"runs/{name}", "output", must_exist=False)
    if output.exists() and any(output.iterdir()) and not body.overwrite:
        raise SdloraError(f"runs/{name} exists: choose another name, tick overwrite, or resume it")
    base = "tiny" if body.base == "tiny" else str(under_root(app.root, body.base, "base"))
    args = [f"--images={images}", f"--output={output}", f"--name={name}", f"--base={base}", f"--rank={body.rank}",
            f"--steps={body.steps}", f"--seed={body.seed}", f"--batch-size={body.batch_size}", "--no-progress"]
    if body.trigger:
        args.append(f"--trigger={_one_line(body.trigger, 'trigger')}")
    if body.unet_lr:
        args.append(f"--unet-lr={body.unet_lr}")
    if body.targets:
        from sdlora.lora.targets import parse_targets

        args.append(f"--targets={','.join(parse_targets(body.targets))}")
    if not body.text_encoder:
        args.append("--no-text-encoder")
    if body.resolution:
        args.append(f"--resolution={body.resolution}")
    if body.sample_prompt:
        every = body.sample_every or max(1, body.steps // 4)
        args += [f"--sample-prompt={_one_line(body.sample_prompt, 'sample prompt')}", f"--sample-every={every}"]
    if body.save_every:
        args.append(f"--save-every={body.save_every}")
    if body.validation_split:
        args.append(f"--validation-split={body.validation_split}")
    if body.overwrite:
        args.append("--overwrite")
    job = app.jobs.start(name, output, args, body.steps)
    return app.jobs.state(job.id)


@router.post("/resume")
def resume(request: Request, body: ResumeRequest) -> dict:
    """Continue a stopped run from its latest checkpoint: `sdlora train --resume runs/NAME`."""
    app = _app(request)
    name = check_name(body.run, "run name")
    output = under_root(app.root, f"runs/{name}", "run", kind="dir")
    if not list((output / "checkpoints").glob("step-*")):
        raise SdloraError(f"runs/{name} has no checkpoint to resume from")
    previous = [j for j in app.jobs.jobs.values() if j.name == name and j.total]
    job = app.jobs.start(name, output, [f"--resume={output}", "--no-progress"], previous[-1].total if previous else None)
    return app.jobs.state(job.id)


@router.get("/jobs")
def jobs(request: Request) -> dict:
    app = _app(request)
    busy = app.jobs.busy()
    states = [app.jobs.state(j) for j in app.jobs.jobs]
    return {"jobs": states, "active": busy.id if busy else (states[-1]["id"] if states else None)}


@router.get("/jobs/{job_id}")
def job(request: Request, job_id: str) -> dict:
    return _app(request).jobs.state(job_id)


@router.post("/jobs/{job_id}/stop")
def stop(request: Request, job_id: str) -> dict:
    app = _app(request)
    app.jobs.stop(job_id)
    return app.jobs.state(job_id)


@router.get("/image")
def image(request: Request, path: str) -> FileResponse:
    file = under_root(_app(request).root, path, "image", kind="file", suffixes=IMAGE_SUFFIXES)
    return FileResponse(file, headers={"cache-control": "no-cache"})


@router.get("/library")
def library(request: Request) -> dict:
    return {"loras": _app(request).library.entries()}


def _mix(body: GenerateRequest) -> tuple[list[MixEntry], Settings]:
    mix = [MixEntry(m.path, m.strength, m.te_strength, m.lbw or None) for m in body.mix]
    prompt = _one_line(body.prompt, "prompt")
    if not prompt:
        raise SdloraError("write a prompt first")
    return mix, Settings(prompt, _one_line(body.negative, "negative prompt"), body.seed, body.steps, body.guidance,
                         body.width, body.height, body.scheduler)


@router.post("/generate")
def generate(request: Request, body: GenerateRequest) -> dict:
    return _app(request).studio.generate(*_mix(body))


@router.post("/grid")
def grid(request: Request, body: GridRequest) -> dict:
    mix, settings = _mix(body)
    return _app(request).studio.grid(mix, settings, body.x.model_dump(), body.y.model_dump() if body.y else None)


@router.get("/studio")
def studio(request: Request) -> dict:
    """The last image and mix, so a reloaded page shows where it was."""
    return {"last": _app(request).studio.last, "base": _app(request).base}


@router.get("/inspect")
def inspect(request: Request, path: str) -> dict:
    return _app(request).library.inspect(path)


@router.post("/meta")
def meta(request: Request, body: MetaRequest) -> dict:
    return _app(request).library.meta(body.path, {k: _one_line(v, k) for k, v in body.set.items()}, body.unset)


@router.post("/merge")
def merge(request: Request, body: MergeRequest) -> dict:
    return _app(request).library.merge([m.model_dump() for m in body.loras], body.output, body.rank, body.save_dtype,
                                       body.base, body.overwrite)


@router.post("/resize")
def resize(request: Request, body: ResizeRequest) -> dict:
    return _app(request).library.resize(body.path, body.rank, body.energy, body.output, body.save_dtype, body.overwrite)


@router.post("/convert")
def convert(request: Request, body: ConvertRequest) -> dict:
    return _app(request).library.convert(body.path, body.to, body.output, body.overwrite)
