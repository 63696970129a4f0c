"""Which layers get a LoRA (`--targets`, `--text-encoder`, `--te-mlp`) and their kohya names.

Layers are found inside blocks recognised by class (Transformer2DModel, BasicTransformerBlock,
ResnetBlock2D, Downsample2D, Upsample2D, CLIP encoder layers) and counted against the architecture,
so a library rename that hides a layer fails loudly instead of silently training fewer modules.
`--targets` is a comma-separated union of presets, e.g. `all-linear,conv`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from sdlora.errors import SdloraError
from sdlora.formats.names import SD1_NAMES, NameTable, canonical_te_path, kohya_name

# Relative names inside each BasicTransformerBlock, per preset.
UNET_BLOCK_TARGETS = {
    "cross-attn": ["attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0"],
    "attn": [f"{a}.{p}" for a in ("attn1", "attn2") for p in ("to_q", "to_k", "to_v", "to_out.0")],
    "all-linear": [f"{a}.{p}" for a in ("attn1", "attn2") for p in ("to_q", "to_k", "to_v", "to_out.0")]
    + ["ff.net.0.proj", "ff.net.2"],
}
# Relative names inside each Transformer2DModel (only for all-linear, as kohya does).
UNET_TRANSFORMER_TARGETS = {"cross-attn": [], "attn": [], "all-linear": ["proj_in", "proj_out"]}
TE_ATTN = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj"]
TE_MLP = ["mlp.fc1", "mlp.fc2"]
PRESETS = tuple(UNET_BLOCK_TARGETS)
# `conv` adds kohya's LoRA-C3Lier (LoCon) layers, by block class; conv_in/conv_out/time_embedding never.
UNET_CONV_TARGETS = {
    "ResnetBlock2D": ["conv1", "conv2", "time_emb_proj", "conv_shortcut"],
    "Downsample2D": ["conv"],
    "Upsample2D": ["conv"],
}
TARGET_CHOICES = (*PRESETS, "conv")


def parse_targets(text: str) -> list[str]:
    """`--targets` as a list of presets: comma-separated, each one of TARGET_CHOICES, duplicates dropped."""
    names = [n.strip() for n in str(text).split(",") if n.strip()]
    for n in names or [""]:
        if n not in TARGET_CHOICES:
            raise SdloraError(
                f"invalid targets '{text}' (unknown --targets value '{n}'): choose one or more of "
                f"{', '.join(TARGET_CHOICES)}, comma-separated, e.g. all-linear,conv"
            )
    return list(dict.fromkeys(names))


def uses_conv_rank(layer: nn.Module) -> bool:
    """kohya's rule: kxk convs (k > 1) take --conv-rank/--conv-alpha; Linear and 1x1 convs the main rank/alpha."""
    return isinstance(layer, nn.Conv2d) and tuple(layer.kernel_size) != (1, 1)


@dataclass
class Target:
    kohya_name: str
    module_path: str  # path inside its model (model-specific, for set_submodule)
    model: nn.Module
    layer: nn.Module
    is_text_encoder: bool


def _resolve(root: nn.Module, rel: str) -> nn.Module | None:
    try:
        m = root.get_submodule(rel)
    except AttributeError:
        return None
    from sdlora.lora.layer import LoraHost

    if isinstance(m, LoraHost):  # already wrapped (a LoRA loaded or trained before): target the layer inside
        m = m.base
    return m if isinstance(m, (nn.Linear, nn.Conv2d)) else None


def _collect(model: nn.Module, block_pred, rels: list[str], name_of: Callable[[str], str], te: bool) -> list[Target]:
    found = []
    for path, block in model.named_modules():
        if not block_pred(block):
            continue
        for rel in rels:
            layer = _resolve(block, rel)
            if layer is not None:
                full = f"{path}.{rel}" if path else rel
                found.append(Target(name_of(full), full, model, layer, te))
    return found


def _classname(m: nn.Module) -> str:
    return type(m).__name__


def unet_targets(unet: nn.Module, targets: str, names: NameTable = SD1_NAMES) -> list[Target]:
    """UNet layers for `--targets` (one preset or a comma list), checked against the block counts, named by the
    family's table (SDXL's are SGM paths)."""
    presets = parse_targets(targets)
    linear = [p for p in presets if p != "conv"]
    block_rels = list(dict.fromkeys(r for p in linear for r in UNET_BLOCK_TARGETS[p]))
    transformer_rels = list(dict.fromkeys(r for p in linear for r in UNET_TRANSFORMER_TARGETS[p]))
    found = _collect(unet, lambda m: _classname(m) == "BasicTransformerBlock", block_rels, names.unet_name, False)
    found += _collect(unet, lambda m: _classname(m) == "Transformer2DModel", transformer_rels, names.unet_name, False)
    n_blocks = sum(1 for m in unet.modules() if _classname(m) == "BasicTransformerBlock")
    n_transformers = sum(1 for m in unet.modules() if _classname(m) == "Transformer2DModel")
    expected = n_blocks * len(block_rels) + n_transformers * len(transformer_rels)
    if "conv" in presets:
        for cls, rels in UNET_CONV_TARGETS.items():
            found += _collect(unet, lambda m, c=cls: _classname(m) == c, rels, names.unet_name, False)
        expected += _expected_conv_layers(unet)
    _check_count("UNet", ",".join(presets), expected, len(found), n_blocks == 0)
    return sorted(found, key=lambda t: t.kohya_name)


def _expected_conv_layers(unet: nn.Module) -> int:
    """Per ResnetBlock2D conv1, conv2, time_emb_proj (+ conv_shortcut when channels change); one conv per resampler."""
    n = 0
    for m in unet.modules():
        if _classname(m) == "ResnetBlock2D":
            n += 3 + bool(getattr(m, "use_in_shortcut", False))
        elif _classname(m) in ("Downsample2D", "Upsample2D"):
            n += bool(getattr(m, "use_conv", False))
    return n


def text_encoder_targets(te: nn.Module, prefix: str = "lora_te", mlp: bool = False) -> list[Target]:
    rels = TE_ATTN + (TE_MLP if mlp else [])
    found = _collect(te, lambda m: _classname(m).endswith("EncoderLayer"), rels,
                     lambda p: kohya_name(prefix, canonical_te_path(p)), True)
    expected = te.config.num_hidden_layers * len(rels)
    _check_count("text encoder", "attn+mlp" if mlp else "attn", expected, len(found), False)
    return sorted(found, key=lambda t: t.kohya_name)


def _check_count(where: str, preset: str, expected: int, found: int, no_blocks: bool) -> None:
    if no_blocks:
        raise SdloraError(f"no transformer blocks found in the {where}: is this a Stable Diffusion UNet?")
    if found != expected:
        raise SdloraError(
            f"LoRA target check failed: the {where} architecture has room for {expected} '{preset}' modules "
            f"but {found} were found by name (a renamed layer in diffusers/transformers?); refusing to train a partial LoRA"
        )


def all_lora_layers(model: nn.Module, prefix: str, te: bool, names: NameTable = SD1_NAMES) -> dict[str, tuple[str, nn.Module]]:
    """Every Linear/Conv2d (or LoRA host already wrapping one) by kohya name, to match adapter files; UNet names
    come from the family's table."""
    from sdlora.lora.layer import LoraHost

    out: dict[str, tuple[str, nn.Module]] = {}

    def walk(module: nn.Module, path: str) -> None:
        for child_name, child in module.named_children():
            full = f"{path}.{child_name}" if path else child_name
            if isinstance(child, (nn.Linear, nn.Conv2d, LoraHost)):
                out[names.te_name(prefix, full) if te else names.unet_name(full)] = (full, child)
            else:
                walk(child, full)

    walk(model, "")
    return out


def ensure_host(model: nn.Module, path: str, kohya_name: str):
    """The LoraHost at `path`, wrapping the plain layer there on first use."""
    from sdlora.lora.layer import LoraHost

    layer = model.get_submodule(path)
    if isinstance(layer, LoraHost):
        return layer
    host = LoraHost(layer, kohya_name)
    model.set_submodule(path, host)
    return host
