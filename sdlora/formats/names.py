"""kohya module names <-> module paths: the one place every kohya name is made and read.

kohya names a module by a prefix (`lora_unet`, `lora_te`, `lora_te1`, `lora_te2`) and its path with every '.' turned
into '_' (`lora_unet_down_blocks_0_attentions_0_proj_in`). Text-encoder paths keep transformers 4's `text_model.`
level, which transformers 5 dropped. Reading a name back needs to know which '_' were dots: `COMPOUNDS` lists the
path tokens that contain '_' themselves. A family whose kohya names are not its diffusers paths (SDXL names its UNet
by the original SGM layout) subclasses `NameTable` (`SgmNameTable` in names_sdxl.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from sdlora.errors import SdloraError

KOHYA_PREFIXES = ("lora_unet", "lora_te", "lora_te1", "lora_te2")
# kohya prefix -> diffusers component that owns the module (SDXL's te1 is diffusers' text_encoder)
COMPONENTS = {"lora_unet": "unet", "lora_te": "text_encoder", "lora_te1": "text_encoder", "lora_te2": "text_encoder_2"}
# Module-path tokens that contain '_' themselves (kohya turned every '.' into '_'; these are put back whole).
COMPOUNDS = (
    "down_blocks", "up_blocks", "mid_block", "transformer_blocks", "proj_in", "proj_out", "to_q", "to_k", "to_v",
    "to_out", "time_emb_proj", "conv_shortcut", "text_model", "self_attn", "q_proj", "k_proj", "v_proj", "out_proj",
    "final_layer_norm", "text_projection", "add_embedding", "time_embedding", "linear_1", "linear_2", "conv_in",
    "conv_out", "conv_norm_out", "encoder_hid_proj", "class_embedding",
)
TE_ROOT = "text_model."


def kohya_name(prefix: str, module_path: str) -> str:
    """prefix + the module path with every '.' turned into '_'."""
    return f"{prefix.rstrip('_')}_{module_path.replace('.', '_')}"


def canonical_te_path(module_path: str) -> str:
    """transformers 5 dropped CLIPTextModel's `text_model.` level; kohya keys keep it."""
    return module_path if module_path.startswith(TE_ROOT) else TE_ROOT + module_path


def split_prefix(name: str) -> tuple[str, str]:
    """(kohya prefix, the rest) of a kohya module name; the longest prefix wins (lora_te1 before lora_te)."""
    for prefix in sorted(KOHYA_PREFIXES, key=len, reverse=True):
        if name.startswith(prefix + "_"):
            return prefix, name[len(prefix) + 1 :]
    raise SdloraError(f"not a kohya module name: {name}")


def undotted_path(rest: str) -> str:
    """A kohya name's path part back to a dotted module path, compound tokens kept whole."""
    dotted = "." + rest.replace("_", ".") + "."
    for token in COMPOUNDS:
        dotted = dotted.replace("." + token.replace("_", ".") + ".", "." + token + ".")
    return dotted.strip(".")


@dataclass
class NameTable:
    """kohya names of one family: UNet modules under `unet_prefix`, text encoders under `te_prefixes`."""

    unet_prefix: str = "lora_unet"
    te_prefixes: dict[str, str] = field(default_factory=lambda: {"lora_te": "text_encoder"})  # prefix -> TE key

    def unet_name(self, module_path: str) -> str:
        """kohya name of a diffusers UNet module path."""
        return kohya_name(self.unet_prefix, module_path)

    def te_name(self, prefix: str, module_path: str) -> str:
        return kohya_name(prefix, canonical_te_path(module_path))

    def unet_path(self, rest: str) -> str:
        """diffusers UNet module path from a kohya name's path part."""
        return undotted_path(rest)

    def module_path(self, name: str) -> tuple[str, str]:
        """(diffusers component, dotted module path) for a kohya module name; text encoders keep `text_model.`."""
        prefix, rest = split_prefix(name)
        if prefix == self.unet_prefix:
            return "unet", self.unet_path(rest)
        return COMPONENTS[prefix], canonical_te_path(undotted_path(rest))

    def canonical(self, name: str) -> str:
        """The name this family's files use for the module `name` denotes (an SGM name for a diffusers-path one)."""
        prefix, rest = split_prefix(name)
        return self.unet_name(self.unet_path(rest)) if prefix == self.unet_prefix else name


SD1_NAMES = NameTable()
