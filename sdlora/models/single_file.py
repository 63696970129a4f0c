"""Single-file SD1.x checkpoints in the original (LDM / CompVis) key layout: read safely and offline, and write.

People download bases as one `.safetensors`/`.ckpt` with `model.diffusion_model.*`, `first_stage_model.*` and
`cond_stage_model.transformer.*` keys. Reading renames keys with diffusers' own converters
(`convert_ldm_unet_checkpoint`, `convert_ldm_vae_checkpoint`, `convert_ldm_clip_checkpoint`), but the configs are
read from the tensor shapes here: diffusers infers them from the original YAML, which it downloads. What shapes
cannot tell (GroupNorm groups, heads, sample size, VAE scale) is SD1's value, or the exact value when sdlora wrote
the file (`sdlora.config_hints` metadata). Writing is the inverse mapping written by hand from the block
arithmetic: diffusers ships no SD1 LDM writer, only a one-off script.

Opening the file (weights-only, never a pickle executed) and refusing what is not an SD1 checkpoint is
sdlora.models.single_file_read; its names are importable from here too.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from sdlora.errors import SdloraError
from sdlora.models.single_file_read import (  # the F401-marked names are re-exported: callers import them from here
    TE_PREFIX,
    TORCH_SUFFIXES,  # noqa: F401
    UNET_PREFIX,
    VAE_PREFIX,
    _torch_load,  # noqa: F401
    check_architecture,  # noqa: F401
    check_suffix,  # noqa: F401
    read_checkpoint,
)

if TYPE_CHECKING:
    from sdlora.models.base import BaseModel, Components

HINTS_KEY = "sdlora.config_hints"

# SD1.5's values for what the tensors cannot tell; a file written by sdlora overrides them with its own.
UNET_HINTS = {"attention_head_dim": 8, "norm_num_groups": 32, "sample_size": 64}
VAE_HINTS = {"norm_num_groups": 32, "sample_size": 512, "scaling_factor": 0.18215}
TEXT_HINTS = {"num_attention_heads": None, "hidden_act": "quick_gelu", "bos_token_id": 49406, "eos_token_id": 49407,
              "pad_token_id": 1}


# ---------------------------------------------------------------- configs from shapes


def _indices(keys, pattern: str) -> list[int]:
    rx = re.compile(pattern)
    return sorted({int(m.group(1)) for k in keys if (m := rx.match(k))})


def _hints(metadata: dict[str, str], part: str, defaults: dict) -> dict:
    try:
        given = json.loads(metadata.get(HINTS_KEY, "{}")).get(part, {})
    except (ValueError, AttributeError):
        given = {}
    return {k: given.get(k, v) for k, v in defaults.items()}


def infer_unet_config(sd: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> dict:
    """diffusers UNet2DConditionModel config from LDM tensor shapes (prefix stripped)."""
    n_in = len(_indices(sd, r"input_blocks\.(\d+)\."))
    ops = _indices(sd, r"input_blocks\.(\d+)\.0\.op\.weight")
    levels = len(ops) + 1
    per = n_in // levels  # conv_in + per level (resnets + downsampler), less the last level's downsampler
    channels, down = [], []
    for i in range(levels):
        n = 1 + i * per
        channels.append(sd[f"input_blocks.{n}.0.out_layers.3.weight"].shape[0])
        down.append("CrossAttnDownBlock2D" if f"input_blocks.{n}.1.proj_in.weight" in sd else "DownBlock2D")
    attn = next(k for k in sd if k.endswith("transformer_blocks.0.attn2.to_k.weight"))
    first = attn.rsplit(".transformer_blocks.", 1)[0]
    config = {
        "in_channels": sd["input_blocks.0.0.weight"].shape[1],
        "out_channels": sd["out.2.weight"].shape[0],
        "layers_per_block": per - 1,
        "block_out_channels": channels,
        "down_block_types": down,
        "up_block_types": [t.replace("Down", "Up") for t in reversed(down)],
        "cross_attention_dim": sd[attn].shape[1],
        "use_linear_projection": sd[f"{first}.proj_in.weight"].ndim == 2,
        "transformer_layers_per_block": len(_indices(sd, re.escape(first) + r"\.transformer_blocks\.(\d+)\.")),
    }
    return config | _hints(metadata or {}, "unet", UNET_HINTS)


def infer_vae_config(sd: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> dict:
    """diffusers AutoencoderKL config from LDM tensor shapes (prefix stripped)."""
    levels = _indices(sd, r"encoder\.down\.(\d+)\.")
    config = {
        "in_channels": sd["encoder.conv_in.weight"].shape[1],
        "out_channels": sd["decoder.conv_out.weight"].shape[0],
        "block_out_channels": [sd[f"encoder.down.{i}.block.0.conv2.weight"].shape[0] for i in levels],
        "down_block_types": ["DownEncoderBlock2D"] * len(levels),
        "up_block_types": ["UpDecoderBlock2D"] * len(levels),
        "layers_per_block": len(_indices(sd, r"encoder\.down\.0\.block\.(\d+)\.")),
        "latent_channels": sd["post_quant_conv.weight"].shape[0],
    }
    return config | _hints(metadata or {}, "vae", VAE_HINTS)


def infer_text_config(sd: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> dict:
    """transformers CLIPTextConfig kwargs from shapes (keys start at `text_model.`); heads default to 64 dims each."""
    vocab, hidden = sd["text_model.embeddings.token_embedding.weight"].shape
    config = {
        "vocab_size": vocab,
        "hidden_size": hidden,
        "projection_dim": hidden,
        "max_position_embeddings": sd["text_model.embeddings.position_embedding.weight"].shape[0],
        "num_hidden_layers": len(_indices(sd, r"text_model\.encoder\.layers\.(\d+)\.")),
        "intermediate_size": sd["text_model.encoder.layers.0.mlp.fc1.weight"].shape[0],
    }
    hints = _hints(metadata or {}, "text_encoder", TEXT_HINTS)
    hints["num_attention_heads"] = hints["num_attention_heads"] or hidden // 64
    return config | hints


# ---------------------------------------------------------------- building the components


def load_single_file(
    path: str | Path, dtype: torch.dtype = torch.float32, vae_dtype: torch.dtype | None = None
) -> Components:
    """UNet, VAE, CLIP text encoder, tokenizer and DDPM scheduler of an SD1.x single file, with no network."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import (
        convert_ldm_clip_checkpoint,
        convert_ldm_unet_checkpoint,
        convert_ldm_vae_checkpoint,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from sdlora.models.tiny import SCHEDULER_CONFIG, TOKENIZER_DIR

    path = Path(path)
    ckpt, metadata = read_checkpoint(path)
    # very old files lack the `text_model.` level that transformers has had since 4.x
    ckpt = {(TE_PREFIX + "text_model." + k[len(TE_PREFIX):] if k.startswith(TE_PREFIX) and ".text_model." not in k else k): v
            for k, v in ckpt.items()}
    strip = lambda prefix: {k[len(prefix):]: v for k, v in ckpt.items() if k.startswith(prefix)}  # noqa: E731
    try:
        unet_cfg = infer_unet_config(strip(UNET_PREFIX), metadata)
        vae_cfg = infer_vae_config(strip(VAE_PREFIX), metadata)
        text_cfg = infer_text_config(strip(TE_PREFIX), metadata)
    except (KeyError, StopIteration, IndexError, ZeroDivisionError) as e:
        raise SdloraError(f"{path.name}: unexpected SD1 checkpoint layout (cannot read its configuration: {e})") from None
    if unet_cfg["in_channels"] != 4:
        raise SdloraError(f"{path.name}: UNet takes {unet_cfg['in_channels']} input channels (inpainting/edit model); only plain 4-channel SD 1.x bases train")
    if unet_cfg["cross_attention_dim"] != text_cfg["hidden_size"]:
        raise SdloraError(f"{path.name}: UNet cross-attention width {unet_cfg['cross_attention_dim']} does not match the text encoder's {text_cfg['hidden_size']}")
    tokenizer = CLIPTokenizer.from_pretrained(TOKENIZER_DIR)
    if text_cfg["vocab_size"] != len(tokenizer):
        raise SdloraError(f"{path.name}: text encoder vocabulary {text_cfg['vocab_size']} is not CLIP's {len(tokenizer)}")

    unet = _assemble(lambda: UNet2DConditionModel.from_config(unet_cfg),
                     convert_ldm_unet_checkpoint(ckpt, unet_cfg), dtype, "UNet", path)
    vae = _assemble(lambda: AutoencoderKL.from_config(vae_cfg),
                    convert_ldm_vae_checkpoint(ckpt, vae_cfg), vae_dtype or dtype, "VAE", path)
    te_sd = {k: v for k, v in convert_ldm_clip_checkpoint(ckpt).items() if not k.endswith("position_ids")}
    te = _assemble(lambda: CLIPTextModel(CLIPTextConfig(**text_cfg)), te_sd, dtype, "text encoder", path)
    from sdlora.models.base import Components
    from sdlora.models.sd1 import SD1Family

    sched = DDPMScheduler.from_config(SCHEDULER_CONFIG)
    return Components(unet, vae, {"text_encoder": te}, {"text_encoder": tokenizer}, sched, SD1Family)


def _assemble(make, state: dict[str, torch.Tensor], dtype: torch.dtype, what: str, path: Path) -> nn.Module:
    """Build on the meta device (no random init of ~1B parameters), then adopt the file's tensors strictly."""
    from accelerate import init_empty_weights

    try:
        with init_empty_weights():
            model = make()
    except (ValueError, TypeError, RuntimeError) as e:  # e.g. channels not divisible by SD1's 32 GroupNorm groups
        raise SdloraError(f"{path.name}: cannot build the {what} its shapes describe ({str(e).splitlines()[0]})") from None
    expected = model.state_dict()
    if not any(k.startswith("text_model.") for k in expected):  # transformers >= 5.6 flattened CLIPTextModel
        state = {k.removeprefix("text_model."): v for k, v in state.items()}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = sorted(k for k in set(state) & set(expected) if state[k].shape != expected[k].shape)
    if missing or unexpected or wrong:
        first = (missing and f"missing {missing[0]}") or (unexpected and f"unexpected {unexpected[0]}") or f"shape of {wrong[0]}"
        raise SdloraError(
            f"{path.name}: the {what} weights do not fit the SD1 layout read from their shapes "
            f"({len(missing)} missing, {len(unexpected)} unexpected, {len(wrong)} mis-shaped; {first})"
        )
    # copies in memory of our own: safetensors can hand out views into the mapped file, at offsets that keep the
    # file open and change which CPU kernels run (fp32 outputs then differ from the folder's in the last bit)
    state = {k: v.to(dtype, copy=True) if v.is_floating_point() else v.clone() for k, v in state.items()}
    model.load_state_dict(state, strict=True, assign=True)
    return model.requires_grad_(False).eval()


# ---------------------------------------------------------------- writing (diffusers -> LDM)

_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "norm2": "out_layers.0", "conv2": "out_layers.3",
           "time_emb_proj": "emb_layers.1", "conv_shortcut": "skip_connection"}
_VAE_ATTN = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
_BLOCK = re.compile(r"(down|up)_blocks\.(\d+)\.(resnets|attentions|downsamplers|upsamplers)\.(\d+)\.(.+)")
_MID = re.compile(r"mid_block\.(resnets|attentions)\.(\d+)\.(.+)")


def _rename_first(rest: str, table: dict[str, str]) -> str:
    for old, new in table.items():
        if rest.startswith(old + "."):
            return new + rest[len(old):]
    return rest


def unet_key_to_ldm(key: str, config) -> str:
    """diffusers UNet key -> LDM key (without `model.diffusion_model.`): SD's input/middle/output block numbering."""
    from diffusers.loaders.single_file_utils import DIFFUSERS_TO_LDM_MAPPING

    top = DIFFUSERS_TO_LDM_MAPPING["unet"]["layers"]
    if key in top:
        return top[key]
    per = config["layers_per_block"] + 1
    if m := _BLOCK.fullmatch(key):
        side, i, part, j, rest = m.group(1), int(m.group(2)), m.group(3), int(m.group(4)), m.group(5)
        if side == "down":
            n = 1 + i * per + j
            if part == "downsamplers":
                return f"input_blocks.{(i + 1) * per}.0.op.{rest.removeprefix('conv.')}"
        else:
            n = i * per + j
            if part == "upsamplers":
                slot = 2 if config["up_block_types"][i].startswith("CrossAttn") else 1
                return f"output_blocks.{i * per + per - 1}.{slot}.{rest}"
        where = "input_blocks" if side == "down" else "output_blocks"
        return f"{where}.{n}.0.{_rename_first(rest, _RESNET)}" if part == "resnets" else f"{where}.{n}.1.{rest}"
    if m := _MID.fullmatch(key):
        part, j, rest = m.group(1), int(m.group(2)), m.group(3)
        return f"middle_block.{2 * j}.{_rename_first(rest, _RESNET)}" if part == "resnets" else f"middle_block.1.{rest}"
    raise KeyError(key)


def vae_key_to_ldm(key: str, config) -> str:
    """diffusers AutoencoderKL key -> LDM key (without `first_stage_model.`); decoder levels count from the bottom."""
    from diffusers.loaders.single_file_utils import DIFFUSERS_TO_LDM_MAPPING

    top = DIFFUSERS_TO_LDM_MAPPING["vae"]
    if key in top:
        return top[key]
    shortcut = {"conv_shortcut": "nin_shortcut"}
    side, _, rest = key.partition(".")
    if m := re.fullmatch(r"mid_block\.(resnets|attentions)\.(\d+)\.(.+)", rest):
        part, j, tail = m.group(1), int(m.group(2)), m.group(3)
        if part == "resnets":
            return f"{side}.mid.block_{j + 1}.{_rename_first(tail, shortcut)}"
        return f"{side}.mid.attn_1.{_rename_first(tail, _VAE_ATTN)}"
    if m := re.fullmatch(r"(down|up)_blocks\.(\d+)\.(resnets|downsamplers|upsamplers)\.(\d+)\.(.+)", rest):
        kind, i, part, j, tail = m.group(1), int(m.group(2)), m.group(3), int(m.group(4)), m.group(5)
        level = i if kind == "down" else len(config["block_out_channels"]) - 1 - i
        if part == "resnets":
            return f"{side}.{kind}.{level}.block.{j}.{_rename_first(tail, shortcut)}"
        return f"{side}.{kind}.{level}.{'downsample' if kind == 'down' else 'upsample'}.{tail}"
    raise KeyError(key)


def te_key_to_ldm(key: str) -> str:
    """transformers CLIPTextModel key -> LDM key (without the prefix): the LDM layout keeps `text_model.`."""
    return key if key.startswith("text_model.") else "text_model." + key


def _plain_state_dict(model: nn.Module, what: str) -> dict[str, torch.Tensor]:
    """State dict without LoRA hosts: a fused (or empty) host's base weights under the original layer name.

    Hosts are recognised by shape (`base`, `adapters`, `fused`), not by class: models/ sits below lora/.
    """
    hosts = {name: m for name, m in model.named_modules() if all(hasattr(m, a) for a in ("base", "adapters", "fused"))}
    for name, h in hosts.items():
        if not h.fused and any(s != 0.0 for s in h.strengths.values()):
            raise SdloraError(f"cannot save the {what} with LoRAs attached but not fused ({name}); fuse them first")
    out = {}
    for key, t in model.state_dict().items():
        host = next((h for h in hosts if key.startswith(h + ".")), None)
        if host is not None:
            rest = key[len(host) + 1:]
            if not rest.startswith("base."):
                continue  # the adapters themselves
            key = f"{host}.{rest[len('base.'):]}"
        out[key] = t
    return out


def ldm_state_dict(unet: nn.Module, vae: nn.Module, text_encoder: nn.Module) -> dict[str, torch.Tensor]:
    """The three components as one LDM-layout state dict (tensors not copied; VAE attention made 1x1-conv shaped)."""
    out = {}
    try:
        for k, t in _plain_state_dict(unet, "UNet").items():
            out[UNET_PREFIX + unet_key_to_ldm(k, unet.config)] = t
        for k, t in _plain_state_dict(vae, "VAE").items():
            ldm = vae_key_to_ldm(k, vae.config)
            if ".mid.attn_1." in ldm and ldm.endswith(("q.weight", "k.weight", "v.weight", "proj_out.weight")) and t.ndim == 2:
                t = t[:, :, None, None]  # the original VAE attention uses 1x1 convs
            out[VAE_PREFIX + ldm] = t
        for k, t in _plain_state_dict(text_encoder, "text encoder").items():
            if not k.endswith("position_ids"):
                out[TE_PREFIX + te_key_to_ldm(k)] = t
    except KeyError as e:
        raise SdloraError(f"cannot write an SD1 LDM checkpoint: parameter {e} has no place in that layout") from None
    return out


def save_single_file(base: BaseModel, path: str | Path, dtype: torch.dtype = torch.float16) -> None:
    """Write `base` as one SD1.x `.safetensors` in the original LDM key layout (what A1111/ComfyUI load), atomically."""
    from safetensors.torch import save_file

    from sdlora.util import atomic_path

    path = Path(path)
    if path.suffix.lower() != ".safetensors":
        raise SdloraError(f"{path.name}: single-file bases are written as .safetensors only")
    if base.family.version != "sd_v1":
        raise SdloraError(f"only SD 1.x bases can be written as an LDM single file (this one is {base.family.version})")
    te = base.text_encoders["text_encoder"]
    state = {k: t.detach().to("cpu", dtype if t.is_floating_point() else t.dtype).contiguous()
             for k, t in ldm_state_dict(base.unet, base.vae, te).items()}
    unet_cfg, vae_cfg, te_cfg = base.unet.config, base.vae.config, te.config
    hints = {
        "unet": {k: unet_cfg[k] for k in UNET_HINTS},
        "vae": {k: vae_cfg[k] for k in VAE_HINTS},
        "text_encoder": {k: getattr(te_cfg, k) for k in TEXT_HINTS},
    }
    metadata = {"modelspec.sai_model_spec": "1.0.0", "modelspec.architecture": "stable-diffusion-v1",
                "modelspec.title": path.stem, HINTS_KEY: json.dumps(hints)}
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        save_file(state, str(tmp), metadata=metadata)
