"""Single-file SDXL and SD 2.x checkpoints (SGM / OpenCLIP layouts): recognise, read offline, refuse clearly.

SDXL files hold `model.diffusion_model.*` (the UNet, LDM block numbering), `conditioner.embedders.0.transformer.*`
(CLIP ViT-L in transformers' layout), `conditioner.embedders.1.model.*` (OpenCLIP bigG: fused `in_proj` attention,
`text_projection` as a matrix) and `first_stage_model.*` (the VAE). SD 2.x files keep OpenCLIP-H under
`cond_stage_model.model.*`; SD2 conditions on its penultimate layer, which diffusers models by dropping the last one.
Keys are renamed by diffusers' converters (`convert_ldm_unet_checkpoint`, `convert_open_clip_checkpoint`,
`convert_ldm_clip_checkpoint`, `convert_ldm_vae_checkpoint`); configs come from tensor shapes plus the bundled SDXL
configs (sdlora/assets/sdxl) for what shapes cannot tell, or the exact values a file written by sdlora records.
Tokenizers are the bundled CLIP BPE vocabulary (OpenCLIP's pads with '!'). Nothing is downloaded or unpickled.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from sdlora.errors import SdloraError
from sdlora.models.single_file import (
    TE_PREFIX,
    TORCH_SUFFIXES,
    UNET_PREFIX,
    VAE_PREFIX,
    _assemble,
    _hints,
    _indices,
    _torch_load,
    check_suffix,
    infer_text_config,
    infer_unet_config,
    infer_vae_config,
)

if TYPE_CHECKING:
    from sdlora.models.base import Components

SDXL_TE1 = "conditioner.embedders.0.transformer."
SDXL_TE2 = "conditioner.embedders.1.model."
SD2_TE = "cond_stage_model.model."
ACCEPTS = ("sdlora loads SD 1.x, SD 2.x and SDXL checkpoints (UNet, VAE and text encoders in one .safetensors/.ckpt), "
           "diffusers folders and hub ids")
# metadata keys / marker tensors that say a checkpoint predicts v (NoobAI-style files carry `v_pred` and `ztsnr`)
V_MARKERS = ("v_pred",)
ZTSNR_MARKERS = ("ztsnr",)


# ---------------------------------------------------------------- what a file is


def classify(keys: list[str], name: str) -> str:
    """'sd1', 'sd2' or 'sdxl' for a complete base checkpoint; anything else is one line naming what it is."""
    keyset = set(keys)
    has = lambda prefix: any(k.startswith(prefix) for k in keys)  # noqa: E731
    contains = lambda part: any(part in k for k in keys)  # noqa: E731
    if any(k.startswith(("lora_unet_", "lora_te", "unet.", "text_encoder.")) or ".lora_" in k for k in keys):
        raise SdloraError(f"{name} looks like a LoRA, not a base model; pass it with --lora")
    if contains("joint_blocks."):
        raise SdloraError(f"{name} is a Stable Diffusion 3 checkpoint (MMDiT joint_blocks); {ACCEPTS}")
    if contains("double_blocks.") and contains("single_blocks."):
        raise SdloraError(f"{name} is a Flux checkpoint (double_blocks/single_blocks transformer); {ACCEPTS}")
    if "edm_mean" in keyset or "edm_vpred.sigma_max" in keyset:
        raise SdloraError(f"{name} is an EDM-schedule SDXL variant (Playground v2.5 / EDM v-pred), not trained here; "
                          f"{ACCEPTS}")
    if has("conditioner.embedders.0.model."):
        from sdlora.models.sdxl import refiner_message

        raise SdloraError(refiner_message(name))
    text = has(SDXL_TE1) or has(SDXL_TE2) or has(TE_PREFIX) or has(SD2_TE)
    if has(UNET_PREFIX) and not text and not has(VAE_PREFIX):
        raise SdloraError(f"{name} holds only a UNet (model.diffusion_model.*), no text encoder or VAE; {ACCEPTS}")
    if not has(UNET_PREFIX) and ("input_blocks.0.0.weight" in keyset or "conv_in.weight" in keyset):
        layout = "SGM" if "input_blocks.0.0.weight" in keyset else "diffusers"
        raise SdloraError(f"{name} holds only a UNet ({layout} layout, no text encoders or VAE); {ACCEPTS}")
    if has("conditioner.embedders."):
        kind, wanted = "sdxl", (UNET_PREFIX, VAE_PREFIX, SDXL_TE1, SDXL_TE2)
    elif has(SD2_TE):
        kind, wanted = "sd2", (UNET_PREFIX, VAE_PREFIX, SD2_TE)
    elif has(UNET_PREFIX) or has(TE_PREFIX):
        kind, wanted = "sd1", (UNET_PREFIX, VAE_PREFIX, TE_PREFIX)
    else:
        raise SdloraError(f"{name} is not a Stable Diffusion checkpoint (no {UNET_PREFIX}* keys); {ACCEPTS}")
    missing = [p + "*" for p in wanted if not has(p)]
    if missing:
        label = {"sd1": "SD 1.x", "sd2": "SD 2.x", "sdxl": "SDXL"}[kind]
        raise SdloraError(f"{name} is an incomplete {label} checkpoint: no {', '.join(missing)} weights; {ACCEPTS}")
    return kind


def check_complete(path: Path) -> None:
    """A download that stopped early leaves a file shorter than its header says (or a zip without its directory)."""
    size = path.stat().st_size
    if path.suffix.lower() == ".safetensors":
        with open(path, "rb") as f:
            head = f.read(9)
            n = int.from_bytes(head[:8], "little")
            raw = head[8:] + f.read(n - 1) if len(head) == 9 and head[8:] == b"{" and n < 100_000_000 else b""
        if len(head) < 9:
            raise SdloraError(f"{path.name} is cut short ({size:,} bytes): a download that stopped early? Download it again")
        if not raw:
            raise SdloraError(f"{path.name} is not a valid .safetensors file (no safetensors header)")
        if len(raw) < n:
            raise SdloraError(f"{path.name} is cut short ({size:,} bytes, not even a whole safetensors header): "
                              "a download that stopped early? Download it again")
        try:
            header = json.loads(raw)
            end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
        except (ValueError, KeyError, TypeError, UnicodeDecodeError):
            raise SdloraError(f"{path.name} is not a valid .safetensors file (unreadable header)") from None
        if 8 + n + end > size:
            raise SdloraError(f"{path.name} is incomplete: {size:,} of {8 + n + end:,} bytes "
                              "(a download that stopped early?); download it again")
    elif path.suffix.lower() in TORCH_SUFFIXES:
        import zipfile

        with open(path, "rb") as f:
            magic = f.read(4)
        if magic.startswith(b"PK") and not zipfile.is_zipfile(path):
            raise SdloraError(f"{path.name} is incomplete: a torch zip checkpoint without its end "
                              f"({size:,} bytes; a download that stopped early?); download it again")


def read_any(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str], str]:
    """(tensors, safetensors metadata, kind) of a single-file base, refusing what sdlora cannot train with one line."""
    path = Path(path)
    check_suffix(path)
    check_complete(path)
    if path.suffix.lower() == ".safetensors":
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(path), "pt") as f:
                metadata, keys = f.metadata() or {}, list(f.keys())
                kind = classify(keys, path.name)
                return {k: f.get_tensor(k) for k in keys if _wanted(k)}, metadata, kind
        except (SafetensorError, OSError) as e:
            raise SdloraError(f"{path.name} is not a valid .safetensors file ({str(e).splitlines()[0]})") from None
    state = _torch_load(path)
    return {k: v for k, v in state.items() if _wanted(k)}, {}, classify(list(state), path.name)


def _wanted(key: str) -> bool:
    """The tensors a base is built from (EMA copies, optimizer state and the like are left in the file)."""
    return key.startswith((UNET_PREFIX, VAE_PREFIX, SDXL_TE1, SDXL_TE2, SD2_TE, TE_PREFIX)) or key in V_MARKERS + ZTSNR_MARKERS


# ---------------------------------------------------------------- configs from shapes


def prediction_of(state: dict, metadata: dict[str, str]) -> str | None:
    """'v_prediction' / 'epsilon' when the file says so (marker tensors, modelspec or kohya metadata), else None."""
    if any(k in state for k in V_MARKERS) or metadata.get("modelspec.prediction_type") == "v":
        return "v_prediction"
    if metadata.get("ss_v_parameterization") in ("True", "true") or metadata.get("modelspec.architecture", "").endswith("-v"):
        return "v_prediction"
    if metadata.get("modelspec.prediction_type") == "epsilon":
        return "epsilon"
    return None


def infer_sgm_unet_config(sd: dict[str, torch.Tensor], metadata: dict[str, str], pooled_dim: int | None,
                          sample_size: int) -> dict:
    """SD1's shape reading plus what SDXL/SD2 add: per-level transformer depth, 64-channel heads, time-id embedding."""
    config = infer_unet_config(sd)
    per = config["layers_per_block"] + 1
    depths = [len(_indices(sd, rf"input_blocks\.{1 + i * per}\.1\.transformer_blocks\.(\d+)\.")) or 1
              for i in range(len(config["block_out_channels"]))]
    config["transformer_layers_per_block"] = depths
    defaults = {"attention_head_dim": [max(1, c // 64) for c in config["block_out_channels"]], "norm_num_groups": 32,
                "sample_size": sample_size}
    if "label_emb.0.0.weight" in sd:  # SDXL: pooled text embedding + 6 sinusoidal time ids
        width = sd["label_emb.0.0.weight"].shape[1]
        config |= {"addition_embed_type": "text_time", "projection_class_embeddings_input_dim": width}
        defaults["addition_time_embed_dim"] = (width - (pooled_dim or 0)) // 6
    return config | _hints(metadata, "unet", defaults)


def infer_open_clip_config(sd: dict[str, torch.Tensor], metadata: dict[str, str], part: str, drop_last: bool) -> dict:
    """CLIPTextConfig kwargs from an OpenCLIP text tower (keys without the prefix); heads of 64 channels."""
    vocab, hidden = sd["token_embedding.weight"].shape
    layers = len(_indices(sd, r"transformer\.resblocks\.(\d+)\."))
    config = {
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": sd["transformer.resblocks.0.mlp.c_fc.weight"].shape[0],
        "num_hidden_layers": layers - int(drop_last),
        "max_position_embeddings": sd["positional_embedding"].shape[0],
        "projection_dim": sd["text_projection"].shape[1] if "text_projection" in sd else hidden,
    }
    defaults = {"num_attention_heads": max(1, hidden // 64), "hidden_act": "gelu", "bos_token_id": 0,
                "eos_token_id": 2, "pad_token_id": 1}
    return config | _hints(metadata, part, defaults)


def _open_clip_text(ckpt: dict, prefix: str, config: dict, drop_last: bool, with_projection: bool, dtype, name: str):
    from diffusers.loaders.single_file_utils import convert_open_clip_checkpoint
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cls = CLIPTextModelWithProjection if with_projection else CLIPTextModel
    last = f"{prefix}transformer.resblocks.{config['num_hidden_layers']}."
    sub = {k: v for k, v in ckpt.items() if k.startswith(prefix) and not (drop_last and k.startswith(last))}
    if not with_projection:
        sub.pop(prefix + "text_projection", None)
    with torch.device("meta"):
        shell = cls(CLIPTextConfig(**config))
    state = {k: v for k, v in convert_open_clip_checkpoint(shell, sub, prefix=prefix).items()
             if not k.endswith("position_ids") and (with_projection or not k.startswith("text_projection"))}
    return _assemble(lambda: cls(CLIPTextConfig(**config)), state, dtype, "OpenCLIP text encoder", Path(name))


# ---------------------------------------------------------------- building the components


def load_checkpoint_file(path: Path, dtype: torch.dtype, vae_dtype: torch.dtype,
                         prediction_type: str | None = None) -> Components:
    """Any single-file base: SD 1.x through sdlora.models.single_file, SDXL and SD 2.x here."""
    if kind_of_file(path) == "sd1":
        from sdlora.models.single_file import load_single_file

        return load_single_file(path, dtype, vae_dtype)
    return load_sgm_file(path, dtype, vae_dtype, prediction_type)


def kind_of_file(path: Path) -> str:
    """'sd1', 'sd2' or 'sdxl' from a safetensors header alone; torch files are opened (weights only, mapped)."""
    check_suffix(path)
    check_complete(path)
    if path.suffix.lower() != ".safetensors":
        return classify(list(_torch_load(path)), path.name)
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), "pt") as f:
            return classify(list(f.keys()), path.name)
    except (SafetensorError, OSError) as e:
        raise SdloraError(f"{path.name} is not a valid .safetensors file ({str(e).splitlines()[0]})") from None


def load_sgm_file(path: str | Path, dtype: torch.dtype = torch.float32, vae_dtype: torch.dtype | None = None,
                  prediction_type: str | None = None) -> Components:
    """The components of an SDXL or SD 2.x single file, offline: unet, vae, text_encoders, tokenizers, scheduler.

    `prediction_type` (from --v-prediction) wins over what the file says; an SD2 file that says nothing is probed
    the way A1111 does (a v-prediction UNet's output at t=999 on a flat input is strongly negative)."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import (
        convert_ldm_clip_checkpoint,
        convert_ldm_unet_checkpoint,
        convert_ldm_vae_checkpoint,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from sdlora.models.base import Components
    from sdlora.models.sd1 import SD1Family
    from sdlora.models.sdxl import SDXLFamily, bundled_config, check_parts
    from sdlora.models.tiny import SCHEDULER_CONFIG, TOKENIZER_DIR

    path = Path(path)
    ckpt, metadata, kind = read_any(path)
    if kind == "sd1":
        raise SdloraError(f"{path.name} is an SD 1.x checkpoint; it loads through sdlora.models.single_file")
    strip = lambda prefix: {k[len(prefix):]: v for k, v in ckpt.items() if k.startswith(prefix)}  # noqa: E731
    sdxl = kind == "sdxl"
    te_prefix = SDXL_TE2 if sdxl else SD2_TE
    predicted = prediction_type or prediction_of(ckpt, metadata)
    try:
        te2_cfg = infer_open_clip_config(strip(te_prefix), metadata, "text_encoder_2" if sdxl else "text_encoder",
                                         drop_last=not sdxl)
        size = 128 if sdxl else (96 if predicted == "v_prediction" else 64)
        unet_cfg = infer_sgm_unet_config(strip(UNET_PREFIX), metadata, te2_cfg["projection_dim"] if sdxl else None, size)
        vae_defaults = {"norm_num_groups": 32, "sample_size": size * 8,
                        "scaling_factor": bundled_config("vae")["scaling_factor"] if sdxl else 0.18215}
        vae_cfg = infer_vae_config(strip(VAE_PREFIX)) | _hints(metadata, "vae", vae_defaults)
        te1_cfg = infer_text_config(_with_text_model(strip(SDXL_TE1)), metadata) if sdxl else None
    except (KeyError, StopIteration, IndexError, ZeroDivisionError) as e:
        raise SdloraError(f"{path.name}: unexpected {kind.upper()} checkpoint layout (cannot read its configuration: "
                          f"{e})") from None
    if unet_cfg["in_channels"] != 4:
        raise SdloraError(f"{path.name}: UNet takes {unet_cfg['in_channels']} input channels (inpainting/edit model); "
                          "only plain 4-channel bases train")
    context = te2_cfg["hidden_size"] + (te1_cfg["hidden_size"] if sdxl else 0)
    if unet_cfg["cross_attention_dim"] != context:
        raise SdloraError(f"{path.name}: UNet cross-attention width {unet_cfg['cross_attention_dim']} does not match "
                          f"the text encoders' {context}")

    unet = _assemble(lambda: UNet2DConditionModel.from_config(unet_cfg), convert_ldm_unet_checkpoint(ckpt, unet_cfg),
                     dtype, "UNet", path)
    vae = _assemble(lambda: AutoencoderKL.from_config(vae_cfg), convert_ldm_vae_checkpoint(ckpt, vae_cfg),
                    vae_dtype or dtype, "VAE", path)
    te2 = _open_clip_text(ckpt, te_prefix, te2_cfg, not sdxl, sdxl, dtype, path.name)
    tok = CLIPTokenizer.from_pretrained(TOKENIZER_DIR)
    tok_open_clip = CLIPTokenizer.from_pretrained(TOKENIZER_DIR, pad_token="!")  # OpenCLIP pads with '!' (id 0)
    if sdxl:
        te1_state = {k: v for k, v in _with_text_model(convert_ldm_clip_checkpoint(ckpt)).items()
                     if not k.endswith("position_ids")}
        te1 = _assemble(lambda: CLIPTextModel(CLIPTextConfig(**te1_cfg)), te1_state, dtype, "CLIP text encoder", path)
        text_encoders, tokenizers = {"text_encoder": te1, "text_encoder_2": te2}, {"text_encoder": tok, "text_encoder_2": tok_open_clip}
        sched_cfg = bundled_config("scheduler")
    else:
        text_encoders, tokenizers = {"text_encoder": te2}, {"text_encoder": tok_open_clip}
        sched_cfg = dict(SCHEDULER_CONFIG)
        if predicted is None:
            predicted = "v_prediction" if probe_v_prediction(unet) else "epsilon"
            if predicted == "v_prediction":  # the 768-v model's native size
                unet.register_to_config(sample_size=96)
    sched_cfg["prediction_type"] = predicted or "epsilon"
    if any(k in ckpt for k in ZTSNR_MARKERS):
        sched_cfg["rescale_betas_zero_snr"] = True
    if sdxl:
        check_parts(unet, text_encoders, path.name)
    return Components(unet, vae, text_encoders, tokenizers, DDPMScheduler.from_config(sched_cfg),
                      SDXLFamily if sdxl else SD1Family)


def _with_text_model(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Old files lack transformers' `text_model.` level under the CLIP prefix."""
    return {(k if k.startswith("text_model.") else "text_model." + k): v for k, v in sd.items()}


@torch.no_grad()
def probe_v_prediction(unet) -> bool:
    """A1111's test for SD2 files that do not say: at t=999 an epsilon UNet returns about the (flat) input, a v one
    about its negative, so the mean of output - input falls below -1 only for v-prediction."""
    dev, dt = unet.device, unet.dtype
    x = torch.full((1, 4, 8, 8), 0.5, device=dev, dtype=dt)
    cond = torch.full((1, 2, unet.config.cross_attention_dim), 0.5, device=dev, dtype=dt)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = unet(x, torch.tensor([999], device=dev), encoder_hidden_states=cond).sample
    return float((out.float() - x.float()).mean()) < -1


