"""SDXL's kohya names: the UNet by the original (SGM) module layout, computed from the UNet's block layout.

kohya trains SDXL on its own copy of Stability's UNet, so its LoRA files name UNet modules the way that model does:
`input_blocks.4.1.transformer_blocks.0.attn2.to_k` where diffusers says
`down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k`. The table is derived from the layout (resnets per
block, which blocks hold attention, whether the mid block does) the way SGM numbers its blocks, not listed, so it
serves tiny SDXL-architecture models as well as the real one. Reading also accepts diffusers-path names
(`lora_unet_down_blocks_1_...`), which diffusers' own kohya export writes for SDXL.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cached_property

from sdlora.formats.names import NameTable, undotted_path

# Inside an SGM ResBlock (ldm `ResBlock`): diffusers leaf -> SGM leaf.
_RESNET_LEAVES = (
    ("norm1", "in_layers.0"), ("conv1", "in_layers.2"), ("time_emb_proj", "emb_layers.1"),
    ("norm2", "out_layers.0"), ("conv2", "out_layers.3"), ("conv_shortcut", "skip_connection"),
)
# Modules outside the block structure: diffusers path -> SGM path.
_TOP_LEVEL = (
    ("conv_in", "input_blocks.0.0"), ("time_embedding.linear_1", "time_embed.0"),
    ("time_embedding.linear_2", "time_embed.2"), ("add_embedding.linear_1", "label_emb.0.0"),
    ("add_embedding.linear_2", "label_emb.0.2"), ("conv_norm_out", "out.0"), ("conv_out", "out.2"),
)


@dataclass(frozen=True)
class UNetLayout:
    """What SGM's block numbering depends on: resnets per down block (up blocks hold one more) and attention."""

    layers_per_block: tuple[int, ...]
    down_attention: tuple[bool, ...]
    up_attention: tuple[bool, ...]
    mid_attention: bool = True

    @classmethod
    def from_config(cls, config: Mapping) -> UNetLayout:
        """The layout of a diffusers UNet2DConditionModel config (a dict or the model's FrozenDict)."""
        n = len(config["down_block_types"])
        lpb = config.get("layers_per_block", 2)
        lpb = tuple(int(x) for x in lpb) if isinstance(lpb, (list, tuple)) else (int(lpb),) * n
        mid = config.get("mid_block_type", "UNetMidBlock2DCrossAttn") or ""
        return cls(
            layers_per_block=lpb,
            down_attention=tuple("CrossAttn" in t for t in config["down_block_types"]),
            up_attention=tuple("CrossAttn" in t for t in config["up_block_types"]),
            mid_attention="CrossAttn" in mid,
        )

    def prefix_pairs(self) -> list[tuple[str, str]]:
        """(diffusers prefix, SGM prefix), both dotted and ending in '.', for every block and resnet leaf."""
        pairs = [(d + ".", s + ".") for d, s in _TOP_LEVEL]

        def resnet(d: str, s: str) -> None:
            pairs.extend((f"{d}{dl}.", f"{s}{sl}.") for dl, sl in _RESNET_LEAVES)

        n = len(self.layers_per_block)
        c = 1  # input_blocks.0 is conv_in
        for i, (layers, attn) in enumerate(zip(self.layers_per_block, self.down_attention)):
            for j in range(layers):
                resnet(f"down_blocks.{i}.resnets.{j}.", f"input_blocks.{c}.0.")
                if attn:
                    pairs.append((f"down_blocks.{i}.attentions.{j}.", f"input_blocks.{c}.1."))
                c += 1
            if i < n - 1:
                pairs.append((f"down_blocks.{i}.downsamplers.0.conv.", f"input_blocks.{c}.0.op."))
                c += 1
        resnet("mid_block.resnets.0.", "middle_block.0.")
        if self.mid_attention:
            pairs.append(("mid_block.attentions.0.", "middle_block.1."))
        resnet("mid_block.resnets.1.", f"middle_block.{2 if self.mid_attention else 1}.")
        c = 0
        for i, (layers, attn) in enumerate(zip(reversed(self.layers_per_block), self.up_attention)):
            for j in range(layers + 1):
                resnet(f"up_blocks.{i}.resnets.{j}.", f"output_blocks.{c}.0.")
                if attn:
                    pairs.append((f"up_blocks.{i}.attentions.{j}.", f"output_blocks.{c}.1."))
                c += 1
            if i < n - 1:  # the upsampler closes the block's last SGM sequential, after its attention if any
                pairs.append((f"up_blocks.{i}.upsamplers.0.conv.", f"output_blocks.{c - 1}.{2 if attn else 1}.conv."))
        return pairs


SDXL_LAYOUT = UNetLayout(layers_per_block=(2, 2, 2), down_attention=(False, True, True),
                         up_attention=(True, True, False))


def _longest_prefix(text: str, table: dict[str, str]) -> str | None:
    """The longest key of `table` that `text` starts with (keys end in their separator, so 1_ never matches 10_)."""
    best = None
    for key in table:
        if text.startswith(key) and (best is None or len(key) > len(best)):
            best = key
    return best


@dataclass
class SgmNameTable(NameTable):
    """kohya names of an SDXL-architecture family: SGM UNet paths, text encoders as lora_te1 / lora_te2."""

    te_prefixes: dict[str, str] = field(
        default_factory=lambda: {"lora_te1": "text_encoder", "lora_te2": "text_encoder_2"})
    layout: UNetLayout = SDXL_LAYOUT

    @classmethod
    def from_unet_config(cls, config: Mapping) -> SgmNameTable:
        return cls(layout=UNetLayout.from_config(config))

    @cached_property
    def _to_sgm(self) -> dict[str, str]:
        return dict(self.layout.prefix_pairs())

    @cached_property
    def _from_sgm(self) -> dict[str, str]:
        """SGM prefix with '_' for '.' (as it appears in a kohya name) -> diffusers prefix."""
        return {s.replace(".", "_"): d for d, s in self.layout.prefix_pairs()}

    def sgm_path(self, module_path: str) -> str:
        """A diffusers UNet module path in SGM's layout (unchanged if the layout has no such module)."""
        dotted = module_path + "."
        hit = _longest_prefix(dotted, self._to_sgm)
        return module_path if hit is None else (self._to_sgm[hit] + dotted[len(hit):]).rstrip(".")

    def unet_name(self, module_path: str) -> str:
        return super().unet_name(self.sgm_path(module_path))

    def unet_path(self, rest: str) -> str:
        """diffusers UNet module path from an SGM (or diffusers-path) kohya name's path part."""
        undotted = rest + "_"
        hit = _longest_prefix(undotted, self._from_sgm)
        if hit is None:
            return undotted_path(rest)  # a diffusers-path name
        inner = undotted[len(hit):].rstrip("_")  # a path inside an attention block, or '' for a leaf
        return (self._from_sgm[hit] + (undotted_path(inner) if inner else "")).rstrip(".")


SDXL_NAMES = SgmNameTable()
