"""`sdlora merge`: several LoRAs into one LoRA file, or baked into a base model's weights.

Everything is defined by the update each file applies, s * (alpha/rank) * up @ down, so a merged file means
the same in A1111, ComfyUI and diffusers whatever the inputs' alphas were. Concatenating ranks is exact (the
scales are folded into up, alpha = rank); `rank=` re-factorises the sum by SVD and reports what it lost.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import torch

from sdlora import __version__
from sdlora.errors import SdloraError
from sdlora.formats.detect import KOHYA_VERSIONS, LABELS, canonical_modules, guess_architecture
from sdlora.formats.kohya import AdapterFile, ModuleWeights, file_sha256, load_adapter, save_adapter
from sdlora.formats.metadata import apply_dims, modelspec_architecture
from sdlora.formats.names import SD1_NAMES
from sdlora.formats.names_sdxl import SDXL_NAMES
from sdlora.lora.blocks import block_multiplier, block_table, check_fits, format_block_weights
from sdlora.lora.specs import LoraSpec, check_strengths
from sdlora.tools.resize import ReduceReport, as_matrices, reduce_modules, require_plain_lora
from sdlora.util import torch_dtype


@dataclass
class MergeResult:
    output: Path
    modules: int
    sha256: str | None = None  # of the written LoRA file
    report: ReduceReport | None = None  # with a target rank


def _load_checked(specs: list[LoraSpec]) -> list[AdapterFile]:
    """The inputs, refusing non-finite strengths and files with NaN/inf weights (they would poison the result)."""
    adapters = []
    for spec in specs:
        check_strengths(spec.path, spec.strength, spec.te_strength)
        adapter = load_adapter(spec.path)
        adapter.require_finite()
        adapters.append(adapter)
    return adapters


def _title(adapter: AdapterFile) -> str:
    return adapter.metadata.get("modelspec.title") or (Path(adapter.path).stem if adapter.path else "lora")


def merged_from(adapters: list[AdapterFile], specs: list[LoraSpec]) -> str:
    """modelspec.merged_from: the inputs' titles with their strengths."""
    parts = []
    for a, s in zip(adapters, specs):
        te = f":{s.te_strength:g}" if s.te_strength is not None else ""
        lbw = f":lbw={format_block_weights(s.blocks)}" if s.blocks else ""
        parts.append(f"{_title(a)}:{s.strength:g}{te}{lbw}")
    return ", ".join(parts)


def concat_modules(adapters: list[AdapterFile], specs: list[LoraSpec]) -> dict[str, ModuleWeights]:
    """Exact merge: per module, downs stacked and ups side by side with s_i * alpha_i / r_i folded into up.

    Then up @ down = sum_i s_i (alpha_i/r_i) up_i @ down_i and alpha = total rank (scale 1). A module missing
    from a file just gets no block from it; a spec's block vector scales s_i per UNet block, and a module whose every
    contribution is 0 (a block switched off) is left out, so the file leaves that layer at the base.
    """
    groups: dict[str, list[tuple[ModuleWeights, float, str]]] = {}
    for a, spec in zip(adapters, specs):
        te_s = spec.strength if spec.te_strength is None else spec.te_strength
        table = None
        if spec.blocks is not None:
            check_fits(spec.blocks, "sdxl" if guess_architecture(a)[0] == "sdxl" else "sd1")
            table = block_table(spec.blocks)
        for name, m in a.modules.items():
            s = (te_s if name.startswith("lora_te") else spec.strength) * block_multiplier(name, table)
            if s != 0.0:
                groups.setdefault(name, []).append((m, s, str(a.path)))
    out = {}
    for name, items in sorted(groups.items()):
        first, _, where = max(items, key=lambda i: i[0].down.dim())  # a 1x1 conv may come as 2-D from peft files
        for m, _, other in items:
            if m.up.shape[0] != first.up.shape[0] or m.down[0].numel() != first.down[0].numel():
                raise SdloraError(f"{name} has different shapes in {where} ({list(first.down.shape[1:])} -> "
                                  f"{first.up.shape[0]}) and {other} ({list(m.down.shape[1:])} -> {m.up.shape[0]})")
        ups = [as_matrices(m)[0] * (s * m.scale) for m, s, _ in items]
        downs = [m.down.reshape(m.rank, *first.down.shape[1:]) for m, _, _ in items]
        up, down = torch.cat(ups, 1), torch.cat(downs, 0)
        if first.up.dim() == 4:
            up = up.reshape(*up.shape, 1, 1)
        out[name] = ModuleWeights(down=down, up=up, alpha=float(down.shape[0]))
    return out


def same_family(adapters: list[AdapterFile]) -> list[AdapterFile]:
    """The adapters under one name table (an SDXL file may name its UNet by diffusers or SGM paths), refusing a mix
    of SDXL and SD 1.x/2.x files, whose modules would not line up even where their names do."""
    archs = {a.path: guess_architecture(a) for a in adapters}
    xl = {p for p, (arch, _) in archs.items() if arch == "sdxl"}
    sd = {p: arch for p, (arch, _) in archs.items() if arch in ("sd_v1", "sd_v2")}
    if xl and sd:
        a, b = next(iter(xl)), next(iter(sd))
        raise SdloraError(f"{a} is an SDXL LoRA ({archs[a][1]}) and {b} an {LABELS[sd[b]]} LoRA ({archs[b][1]}); "
                          "refusing to merge LoRAs for different base models")
    names = SDXL_NAMES if xl else SD1_NAMES
    return [canonical_modules(a, names) for a in adapters]


def _lora_metadata(adapters: list[AdapterFile], specs: list[LoraSpec], modules: dict[str, ModuleWeights],
                   output: Path, comment: str) -> dict[str, str]:
    """kohya/modelspec keys of a merged LoRA: architecture from the inputs, dims from the result."""
    src = adapters[0].metadata
    meta = {k: src[k] for k in ("ss_base_model_version", "ss_v2", "modelspec.architecture", "modelspec.implementation",
                                "modelspec.resolution", "modelspec.prediction_type") if k in src}
    arch = guess_architecture(adapters[0])[0]
    if "ss_base_model_version" not in meta and arch in KOHYA_VERSIONS:  # e.g. a diffusers-written input
        meta["ss_base_model_version"], meta["ss_v2"] = KOHYA_VERSIONS[arch], str(arch == "sd_v2")
        meta["modelspec.architecture"], meta["modelspec.implementation"] = modelspec_architecture(
            KOHYA_VERSIONS[arch], src.get("modelspec.prediction_type") == "v")
    triggers = [a.metadata["modelspec.trigger_phrase"] for a in adapters if a.metadata.get("modelspec.trigger_phrase")]
    meta.update({
        "ss_output_name": output.stem,
        "ss_network_module": "networks.lora",
        "ss_training_comment": comment,
        "modelspec.sai_model_spec": "1.0.1",
        "modelspec.title": output.stem,
        "modelspec.date": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S"),
        "modelspec.merged_from": merged_from(adapters, specs),
    })
    apply_dims(meta, modules)
    if triggers:
        meta["modelspec.trigger_phrase"] = ", ".join(dict.fromkeys(triggers))
    return meta


def merge_loras(specs: list[LoraSpec], output: str | Path, rank: int | None = None,
                save_dtype: str = "fp16") -> MergeResult:
    """Combine LoRA files into one kohya LoRA: exact (ranks concatenated) or SVD to `rank` per module."""
    output = Path(output)
    if output.suffix.lower() != ".safetensors":
        raise SdloraError(f"a merged LoRA is written as .safetensors, not {output.name} (to bake into a base, pass --base)")
    adapters = _load_checked(specs)
    for a in adapters:
        require_plain_lora(a, "merging into a LoRA file")
    versions = {a.metadata["ss_base_model_version"] for a in adapters if a.metadata.get("ss_base_model_version")}
    if len(versions) > 1:
        raise SdloraError(f"the LoRAs are for different base models ({', '.join(sorted(versions))}); refusing to merge them")
    adapters = same_family(adapters)
    modules = concat_modules(adapters, specs)
    if not modules:
        raise SdloraError("nothing to merge: every module's strength is 0")
    report = None
    if rank is not None:
        modules, report = reduce_modules(modules, rank=rank, dtype=torch_dtype(save_dtype))
        comment = f"merged by sdlora {__version__}: SVD of the summed updates to rank {rank}"
    else:
        comment = f"merged by sdlora {__version__}: ranks concatenated (exact)"
    meta = _lora_metadata(adapters, specs, modules, output, comment)
    sha = save_adapter(output, modules, meta, torch_dtype(save_dtype))
    return MergeResult(output, len(modules), sha, report)


def _unwrap_hosts(model: torch.nn.Module) -> None:
    """Put each (fused) LoRA host's base layer back under its own name, so the model saves as a plain one."""
    from sdlora.lora.layer import LoraHost

    for path, host in [(p, m) for p, m in model.named_modules() if isinstance(m, LoraHost)]:
        model.set_submodule(path, host.base)


def bake_into_base(base_name: str, specs: list[LoraSpec], output: str | Path, save_dtype: str = "fp16",
                   overwrite: bool = False) -> MergeResult:
    """Fold the LoRAs into the base's weights (W += s * dW, fp32) and save a diffusers folder or one LDM file."""
    from sdlora.lora.mixer import LoraMixer
    from sdlora.models.base import load_base

    output = Path(output)
    single = output.suffix.lower() == ".safetensors"
    if single:
        try:
            from sdlora.models.single_file import save_single_file
        except ImportError:
            raise SdloraError("single-file output is not available yet: pass a folder as --output") from None
    if output.exists() and (output.is_file() or any(output.iterdir())) and not overwrite:
        raise SdloraError(f"{output} already exists; pass --overwrite or another --output")
    adapters = _load_checked(specs)  # bad files fail before the base loads
    base = load_base(base_name, "fp32", "cpu")
    mixer = LoraMixer(base)
    for adapter, spec in zip(adapters, specs):
        mixer.add(adapter, spec.strength, spec.te_strength, blocks=spec.blocks)
    mixer.fuse()
    for model in (base.unet, *base.text_encoders.values()):
        _unwrap_hosts(model)
    dtype = torch_dtype(save_dtype)
    if single:
        save_single_file(base, output, dtype)
        return MergeResult(output, sum(len(h) for h in mixer.loaded.values()))
    info = {
        "modelspec.merged_from": f"{base_name}, " + merged_from(adapters, specs),
        "base": str(base_name),
        "loras": [{"file": str(s.path), "sha256": file_sha256(s.path), "strength": s.strength,
                   "te_strength": s.te_strength, "lbw": list(s.blocks) if s.blocks else None} for s in specs],
        "sdlora_version": __version__,
    }
    _save_folder(base, output, dtype, info)
    return MergeResult(output, sum(len(h) for h in mixer.loaded.values()))


def _save_folder(base, output: Path, dtype: torch.dtype, info: dict) -> None:
    """Write a diffusers folder beside `output`, then move it into place: never a half-written model there."""
    for m in base.modules():
        m.to(dtype)
    pipe = base.family.pipeline(base, base.noise_scheduler)  # the family's pipeline class, saved as a folder
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{output.name}.tmp-", dir=output.parent))
    try:
        pipe.save_pretrained(tmp, safe_serialization=True)
        (tmp / "merge_info.json").write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
        if output.exists():
            shutil.rmtree(output) if output.is_dir() else output.unlink()
        tmp.rename(output)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
