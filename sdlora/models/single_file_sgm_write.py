"""Writing SDXL and SD 2.x bases as one `.safetensors` in the original layouts (what A1111 and ComfyUI load).

The inverse of the reader in single_file_sgm: the UNet and VAE reuse SD1's LDM key mapping (same block arithmetic;
SDXL adds `label_emb`), CLIP ViT-L keeps transformers' names under `conditioner.embedders.0.transformer.`, and the
OpenCLIP tower gets its fused `in_proj` attention, `ln_*`/`c_fc`/`c_proj` names and `text_projection` as a
[width, projection] matrix. diffusers ships no such writer (only one-off scripts), so this one is tested against
diffusers' own readers: `from_single_file` with the folder's configs must rebuild the same weights.
SD2's encoder is stored with the last resblock SD2 never uses appended as an identity block (zero residual branches),
so OpenCLIP-shaped consumers see their 24 layers and the penultimate output is unchanged.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from sdlora.errors import SdloraError
from sdlora.models.single_file import (
    HINTS_KEY,
    UNET_PREFIX,
    VAE_PREFIX,
    _plain_state_dict,
    te_key_to_ldm,
    unet_key_to_ldm,
    vae_key_to_ldm,
)
from sdlora.models.single_file_sgm import SD2_TE, SDXL_TE1, SDXL_TE2

if TYPE_CHECKING:
    from torch import nn

_LAYER = re.compile(r"encoder\.layers\.(\d+)\.(.+)")
_OPEN_CLIP = {"layer_norm1.": "ln_1.", "layer_norm2.": "ln_2.", "mlp.fc1.": "mlp.c_fc.", "mlp.fc2.": "mlp.c_proj.",
              "self_attn.out_proj.": "attn.out_proj."}


def open_clip_state_dict(state: dict[str, torch.Tensor], identity_layer: bool = False) -> dict[str, torch.Tensor]:
    """transformers CLIPTextModel(WithProjection) keys -> OpenCLIP text-tower keys (without the prefix)."""
    out, qkv = {}, {}
    for key, t in state.items():
        key = key.removeprefix("text_model.")
        if key.endswith("position_ids"):
            continue
        if key == "embeddings.token_embedding.weight":
            out["token_embedding.weight"] = t
        elif key == "embeddings.position_embedding.weight":
            out["positional_embedding"] = t
        elif key.startswith("final_layer_norm."):
            out["ln_final." + key.removeprefix("final_layer_norm.")] = t
        elif key == "text_projection.weight":
            out["text_projection"] = t.T.contiguous()
        elif m := _LAYER.fullmatch(key):
            i, rest = int(m.group(1)), m.group(2)
            if p := re.fullmatch(r"self_attn\.([qkv])_proj\.(weight|bias)", rest):
                qkv.setdefault((i, p.group(2)), {})[p.group(1)] = t
                continue
            old = next((o for o in _OPEN_CLIP if rest.startswith(o)), None)
            if old is None:
                raise SdloraError(f"cannot write the OpenCLIP text encoder: parameter {key} has no place in that layout")
            out[f"transformer.resblocks.{i}.{_OPEN_CLIP[old]}{rest[len(old):]}"] = t
        else:
            raise SdloraError(f"cannot write the OpenCLIP text encoder: parameter {key} has no place in that layout")
    for (i, kind), parts in qkv.items():
        out[f"transformer.resblocks.{i}.attn.in_proj_{kind}"] = torch.cat([parts["q"], parts["k"], parts["v"]])
    width = out["token_embedding.weight"].shape[1]
    out.setdefault("text_projection", torch.eye(width, dtype=out["token_embedding.weight"].dtype))
    out["logit_scale"] = torch.tensor(4.6052, dtype=out["token_embedding.weight"].dtype)  # ln(100), OpenCLIP's
    if identity_layer:
        n = 1 + max(int(k.split(".")[2]) for k in out if k.startswith("transformer.resblocks."))
        for k in [k for k in out if k.startswith("transformer.resblocks.0.")]:
            ones = k.endswith("weight") and (".ln_1." in k or ".ln_2." in k)
            out[k.replace(".resblocks.0.", f".resblocks.{n}.")] = (torch.ones_like if ones else torch.zeros_like)(out[k])
    return out


def unet_ldm_state_dict(unet: nn.Module) -> dict[str, torch.Tensor]:
    """diffusers UNet -> LDM keys (prefixed), SDXL's added-conditioning embedding included."""
    from diffusers.loaders.single_file_utils import DIFFUSERS_TO_LDM_MAPPING

    added = DIFFUSERS_TO_LDM_MAPPING["unet"]["addition_embed_type"]
    out = {}
    for k, t in _plain_state_dict(unet, "UNet").items():
        out[UNET_PREFIX + (added[k] if k in added else unet_key_to_ldm(k, unet.config))] = t
    return out


def vae_ldm_state_dict(vae: nn.Module) -> dict[str, torch.Tensor]:
    out = {}
    for k, t in _plain_state_dict(vae, "VAE").items():
        ldm = vae_key_to_ldm(k, vae.config)
        if ".mid.attn_1." in ldm and ldm.endswith(("q.weight", "k.weight", "v.weight", "proj_out.weight")) and t.ndim == 2:
            t = t[:, :, None, None]  # the original VAE attention uses 1x1 convs
        out[VAE_PREFIX + ldm] = t
    return out


def sgm_state_dict(unet: nn.Module, vae: nn.Module, text_encoders: dict[str, nn.Module]) -> dict[str, torch.Tensor]:
    """All components of an SDXL (two text encoders) or SD2 (one OpenCLIP encoder) base in the original layout."""
    try:
        out = unet_ldm_state_dict(unet) | vae_ldm_state_dict(vae)
    except KeyError as e:
        raise SdloraError(f"cannot write an LDM checkpoint: parameter {e} has no place in that layout") from None
    if "text_encoder_2" in text_encoders:
        for k, t in _plain_state_dict(text_encoders["text_encoder"], "text encoder").items():
            if not k.endswith("position_ids"):
                out[SDXL_TE1 + te_key_to_ldm(k)] = t
        te2 = _plain_state_dict(text_encoders["text_encoder_2"], "text encoder 2")
        out |= {SDXL_TE2 + k: t for k, t in open_clip_state_dict(te2).items()}
    else:
        te = _plain_state_dict(text_encoders["text_encoder"], "text encoder")
        out |= {SD2_TE + k: t for k, t in open_clip_state_dict(te, identity_layer=True).items()}
    return out


def _config_hints(unet, vae, text_encoders: dict) -> dict:
    """What the reader cannot see in the shapes, recorded so a round trip is exact."""
    cfg = lambda m, keys: {k: (list(v) if isinstance(v := m.config[k], tuple) else v) for k in keys}  # noqa: E731
    te_keys = ("num_attention_heads", "hidden_act", "bos_token_id", "eos_token_id", "pad_token_id")
    hints = {
        "unet": cfg(unet, ("attention_head_dim", "norm_num_groups", "sample_size")
                    + (("addition_time_embed_dim",) if unet.config.get("addition_embed_type") else ())),
        "vae": cfg(vae, ("norm_num_groups", "sample_size", "scaling_factor")),
    }
    for key, te in text_encoders.items():
        hints[key] = {k: getattr(te.config, k) for k in te_keys}
    return hints


def save_sgm_file(unet: nn.Module, vae: nn.Module, text_encoders: dict[str, nn.Module], path: str | Path,
                  dtype: torch.dtype = torch.float16, prediction_type: str = "epsilon",
                  zero_terminal_snr: bool = False) -> None:
    """Write an SDXL or SD 2.x base as one `.safetensors` in the original layout, atomically.

    v-prediction is recorded both as modelspec metadata and as the empty `v_pred` (and `ztsnr`) marker tensors that
    ComfyUI and the NoobAI-style checkpoints use."""
    from safetensors.torch import save_file

    from sdlora.util import atomic_path

    path = Path(path)
    if path.suffix.lower() != ".safetensors":
        raise SdloraError(f"{path.name}: single-file bases are written as .safetensors only")
    sdxl = "text_encoder_2" in text_encoders
    state = {k: t.detach().to("cpu", dtype if t.is_floating_point() else t.dtype).contiguous()
             for k, t in sgm_state_dict(unet, vae, text_encoders).items()}
    v = prediction_type == "v_prediction"
    if v:
        state["v_pred"] = torch.tensor([])
    if zero_terminal_snr:
        state["ztsnr"] = torch.tensor([])
    if sdxl:
        arch = "stable-diffusion-xl-v1-base"
    else:
        arch = "stable-diffusion-v2-768-v" if v else "stable-diffusion-v2-512"
    metadata = {"modelspec.sai_model_spec": "1.0.0", "modelspec.architecture": arch, "modelspec.title": path.stem,
                "modelspec.prediction_type": "v" if v else "epsilon",
                HINTS_KEY: json.dumps(_config_hints(unet, vae, text_encoders))}
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        save_file(state, str(tmp), metadata=metadata)
