"""Read a user's captioned image folder (kohya layout) and turn images into training tensors.

The user's folder is only ever read: nothing here writes, moves or renames a file in it.
"""

from __future__ import annotations

import os
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from sdlora.errors import SdloraError
from sdlora.util import warn as _warn_stderr

IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif"}  # matched case-insensitively

_REPEATS_DIR = re.compile(r"^(\d+)_(.+)$")
_SURPRISING_REPEATS = 100  # "2023_holiday" is more likely a date than a repeat count: say so
_WHITE = (255, 255, 255)


@dataclass(frozen=True)
class ImageItem:
    """One usable training image with its final caption and kohya repeat count."""

    path: Path  # absolute path of the image
    caption: str  # trigger prepended ("xyz style, a red circle"), the trigger alone, or ""
    repeats: int  # from a kohya "N_name" folder on the way from the root; 1 otherwise
    dataset_dir: str  # top-level subfolder it came from (e.g. "10_mystyle"), or the root folder's name


# --- scanning -------------------------------------------------------------------------------------


def scan_images(
    root: str | Path,
    caption_ext: str = ".txt",
    trigger: str | None = None,
    warn: Callable[[str], None] = _warn_stderr,
) -> list[ImageItem]:
    """Find every readable image under `root`, with captions and repeats, in a stable order.

    Each image is decoded once here so that a broken file is reported up front with its name,
    rather than crashing a training run hours later. Hidden files and folders (".name") are ignored:
    they are editor/OS clutter such as macOS "._img.png" resource forks, never training data.
    """
    root_path = Path(root).expanduser()
    if not root_path.exists():
        raise SdloraError(f"image folder not found: {root}")
    if not root_path.is_dir():
        raise SdloraError(f"image folder is not a directory: {root}")
    root_path = root_path.resolve()
    ext = caption_ext if caption_ext.startswith(".") else f".{caption_ext}"
    trigger = (trigger or "").strip()

    images, files_by_lower_name = _walk(root_path)
    if not images:
        raise SdloraError(f"no images (png/jpg/jpeg/webp/bmp/gif) in {root}")

    repeats_cache: dict[Path, int] = {}
    items: list[ImageItem] = []
    skipped = 0
    for rel in images:
        path = root_path / rel
        problem = _unreadable_reason(path)
        if problem:
            warn(f"skipping {rel.as_posix()}: {problem}")
            skipped += 1
            continue
        try:
            text = _read_caption(path, ext, files_by_lower_name, root_path, warn)
        except OSError as exc:  # an unreadable caption: the image would train with the wrong text, so skip it
            warn(f"skipping {rel.as_posix()}: cannot read its caption {Path(exc.filename or '').name}: {exc.strerror or exc}")
            skipped += 1
            continue
        items.append(
            ImageItem(
                path=path,
                caption=_with_trigger(text, trigger),
                repeats=_repeats_for(rel.parent, repeats_cache, warn),
                dataset_dir=rel.parts[0] if len(rel.parts) > 1 else root_path.name,
            )
        )
    if not items:
        raise SdloraError(f"no readable images in {root}: all {len(images)} files failed to open")
    if skipped:
        warn(f"skipped {skipped} of {len(images)} files")
    if not trigger and not any(item.caption for item in items):
        warn(f"no image has a caption ({ext} file) and no --trigger was given: the LoRA will learn the style for every "
             "prompt and can only be switched on or off by its strength; pass --trigger \"xyz style\" to give it a word")
    return items


def _walk(root: Path) -> tuple[list[Path], dict[Path, Path]]:
    """Image paths relative to root (sorted by path parts), plus every file keyed by lower-cased path."""
    images: list[Path] = []
    files: dict[Path, Path] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for name in filenames:
            if name.startswith("."):
                continue
            path = Path(dirpath, name)
            files[Path(dirpath, name.lower())] = path
            if path.suffix.lower() in IMAGE_EXTENSIONS:
                images.append(path.relative_to(root))
    images.sort(key=lambda p: p.parts)
    return images, files


def _unreadable_reason(path: Path) -> str | None:
    """None when the image decodes completely, else a short reason for the warning line."""
    try:
        if path.stat().st_size == 0:
            return "empty file"
        with Image.open(path) as img:
            img.load()  # full decode: catches truncated data that Image.open alone does not
    except UnidentifiedImageError:
        return "not a readable image file"
    except Exception as exc:  # decoders raise many types (OSError, SyntaxError, struct.error, ...)
        detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        return detail[:120]
    return None


def _read_caption(
    image: Path, ext: str, files_by_lower_name: dict[Path, Path], root: Path, warn: Callable[[str], None]
) -> str:
    """Caption text for an image, one line; "" when there is no caption file. OSError when it cannot be read."""
    wanted = image.with_suffix(ext)
    path = wanted if wanted.is_file() else files_by_lower_name.get(wanted.with_name(wanted.name.lower()))
    if path is None:
        return ""
    raw = path.read_bytes()
    text = decode_caption(raw)
    if text is None:
        warn(f"caption {path.relative_to(root).as_posix()} is neither UTF-8 nor UTF-16; undecodable bytes replaced")
        text = raw.decode("utf-8", errors="replace")
    return _one_line(text)


_BOMS = ((b"\xff\xfe\x00\x00", "utf-32-le"), (b"\x00\x00\xfe\xff", "utf-32-be"), (b"\xef\xbb\xbf", "utf-8-sig"),
         (b"\xff\xfe", "utf-16-le"), (b"\xfe\xff", "utf-16-be"))


def decode_caption(raw: bytes) -> str | None:
    """Caption bytes as text: by byte-order mark (Windows Notepad saves "Unicode" as UTF-16 LE with one), else
    UTF-8, else BOM-less UTF-16 told by its zero bytes; None when no encoding fits."""
    for bom, encoding in _BOMS:
        if raw.startswith(bom):
            try:
                return raw.decode(encoding).removeprefix("\ufeff")
            except UnicodeDecodeError:
                return None
    try:
        text = raw.decode("utf-8")
        if "\x00" not in text:  # NUL is valid UTF-8, but in a caption it means UTF-16 without a BOM
            return text
    except UnicodeDecodeError:
        pass
    if len(raw) >= 2 and len(raw) % 2 == 0 and b"\x00" in raw:
        odd_zeros, even_zeros = raw[1::2].count(0), raw[0::2].count(0)
        encoding = "utf-16-le" if odd_zeros > even_zeros else "utf-16-be"
        try:
            text = raw.decode(encoding)
        except UnicodeDecodeError:
            return None
        return text if "\x00" not in text else None
    return None


def _one_line(text: str) -> str:
    """Join caption lines with ", " and squeeze runs of whitespace, so multi-line files become tags."""
    lines = (" ".join(line.split()).strip(" ,") for line in text.splitlines())
    return ", ".join(line for line in lines if line)


def _with_trigger(caption: str, trigger: str) -> str:
    """Prepend the trigger unless the caption already starts with it as its first tag."""
    if not trigger:
        return caption
    if not caption:
        return trigger
    if caption.split(",", 1)[0].strip() == trigger:
        return caption
    return f"{trigger}, {caption}"


def _repeats_for(rel_dir: Path, cache: dict[Path, int], warn: Callable[[str], None]) -> int:
    """Repeats from the nearest kohya "N_name" folder between root (exclusive) and the image."""
    if rel_dir in cache:
        return cache[rel_dir]
    repeats = 1
    for name in reversed(rel_dir.parts):
        match = _REPEATS_DIR.match(name)
        if match:
            repeats = int(match.group(1))
            if repeats < 1:
                raise SdloraError(f"folder {rel_dir.as_posix()}: repeat count in '{name}' must be >= 1")
            if repeats >= _SURPRISING_REPEATS:
                warn(f"folder '{name}' means {repeats} repeats (kohya N_name); rename it if that is a date")
            break
    cache[rel_dir] = repeats
    return repeats


# --- image decoding -------------------------------------------------------------------------------


def load_rgb(path: Path) -> Image.Image:
    """Open an image upright (EXIF orientation) as 8-bit RGB; transparency becomes white, not black."""
    with Image.open(path) as img:
        img.seek(0)  # animated GIF/WebP: the first frame
        upright = ImageOps.exif_transpose(img)
        upright.load()
        return to_rgb(upright)


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any Pillow mode to RGB; PIL's own convert() clips 16/32-bit grey to white, so scale those."""
    if img.mode == "RGB":
        return img
    if img.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        return Image.fromarray(_grey_to_uint8(np.asarray(img), img.mode)).convert("RGB")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info:
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (*_WHITE, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def _grey_to_uint8(values: np.ndarray, mode: str) -> np.ndarray:
    """Map high-bit-depth grey to 0..255: 16-bit by its full range, otherwise by what the data spans."""
    values = values.astype(np.float64)
    if mode.startswith("I;16") or (mode == "I" and values.min() >= 0 and values.max() <= 65535):
        scaled = values / 257.0  # 65535 -> 255; "I" is how older Pillow decodes 16-bit PNG
    elif mode == "F" and values.min() >= 0 and values.max() <= 1:
        scaled = values * 255.0
    else:
        low, high = float(values.min()), float(values.max())
        scaled = (values - low) * (255.0 / (high - low)) if high > low else np.zeros_like(values)
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


# --- metadata (kohya ss_tag_frequency / ss_dataset_dirs) ------------------------------------------


def tag_frequency(items: list[ImageItem]) -> dict[str, dict[str, int]]:
    """dataset_dir -> tag -> number of images whose caption has that tag (repeats not counted)."""
    frequency: dict[str, dict[str, int]] = {}
    for item in items:
        counts = frequency.setdefault(item.dataset_dir, {})
        for tag in dict.fromkeys(t.strip() for t in item.caption.split(",")):
            if tag:
                counts[tag] = counts.get(tag, 0) + 1
    return frequency


def dataset_dirs(items: list[ImageItem]) -> dict[str, dict[str, int]]:
    """dataset_dir -> {"n_repeats", "img_count"}; n_repeats is the repeat count most of its images use."""
    grouped: dict[str, list[int]] = {}
    for item in items:
        grouped.setdefault(item.dataset_dir, []).append(item.repeats)
    return {
        name: {"n_repeats": Counter(repeats).most_common(1)[0][0], "img_count": len(repeats)}
        for name, repeats in grouped.items()
    }
