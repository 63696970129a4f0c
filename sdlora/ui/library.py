"""The page's Files and library: the `.safetensors` LoRAs under the root, and the CLI's file operations on them.

Each operation calls what the command line calls (tools.inspect, formats.header.edit_metadata, tools.merge,
tools.resize, tools.convert); this module only turns page paths into checked paths under the root.
"""

from __future__ import annotations

from pathlib import Path

from sdlora.errors import SdloraError
from sdlora.ui.paths import relative, under_root, walk_files
from sdlora.ui.studio import library_thumbnail

_ADAPTER_MARKS = ("lora", "hada_", "lokr_", ".diff", "dora_scale")
MAX_LIBRARY_FILE = 4 << 30  # larger .safetensors are base models, not adapters


class Library:
    def __init__(self, root: Path):
        self.root = root
        self._cache: dict[str, tuple[tuple[int, int], dict]] = {}

    def entries(self) -> list[dict]:
        """Every adapter under the root with what `sdlora inspect` knows; checkpoints and base models left out."""
        from sdlora.formats.header import read_header
        from sdlora.tools.inspect import inspect_adapter

        out = []
        for f in walk_files(self.root, (".safetensors",), skip=("checkpoints",)):
            rel = relative(self.root, f)
            st = f.stat()
            key = (st.st_mtime_ns, st.st_size)
            hit = self._cache.get(rel)
            if hit and hit[0] == key:
                out.append(hit[1])
                continue
            try:
                if st.st_size > MAX_LIBRARY_FILE:
                    continue
                _, header = read_header(f)
                if not any(m in k for k in header for m in _ADAPTER_MARKS):
                    continue
                r = inspect_adapter(f)
            except SdloraError:
                continue
            meta = header.get("__metadata__") or {}
            entry = {
                "path": rel, "name": f.stem, "title": r["title"], "description": r["description"],
                "trigger_words": r["trigger_words"], "architecture": r["architecture"], "format": r["format"],
                "rank": (r["rank"] or {}).get("most_common"), "modules": r["modules"], "size_bytes": r["size_bytes"],
                "base": r["training"].get("ss_sd_model_name"), "steps": r["training"].get("ss_steps"),
                "thumbnail": library_thumbnail(self.root, f, meta), "autov2": r["hashes"]["autov2"],
            }
            self._cache[rel] = (key, entry)
            out.append(entry)
        return out

    def file(self, rel: str) -> Path:
        return under_root(self.root, rel, "file", kind="file", suffixes=(".safetensors",))

    def output(self, rel: str, overwrite: bool, suffix: str | None = ".safetensors") -> Path:
        """A path the page asks us to write: under the root, and not an existing file unless overwrite."""
        path = under_root(self.root, rel, "output", must_exist=False, suffixes=(suffix,) if suffix else None)
        if path.exists() and not overwrite:
            raise SdloraError(f"{rel} already exists; tick overwrite or choose another name")
        path.parent.mkdir(parents=True, exist_ok=True)
        return path

    def inspect(self, rel: str) -> dict:
        from sdlora.tools.inspect import format_report, inspect_adapter

        report = inspect_adapter(self.file(rel))
        report["file"] = rel
        return {"report": report, "text": format_report(report)}

    def meta(self, rel: str, set_values: dict[str, str], unset: list[str]) -> dict:
        from sdlora.formats.header import edit_metadata

        result = edit_metadata(self.file(rel), set_values, unset)
        return {"changed": result.changed, "rehashed": result.rehashed, "sha256": result.sha256}

    def merge(self, specs: list[dict], output: str, rank: int | None, save_dtype: str, base: str | None,
              overwrite: bool) -> dict:
        from sdlora.lora.blocks import parse_block_weights
        from sdlora.lora.specs import LoraSpec
        from sdlora.tools.merge import bake_into_base, merge_loras

        if not specs:
            raise SdloraError("merge: add at least one LoRA")
        loras = [LoraSpec(str(self.file(s["path"])), float(s.get("strength", 1.0)), s.get("te_strength"),
                          parse_block_weights(s["lbw"]) if s.get("lbw") else None) for s in specs]
        if base:
            if rank is not None:
                raise SdloraError("rank applies to combining LoRAs into one file; baking into a base is always exact")
            base_path = "tiny" if base == "tiny" else str(under_root(self.root, base, "base"))
            out = self.output(output, overwrite, suffix=None)
            result = bake_into_base(base_path, loras, out, save_dtype, overwrite)
            return {"output": relative(self.root, out), "modules": result.modules}
        out = self.output(output, overwrite)
        result = merge_loras(loras, out, rank, save_dtype)
        return {"output": relative(self.root, out), "modules": result.modules, "sha256": result.sha256,
                "report": result.report.summary() if result.report else None}

    def resize(self, rel: str, rank: int | None, energy: float | None, output: str | None, save_dtype: str,
               overwrite: bool) -> dict:
        from sdlora.tools.resize import resize_file

        if (rank is None) == (energy is None):
            raise SdloraError("resize: give a rank or an energy, not both")
        src = self.file(rel)
        tag = f"r{rank}" if rank is not None else f"e{energy:g}"
        out = self.output(output or relative(self.root, src.with_name(f"{src.stem}-{tag}.safetensors")), overwrite)
        sha, report = resize_file(src, out, rank, energy, save_dtype)
        return {"output": relative(self.root, out), "sha256": sha, "report": report.summary()}

    def convert(self, rel: str, to: str, output: str | None, overwrite: bool) -> dict:
        from sdlora.tools.convert import convert_adapter

        src = self.file(rel)
        out = self.output(output or relative(self.root, src.with_name(f"{src.stem}.{to}.safetensors")), overwrite)
        path, sha = convert_adapter(src, to, out)
        return {"output": relative(self.root, Path(path)), "sha256": sha}
