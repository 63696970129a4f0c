"""Per-block LoRA strength: the "LoRA Block Weight" vectors of the A1111 extension and ComfyUI's Inspire nodes.

A vector gives one multiplier per block of the original (SGM) UNet layout: BASE (the text encoders), IN00..IN11
(input_blocks), M00 (the middle block) and OUT00..OUT11 (output_blocks). The extension (hako-mikan/
sd-webui-lora-block-weight, `BLOCKID*` and `to26`) accepts 17 values for SD1/SD2 (BASE, IN01, IN02, IN04, IN05, IN07,
IN08, M00, OUT03..OUT11: the blocks that hold a transformer), 26 for SD1/SD2 with every block (LyCORIS/LoCon reach
the others), 12 for SDXL (BASE, IN04, IN05, IN07, IN08, M00, OUT00..OUT05) and 20 for SDXL with every block; a
block the vector does not list gets 0, as `to26` does, and a layer outside every block keeps 1.

kohya names SD1/SD2 UNet modules by their diffusers paths and SDXL's by SGM names; both are mapped here. diffusers
down block i, layer j is input_blocks[1 + i*(L+1) + j], its downsampler input_blocks[(i+1)*(L+1)]; up block i,
layer j is output_blocks[i*(L+1) + j] and its upsampler sits in output_blocks[i*(L+1) + L] (L = layers_per_block).
"""

from __future__ import annotations

import re

from sdlora.errors import SdloraError

BLOCK_IDS = ("BASE", *[f"IN{i:02d}" for i in range(12)], "M00", *[f"OUT{i:02d}" for i in range(12)])
LAYOUTS = {  # vector length -> the blocks it lists, in order
    17: ("BASE", "IN01", "IN02", "IN04", "IN05", "IN07", "IN08", "M00", *[f"OUT{i:02d}" for i in range(3, 12)]),
    26: BLOCK_IDS,
    12: ("BASE", "IN04", "IN05", "IN07", "IN08", "M00", *[f"OUT{i:02d}" for i in range(6)]),
    20: ("BASE", *[f"IN{i:02d}" for i in range(9)], "M00", *[f"OUT{i:02d}" for i in range(9)]),
}
LENGTHS = {"sd1": (17, 26), "sdxl": (12, 20)}  # family name -> the vector lengths that fit its UNet

# The extension's default presets (DEF_WEIGHT_PRESET) and the SDXL ones of ComfyUI-Inspire-Pack's lbw-preset.txt.
PRESETS: dict[str, str] = {
    "NONE": "0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0",
    "ALL": "1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1",
    "INS": "1,1,1,1,0,0,0,0,0,0,0,0,0,0,0,0,0",
    "IND": "1,0,0,0,1,1,1,0,0,0,0,0,0,0,0,0,0",
    "INALL": "1,1,1,1,1,1,1,0,0,0,0,0,0,0,0,0,0",
    "MIDD": "1,0,0,0,1,1,1,1,1,1,1,1,0,0,0,0,0",
    "OUTD": "1,0,0,0,0,0,0,0,1,1,1,1,0,0,0,0,0",
    "OUTS": "1,0,0,0,0,0,0,0,0,0,0,0,1,1,1,1,1",
    "OUTALL": "1,0,0,0,0,0,0,0,1,1,1,1,1,1,1,1,1",
    "ALL0.5": "0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5",
    "SDXL-NONE": "0,0,0,0,0,0,0,0,0,0,0,0",
    "SDXL-ALL": "1,1,1,1,1,1,1,1,1,1,1,1",
    "SDXL-INALL": "1,1,1,1,1,0,0,0,0,0,0,0",
    "SDXL-MIDALL": "1,0,0,0,0,1,0,0,0,0,0,0",
    "SDXL-OUTALL": "1,0,0,0,0,0,1,1,1,1,1,1",
}

_SGM = re.compile(r"^lora_unet_(input_blocks|output_blocks)_(\d+)_")
_DIFFUSERS = re.compile(r"^lora_unet_(down_blocks|up_blocks)_(\d+)_(attentions|resnets|downsamplers|upsamplers)_(\d+)_")


def parse_block_weights(text: str) -> tuple[float, ...]:
    """A preset name (ALL, OUTALL, SDXL-ALL...; Inspire's `SD-` prefix accepted) or 12/17/20/26 comma-separated numbers."""
    key = text.strip().upper()
    if key.startswith("SD-") and key[3:] in PRESETS:
        key = key[3:]
    source = PRESETS.get(key, text)
    try:
        values = tuple(float(v) for v in source.split(","))
    except ValueError:
        raise SdloraError(
            f"lbw '{text}': expected a preset ({', '.join(PRESETS)}) or comma-separated numbers "
            f"(17 for SD1/SD2: BASE,IN01,IN02,IN04,IN05,IN07,IN08,MID,OUT03..OUT11)"
        ) from None
    if len(values) not in LAYOUTS:
        raise SdloraError(f"lbw '{text}' has {len(values)} values; block weights have 17 or 26 (SD1/SD2), 12 or 20 (SDXL)")
    return values


def format_block_weights(values: tuple[float, ...]) -> str:
    """The vector as written in tags and file metadata: a preset name when it is one, else the numbers."""
    text = ",".join(f"{v:g}" for v in values)
    for name, preset in PRESETS.items():
        if preset == text:
            return name
    return text


def check_fits(values: tuple[float, ...], family: str) -> None:
    """A 17-value SD1 vector on an SDXL UNet (or the reverse) would scale the wrong blocks: refuse it."""
    allowed = LENGTHS.get(family, LENGTHS["sd1"])
    if len(values) not in allowed:
        kind = "SDXL" if family == "sdxl" else "SD1/SD2"
        raise SdloraError(f"lbw has {len(values)} values, but this is an {kind} model: use "
                          f"{' or '.join(map(str, allowed))} values" + (" (e.g. SDXL-ALL)" if family == "sdxl" else ""))


def block_table(values: tuple[float, ...]) -> dict[str, float]:
    """Multiplier per block id; blocks the vector does not list are 0 (the extension's `to26`)."""
    table = dict.fromkeys(BLOCK_IDS, 0.0)
    table.update(zip(LAYOUTS[len(values)], values))
    return table


def block_id(kohya_name: str, layers_per_block: int = 2) -> str | None:
    """The LBW block of a kohya module name (SD1 diffusers paths or SDXL SGM names); None outside every block."""
    if kohya_name.startswith("lora_te"):
        return "BASE"
    if kohya_name.startswith(("lora_unet_mid_block_", "lora_unet_middle_block_")):
        return "M00"
    if m := _SGM.match(kohya_name):
        return f"{'IN' if m[1] == 'input_blocks' else 'OUT'}{int(m[2]):02d}"
    if m := _DIFFUSERS.match(kohya_name):
        i, kind, j, per = int(m[2]), m[3], int(m[4]), layers_per_block + 1
        if m[1] == "down_blocks":
            index = (i + 1) * per if kind == "downsamplers" else 1 + i * per + j
            return f"IN{index:02d}"
        index = i * per + layers_per_block if kind == "upsamplers" else i * per + j
        return f"OUT{index:02d}"
    return None


def block_multiplier(kohya_name: str, table: dict[str, float] | None, layers_per_block: int = 2) -> float:
    """What a layer's strength is multiplied by: 1 without a vector or outside every block."""
    if table is None:
        return 1.0
    block = block_id(kohya_name, layers_per_block)
    return 1.0 if block is None else table.get(block, 0.0)
