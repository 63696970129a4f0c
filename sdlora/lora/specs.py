"""The LoRA-spec grammars: `FILE[:STRENGTH[:TE_STRENGTH]][:lbw=BLOCKS]` on the command line and A1111's `<lora:NAME:...>` tags.

Shared by the CLI, the page and the tools, so every front end reads a spec the same way.
"""

from __future__ import annotations

import math
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


SPEC_FORMS = ("FILE, FILE:STRENGTH or FILE:STRENGTH:TE_STRENGTH (numbers, e.g. style.safetensors:0.8 or style.safetensors:1:0.5), "
              "each optionally followed by :lbw=BLOCKS (a LoRA Block Weight preset such as OUTALL, or its numbers)")


def _number(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def parse_lora_spec(text: str, option: str = "--lora") -> LoraSpec:
    """`FILE[:STRENGTH[:TE_STRENGTH]][:lbw=BLOCKS]`; parts are peeled off the right so `C:\\x.safetensors` works.

    BLOCKS is a LoRA Block Weight preset (`OUTALL`) or its comma-separated numbers (`1,0,0,0,0,0,0,0,1,1,...`).

    A colon part that is not a number and not part of a path (no slash, no extension) is a mistyped strength: it is
    reported as one, with the accepted forms, rather than as a missing file named `FILE:abc`.
    """
    if Path(text).is_file():  # a file whose name holds colons
        return LoraSpec(text)
    parts = text.split(":")
    nums: list[float] = []
    blocks = None
    if len(parts) > 1 and parts[-1].strip().lower().startswith("lbw="):
        blocks = parse_block_weights(parts.pop().strip()[4:])
        text = ":".join(parts)
    while len(parts) > 1 and len(nums) < 2 and (n := _number(parts[-1])) is not None:
        nums.insert(0, n)
        parts.pop()
    path = ":".join(parts)
    if not path:
        raise SdloraError(f"{option} '{text}': no file given; expected {SPEC_FORMS}")
    if len(parts) > 1 and not Path(path).is_file():
        tail = parts[-1]
        if _number(tail) is not None:
            raise SdloraError(f"{option} '{text}': too many strengths (at most two numbers after the file); expected {SPEC_FORMS}")
        if not tail:
            raise SdloraError(f"{option} '{text}': empty strength after ':'; expected {SPEC_FORMS}")
        if not re.search(r"[/\\\\]|\.[A-Za-z]\w*$", tail):  # not the end of a path such as "my:file.safetensors"
            raise SdloraError(f"{option} '{text}': bad strength '{tail}'; expected {SPEC_FORMS}")
    for value, raw in zip(nums, text.split(":")[len(parts):]):
        if not math.isfinite(value):
            raise SdloraError(f"{option} '{text}': strength '{raw}' is not a finite number; expected {SPEC_FORMS}")
    return LoraSpec(path, nums[0] if nums else 1.0, nums[1] if len(nums) > 1 else None, blocks)


def check_strengths(label: str, strength: float, te_strength: float | None = None) -> None:
    """Strengths must be finite numbers: inf or NaN scales every weight to inf/NaN, and the image comes out black."""
    for what, value in (("strength", strength), ("text-encoder strength", te_strength)):
        if value is not None and not math.isfinite(value):
            raise SdloraError(f"{label}: {what} {value} is not a finite number")


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
        if len(positional) > 2 or set(named) - {"te", "unet", "lbw", "w"}:
            raise SdloraError(f"bad prompt tag {m.group(0)}: expected <lora:NAME>, <lora:NAME:MULT>, <lora:NAME:TE:UNET> "
                              "or te=/unet=/lbw= parts")
        try:
            te = float(named.get("te", positional[0] if positional else 1.0))
            unet = float(named.get("unet", positional[1] if len(positional) > 1 else te))
        except ValueError:
            raise SdloraError(f"bad multiplier in prompt tag {m.group(0)}: multipliers are numbers, e.g. <lora:{name}:0.8>") from None
        if not (math.isfinite(te) and math.isfinite(unet)):
            raise SdloraError(f"bad multiplier in prompt tag {m.group(0)}: not a finite number")
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
