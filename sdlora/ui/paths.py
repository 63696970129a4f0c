"""Every path the page names is a relative path under the root: checked by name first, then resolved on disk.

Refused: absolute paths, `..`, hidden or oddly named parts (anything beyond letters, digits, space, `.`, `_`, `-`,
`+`, `(`, `)`), and anything that resolves outside the root through a symlink.
"""

from __future__ import annotations

import re
from pathlib import Path

from sdlora.errors import SdloraError

_PART = re.compile(r"^[A-Za-z0-9_+()][A-Za-z0-9 ._+()-]{0,127}$")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif")


def check_name(name: str, what: str = "name") -> str:
    """One path part (a file or folder name) as the page may create it."""
    if not isinstance(name, str) or not _PART.match(name) or name.endswith((" ", ".")):
        raise SdloraError(f"bad {what} '{name}': use letters, digits, spaces, '.', '_', '-' (no leading dot, no slashes)")
    return name


def under_root(root: Path, rel: str, what: str = "path", must_exist: bool = True, kind: str | None = None,
               suffixes: tuple[str, ...] | None = None) -> Path:
    """`rel` (as the page sends it, '/'-separated) resolved under `root`; kind 'file' or 'dir' when it must exist."""
    if not isinstance(rel, str) or not rel.strip():
        raise SdloraError(f"no {what} given")
    if "\\" in rel or "\x00" in rel or rel.startswith(("/", "~")) or re.match(r"^[A-Za-z]:", rel):
        raise SdloraError(f"{what} '{rel}' must be a path relative to the root")
    parts = [p for p in rel.split("/") if p not in ("", ".")]
    if not parts:
        raise SdloraError(f"{what} '{rel}' names the root itself")
    for p in parts:
        if p == "..":
            raise SdloraError(f"{what} '{rel}' leaves the root ('..' is not allowed)")
        check_name(p, what)
    root = root.resolve()
    path = root.joinpath(*parts)
    resolved = path.resolve()
    if not resolved.is_relative_to(root):
        raise SdloraError(f"{what} '{rel}' points outside the root")
    if suffixes and path.suffix.lower() not in suffixes:
        raise SdloraError(f"{what} '{rel}' must end in {' or '.join(suffixes)}")
    if must_exist:
        if not resolved.exists():
            raise SdloraError(f"{what} '{rel}' not found under the root")
        if kind == "file" and not resolved.is_file():
            raise SdloraError(f"{what} '{rel}' is not a file")
        if kind == "dir" and not resolved.is_dir():
            raise SdloraError(f"{what} '{rel}' is not a folder")
    return resolved


def relative(root: Path, path: Path) -> str:
    """The '/'-separated path the page shows and sends back."""
    return path.resolve().relative_to(root.resolve()).as_posix()


def walk_files(root: Path, suffixes: tuple[str, ...], skip: tuple[str, ...] = ()) -> list[Path]:
    """Files under root with these suffixes; hidden folders, `skip` folder names and links out of the root left out."""
    root = root.resolve()
    found = []
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root).parts
        if any(part.startswith(".") or part in skip for part in rel[:-1]) or rel[-1].startswith("."):
            continue
        if p.suffix.lower() in suffixes and p.is_file() and p.resolve().is_relative_to(root):
            found.append(p)
    return found
