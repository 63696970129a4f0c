"""Loading a base model (`--base`) and describing its family.

A `BaseModel` holds the diffusers/transformers components plus a `Family` that knows the
family-specific parts: how prompts become UNet conditioning and what the LoRA key prefixes
are. The trainer and the generator only talk to these two, so SDXL (two text encoders,
pooled embeddings, time ids) or SD2-v is a new `Family`, not a second loop.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from sdlora.errors import SdloraError

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass
class Family:
    """What differs between SD generations; SD1 and SD2 share this class."""

    version: str  # kohya's ss_base_model_version: "sd_v1", "sd_v2"
    v_prediction: bool
    # LoRA key prefix -> attribute of BaseModel.text_encoders
    te_prefixes: dict[str, str] = field(default_factory=lambda: {"lora_te": "text_encoder"})

    @property
    def architecture(self) -> str:
        """modelspec architecture of a LoRA for this family."""
        if self.version == "sd_v1":
            return "stable-diffusion-v1/lora"
        return "stable-diffusion-v2-768-v/lora" if self.v_prediction else "stable-diffusion-v2-512/lora"

    def encode_prompt(self, base: BaseModel, input_ids: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Token ids -> keyword arguments for the UNet besides sample and timestep."""
        te = base.text_encoders["text_encoder"]
        hidden = te(input_ids["text_encoder"].to(te.device))[0]
        return {"encoder_hidden_states": hidden}

    def tokenize(self, base: BaseModel, prompts: list[str]) -> dict[str, torch.Tensor]:
        tok = base.tokenizers["text_encoder"]
        ids = tok(prompts, padding="max_length", max_length=tok.model_max_length, truncation=True, return_tensors="pt")
        return {"text_encoder": ids.input_ids}


@dataclass
class BaseModel:
    name: str  # what the user passed (recorded as ss_sd_model_name)
    path: Path  # the diffusers folder (or single .safetensors/.ckpt file) it was loaded from
    family: Family
    unet: nn.Module
    vae: nn.Module
    text_encoders: dict[str, nn.Module]
    tokenizers: dict[str, object]
    noise_scheduler: object  # the training (DDPM-family) scheduler
    dtype: torch.dtype

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def resolution(self) -> int:
        """Native training resolution in pixels."""
        return int(self.unet.config.sample_size) * self.vae_scale_factor

    def to(self, device: torch.device | str) -> BaseModel:
        for m in (self.unet, self.vae, *self.text_encoders.values()):
            m.to(device)
        return self

    def pipeline(self, scheduler: str | None = None):
        """A diffusers StableDiffusionPipeline sharing this base's modules (no copy, no reload)."""
        from diffusers import StableDiffusionPipeline

        pipe = StableDiffusionPipeline(
            vae=self.vae,
            text_encoder=self.text_encoders["text_encoder"],
            tokenizer=self.tokenizers["text_encoder"],
            unet=self.unet,
            scheduler=make_inference_scheduler(self.noise_scheduler.config, scheduler),
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
        pipe.set_progress_bar_config(disable=True)
        return pipe


INFERENCE_SCHEDULERS = {
    "dpm++": "DPMSolverMultistepScheduler",
    "euler": "EulerDiscreteScheduler",
    "euler-a": "EulerAncestralDiscreteScheduler",
    "ddim": "DDIMScheduler",
    "pndm": "PNDMScheduler",
}


def make_inference_scheduler(train_config, name: str | None):
    """Sampling scheduler built from the base's noise schedule (so prediction type carries over)."""
    import diffusers

    name = name or "dpm++"
    if name not in INFERENCE_SCHEDULERS:
        raise SdloraError(f"unknown scheduler '{name}'; choose one of {', '.join(INFERENCE_SCHEDULERS)}")
    return getattr(diffusers, INFERENCE_SCHEDULERS[name]).from_config(train_config)


def resolve_base_path(base: str) -> Path:
    """`tiny`, a diffusers folder, an SD1.x single file, or a hub id (from the local cache, or downloaded when online)."""
    if base == "tiny":
        from sdlora.models.tiny import tiny_base_dir

        return tiny_base_dir()
    p = Path(base).expanduser()
    if p.is_dir():
        if not (p / "model_index.json").exists():
            raise SdloraError(f"{p} is not a diffusers model folder (no model_index.json)")
        return p
    if p.suffix.lower() in {".safetensors", ".ckpt", ".pt", ".pth", ".bin"}:
        if not p.is_file():
            raise SdloraError(f"base model file not found: {p}")
        from sdlora.models.single_file import check_suffix

        check_suffix(p)  # an SD1.x single file in the original (LDM) layout, loaded by sdlora.single_file
        return p
    if p.exists():
        raise SdloraError(f"--base {base} is neither 'tiny', a diffusers folder, a .safetensors/.ckpt file nor a hub id")
    if base.count("/") != 1 or base.startswith((".", "/", "~")):
        raise SdloraError(f"base model not found: {base} (expected 'tiny', a diffusers folder or a hub id like org/name)")
    return _hub_snapshot(base)


def _hub_snapshot(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download

    patterns = ["*.json", "*.txt", "unet/*.safetensors", "vae/*.safetensors", "text_encoder/*.safetensors"]
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns, local_files_only=True))
    except Exception:
        pass
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns))
    except Exception as e:  # offline, unknown repo, gated...
        raise SdloraError(
            f"base model '{repo_id}' is not in the local Hugging Face cache and could not be downloaded "
            f"({type(e).__name__}); pass a local diffusers folder with --base PATH instead"
        ) from None


def load_base(base: str = "tiny", precision: str = "fp32", device: str | torch.device = "cpu") -> BaseModel:
    """Load every component of a base in `precision`; the VAE stays fp32 under fp16 (SD VAEs overflow)."""
    _quiet_libraries()
    if precision not in DTYPES:
        raise SdloraError(f"unknown precision '{precision}'; choose fp32, fp16 or bf16")
    dtype = DTYPES[precision]
    path = resolve_base_path(base)
    vae_dtype = torch.float32 if dtype == torch.float16 else dtype
    if path.is_file():
        from sdlora.models.single_file import load_single_file

        unet, vae, te, tok, sched = load_single_file(path, dtype, vae_dtype)
    else:
        unet, vae, te, tok, sched = _load_folder(base, path, dtype, vae_dtype)
    for m in (unet, vae, te):
        m.requires_grad_(False)
        m.eval()
    v_pred = sched.config.get("prediction_type", "epsilon") == "v_prediction"
    version = "sd_v2" if unet.config.cross_attention_dim == 1024 else "sd_v1"
    bm = BaseModel(
        name=base,
        path=path,
        family=Family(version=version, v_prediction=v_pred),
        unet=unet,
        vae=vae,
        text_encoders={"text_encoder": te},
        tokenizers={"text_encoder": tok},
        noise_scheduler=sched,
        dtype=dtype,
    )
    return bm.to(device)


def _load_folder(base: str, path: Path, dtype: torch.dtype, vae_dtype: torch.dtype) -> tuple:
    """The five components of a diffusers folder."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    index = _read_index(path)
    if "text_encoder_2" in index:
        raise SdloraError(f"{base} is an SDXL model; this version of sdlora trains SD 1.x/2.x bases")
    try:
        unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet", torch_dtype=dtype)
        vae = AutoencoderKL.from_pretrained(path, subfolder="vae", torch_dtype=vae_dtype)
        te = CLIPTextModel.from_pretrained(path, subfolder="text_encoder", torch_dtype=dtype)
        tok = CLIPTokenizer.from_pretrained(path, subfolder="tokenizer")
        sched = DDPMScheduler.from_pretrained(path, subfolder="scheduler")
    except (OSError, ValueError, KeyError) as e:
        raise SdloraError(f"could not load base model from {path}: {str(e).splitlines()[0]}") from None
    return unet, vae, te, tok, sched


def _quiet_libraries() -> None:
    """Weight-loading progress bars and info logs from the libraries would bury sdlora's own output."""
    import diffusers
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()


def _read_index(path: Path) -> dict:
    import json

    try:
        return json.loads((path / "model_index.json").read_text())
    except (OSError, ValueError) as e:
        raise SdloraError(f"unreadable model_index.json in {path}: {e}") from None
