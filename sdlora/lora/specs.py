"""The LoRA-spec grammars: `FILE[:STRENGTH[:TE_STRENGTH]][:lbw=BLOCKS]` on the command line and A1111's `<lora:NAME:...>` tags.

Shared by the CLI, the page and the tools, so every front end reads a spec the same way.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from sdlora.errors import SdloraError
from sdlora.lora.blocks import parse_block_weights

LORA_TAG = re.compile(r"<lora:([^:>]+)((?::[^:>]*)*)>")


@dataclass
class LoraSpec:
    path: str
    strength: float = 1.0
    te_strength: float | None = None  # None: same as strength
    blocks: tuple[float, ...] | None = None  # LoRA Block Weight vector (sdlora.lora.blocks); None: every block at 1


def parse_lora_spec(text: str) -> LoraSpec:
    """`FILE[:STRENGTH[:TE_STRENGTH]][:lbw=BLOCKS]`; parts are peeled off the right so `C:\\x.safetensors` works.

    BLOCKS is a LoRA Block Weight preset (`OUTALL`) or its comma-separated numbers (`1,0,0,0,0,0,0,0,1,1,...`).
    """
    parts = text.split(":")
    nums: list[float] = []
    blocks = None
    if len(parts) > 1 and parts[-1].strip().lower().startswith("lbw="):
        blocks = parse_block_weights(parts.pop().strip()[4:])
    while len(parts) > 1 and len(nums) < 2:
        try:
            nums.insert(0, float(parts[-1]))
        except ValueError:
            break
        parts.pop()
    path = ":".join(parts)
    if not path:
        raise SdloraError(f"--lora '{text}': expected FILE[:STRENGTH[:TE_STRENGTH]][:lbw=BLOCKS]")
    return LoraSpec(path, nums[0] if nums else 1.0, nums[1] if len(nums) > 1 else None, blocks)


def extract_prompt_loras(prompt: str, lora_dir: str | Path | None) -> tuple[str, list[LoraSpec]]:
    """Take A1111's `<lora:NAME:MULT>` / `<lora:NAME:TE:UNET>` / `te=`/`unet=` tags out of a prompt.

    Block weights are read as the LoRA Block Weight extension writes them: `<lora:NAME:1:lbw=OUTALL>` (`w=` too), or
    a positional preset or vector after the numbers (`<lora:NAME:1:OUTALL>`, `<lora:NAME:1:1,0,0,...>`).
    """
    specs = []
    for m in LORA_TAG.finditer(prompt):
        name, rest = m.group(1).strip(), [p.strip() for p in m.group(2).split(":")[1:]]
        named = {p.split("=", 1)[0].strip().lower(): p.split("=", 1)[1] for p in rest if "=" in p}
        positional = [p for p in rest if "=" not in p and _is_number(p)]
        lbw = named.get("lbw", named.get("w")) or next((p for p in rest if "=" not in p and not _is_number(p)), None)
        try:
            te = float(named.get("te", positional[0] if positional else 1.0))
            unet = float(named.get("unet", positional[1] if len(positional) > 1 else te))
        except ValueError:
            raise SdloraError(f"bad multiplier in prompt tag {m.group(0)}") from None
        blocks = parse_block_weights(lbw) if lbw else None
        specs.append(LoraSpec(str(find_lora(name, lora_dir)), unet, te, blocks))
    clean = re.sub(r"\s*,\s*,", ",", LORA_TAG.sub("", prompt)).strip(" ,")
    return clean, specs


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def find_lora(name: str, lora_dir: str | Path | None) -> Path:
    """By file stem, then by the `ss_output_name` alias, as A1111 resolves tags."""
    if lora_dir is None:
        raise SdloraError(f"the prompt uses <lora:{name}:...> but no --lora-dir was given to look it up in")
    root = Path(lora_dir)
    if not root.is_dir():
        raise SdloraError(f"--lora-dir not found: {root}")
    files = sorted(root.rglob("*.safetensors"))
    for f in files:
        if f.stem == name:
            return f
    from safetensors import safe_open

    for f in files:
        try:
            with safe_open(str(f), "pt") as fh:
                if (fh.metadata() or {}).get("ss_output_name") == name:
                    return f
        except Exception:
            continue
    raise SdloraError(f"<lora:{name}> not found in {root} (looked for {name}.safetensors and ss_output_name)")
