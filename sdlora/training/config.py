"""Every training option in one dataclass: CLI flags, TOML keys and defaults come from here.

A field `min_snr_gamma` is the flag `--min-snr-gamma` and the TOML key `min_snr_gamma`
(dashes accepted too), so one grep finds where an option is declared and used.
"""

from __future__ import annotations

import difflib
import os
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sdlora.errors import SdloraError

if TYPE_CHECKING:
    from sdlora.lora.spec import NetworkSpec


def opt(default: Any, help: str, **extra: Any) -> Any:
    meta = {"help": help, **extra}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class TrainConfig:
    # data
    images: str | None = opt(None, "folder of images with same-name caption files (kohya 'N_name' subfolders repeat N times)")
    caption_ext: str = opt(".txt", "caption file extension")
    trigger: str | None = opt(None, "trigger phrase prepended to every caption and recorded in the file's metadata")
    resolution: int | None = opt(None, "training resolution in pixels (bucket area); default: the base's native size")
    buckets: bool = opt(True, "aspect-ratio bucketing (multiples of 64 around --resolution area)")
    flip: bool = opt(False, "random horizontal flip augmentation")
    center_crop: bool = opt(False, "crop to the bucket from the centre instead of a random (per-image, seeded) offset")
    cache_latents: str = opt("memory", "where VAE latents are cached: memory or disk (under the output folder)", choices=["memory", "disk"])
    # model
    base: str = opt("tiny", "base model: 'tiny', 'tiny-xl' or 'tiny-looks' (embedded), a diffusers folder (SD 1.x/2.x/SDXL), a single .safetensors/.ckpt checkpoint or a hub id")
    precision: str | None = opt(None, "dtype of the frozen base weights: fp32, fp16, bf16 (default: fp32 on CPU, bf16 on GPU)", choices=["fp32", "fp16", "bf16"])
    vae: str | None = opt(None, "a VAE to use instead of the base's: a diffusers VAE folder, hub id or .safetensors; one whose config says force_upcast false (e.g. madebyollin/sdxl-vae-fp16-fix) runs in fp16, others stay fp32 under fp16 (SDXL's VAE overflows)")
    v_prediction: bool = opt(False, "the base predicts v (NoobAI-XL v-pred, SD 2.x 768-v) though its scheduler config or file does not say so")
    fp8_base: bool = opt(False, "low-memory mode: store the frozen UNet's Linear/Conv weights in float8 (e4m3, one scale per output channel) and up-cast each layer for its matmul, as kohya's --fp8_base; LoRA parameters stay fp32 (SDXL's UNet: 4.8 -> 2.4 GiB)")
    zero_terminal_snr: bool = opt(False, "rescale the noise schedule to zero terminal SNR (what v-prediction bases such as NoobAI-XL v-pred were trained with)")
    # LoRA
    rank: int = opt(4, "LoRA rank (dim)")
    alpha: float | None = opt(None, "LoRA alpha; the update is scaled by alpha/rank (default: alpha = rank)")
    targets: str | None = opt(None, "layers, comma-separated: cross-attn (UNet attn2 q/k/v/out), attn (attn1+attn2), all-linear (kohya's full LoRA set: every Linear of the UNet's transformer blocks, proj_in/out and the text encoder's attention and MLP), conv (ResNet/resampler convs: LoCon), e.g. all-linear,conv (default: cross-attn, or the base's recommendation: all-linear on tiny)")
    conv_rank: int | None = opt(None, "rank of the LoRA on 3x3 convs (ResNet conv1/conv2, Downsample/Upsample) with --targets ...,conv (default: --rank)")
    conv_alpha: float | None = opt(None, "alpha of the 3x3 conv LoRA (default: --conv-rank when given, else --alpha)")
    text_encoder: bool = opt(True, "also train a LoRA on the CLIP text encoder's attention (and its MLP with all-linear or --te-mlp)")
    te_mlp: bool | None = opt(None, "include the text encoder's MLP (fc1/fc2) layers (default: on with all-linear, as in kohya's set; off otherwise)")
    lora_init: str = opt("kaiming", "init of the down matrix (up starts at zero)", choices=["kaiming", "gaussian"])
    # optimisation
    steps: int | None = opt(None, "optimizer steps (default 500, or the base's recommendation; unless --epochs is given)")
    epochs: int | None = opt(None, "train for this many passes over the (repeated) images instead of --steps")
    batch_size: int = opt(1, "images per step and process (GPU): an optimizer step sees batch x processes x --grad-accum")
    grad_accum: int = opt(1, "gradient accumulation steps")
    scale_lr: bool = opt(False, "multiply the learning rates by the total batch (batch x processes x --grad-accum), as diffusers' --scale_lr does; off: they are used as given")
    unet_lr: float | None = opt(None, "learning rate of the UNet LoRA (default 1e-4, or the base's recommendation: 1e-3 on tiny)")
    te_lr: float | None = opt(None, "learning rate of the text-encoder LoRA (default: --unet-lr / 2)")
    te1_lr: float | None = opt(None, "SDXL: learning rate of text encoder 1's LoRA (CLIP ViT-L, lora_te1_); 0 trains none there (default: --te-lr)")
    te2_lr: float | None = opt(None, "SDXL: learning rate of text encoder 2's LoRA (OpenCLIP bigG, lora_te2_); 0 trains none there (default: --te-lr)")
    optimizer: str = opt("adamw", "adamw, or adamw8bit (needs the bnb extra)", choices=["adamw", "adamw8bit"])
    weight_decay: float = opt(1e-2, "AdamW weight decay")
    lr_scheduler: str = opt("constant", "learning-rate schedule", choices=["constant", "cosine", "linear"])
    lr_warmup_steps: int = opt(0, "linear warm-up steps")
    max_grad_norm: float = opt(1.0, "gradient clipping norm (0 disables)")
    mixed_precision: str | None = opt(None, "autocast precision: no, fp16 (with grad scaler), bf16 (default: no on CPU, bf16 on GPU)", choices=["no", "fp16", "bf16"])
    attention: str = opt("sdpa", "attention kernel: sdpa (PyTorch) or xformers (optional extra)", choices=["sdpa", "xformers"])
    gradient_checkpointing: bool = opt(False, "trade compute for memory in the UNet and text encoder")
    # speed (GPU; see BENCHMARKS.md for what each one measured)
    cuda_graph: bool = opt(True, "on a GPU, capture the whole training step once as a CUDA graph and replay it (several times faster at batch 1-4; needs --grad-accum 1 and bf16/fp32)")
    compile: str = opt("auto", "torch.compile the UNet (GPU): on, off, or auto = on only when the run is long enough to repay ~150 s of compiling per image shape (about 35k steps at batch 1, 14k at 4, 6k at 16; a re-run on the same machine finds most of it in inductor's cache: ~20 s)", choices=["auto", "on", "off"])
    channels_last: str = opt("auto", "NHWC memory layout for the UNet's convolutions: on, off, or auto (on for GPU batches of up to 4, where it measured faster)", choices=["auto", "on", "off"])
    sdpa_backend: str | None = opt(None, "force a PyTorch attention kernel: flash, cudnn, efficient or math (default: PyTorch's choice)", choices=["flash", "cudnn", "efficient", "math"])
    noise_offset: float | None = opt(None, "noise offset: lets the LoRA shift an image's overall brightness, for very light or dark styles (default 0, or the base's recommendation: 0.3 on tiny)")
    min_snr_gamma: float | None = opt(None, "min-SNR loss weighting gamma (5 is common; default off, or the base's recommendation: 5 on tiny; 0 turns it off)")
    seed: int = opt(42, "random seed: same seed and data give the same adapter")
    # output
    output: str | None = opt(None, "output folder (default output/<name>)")
    name: str = opt("lora", "adapter file name (without .safetensors)")
    save_dtype: str = opt("fp16", "dtype of the saved adapter", choices=["fp16", "bf16", "fp32"])
    save_every: int | None = opt(None, "write a checkpoint (adapter + training state) every N steps")
    keep_checkpoints: int = opt(3, "how many step checkpoints to keep")
    resume: str | None = opt(None, "continue from a checkpoint folder (or an output folder: its latest checkpoint)")
    overwrite: bool = opt(False, "replace an existing output folder")
    comment: str = opt("", "free text stored as ss_training_comment")
    description: str | None = opt(None, "modelspec description stored in the file")
    # monitoring
    validation_split: float = opt(0.0, "hold out this fraction of the images (e.g. 0.1) to compute a validation loss")
    validation_images: str | None = opt(None, "a separate folder of captioned images for the validation loss")
    validation_every: int | None = opt(None, "validation loss every N steps (default: 10 times per run); the best adapter is kept as <name>-best.safetensors")
    sample_prompt: list[str] = opt([], "prompt to render during training (repeatable)", action="append")
    sample_every: int | None = opt(None, "render the sample prompts every N steps (and at the end)")
    sample_steps: int = opt(20, "sampling steps for sample images")
    sample_seed: int = opt(1234, "seed for sample images (fixed so samples are comparable)")
    tensorboard: bool = opt(False, "log to TensorBoard under the output folder (needs the tensorboard extra)")
    device: str | None = opt(None, "cpu, cuda, cuda:1... (default: cuda when available)")
    progress: bool = opt(True, "show a progress bar")

    # Test hook: behave as if Ctrl-C arrived right after this step (exercises the interrupt path).
    interrupt_at_step: int | None = field(default=None, metadata={"hidden": True})
    # Benchmark knob: keep autocast on even when the base weights already are the autocast dtype.
    autocast_bf16_weights: bool = field(default=False, metadata={"hidden": True})

    def network(self) -> NetworkSpec:
        """The network's shape, as injection builds it and the file's metadata records it."""
        from sdlora.lora.spec import NetworkSpec  # lazily: `sdlora --help` reads this module without torch
        from sdlora.lora.targets import parse_targets

        targets = self.targets or "cross-attn"
        te_mlp = self.te_mlp if self.te_mlp is not None else "all-linear" in parse_targets(targets)  # kohya's full set
        return NetworkSpec(self.rank, self.alpha, self.conv_rank, self.conv_alpha, targets, self.text_encoder, te_mlp,
                           self.lora_init)

    def conv_dims(self) -> tuple[int, float]:
        """(rank, alpha) of kxk conv LoRAs; without --conv-rank they behave like every other layer."""
        return self.network().conv_dims()

    def resolved_output(self) -> Path:
        return Path(self.output) if self.output else Path("output") / self.name


FIELD_NAMES = {f.name for f in fields(TrainConfig)}
HIDDEN = {f.name for f in fields(TrainConfig) if f.metadata.get("hidden")}
# Used where neither the user nor the base (its sdlora_defaults.json) chose a value.
FALLBACKS = {"unet_lr": 1e-4, "targets": "cross-attn", "steps": 500, "noise_offset": 0.0, "min_snr_gamma": None}
BASE_DEFAULTS_FILE = "sdlora_defaults.json"


def apply_base_defaults(cfg: TrainConfig, base_path: Path) -> TrainConfig:
    """Fill options left unset from the base's recommendations, then from FALLBACKS."""
    import dataclasses
    import json

    recommended = {}
    f = Path(base_path) / BASE_DEFAULTS_FILE
    if f.exists():
        recommended = {k: v for k, v in json.loads(f.read_text()).items() if k in FALLBACKS}
    values = {}
    for key, fallback in FALLBACKS.items():
        if getattr(cfg, key) is None and not (key == "steps" and cfg.epochs):
            values[key] = recommended.get(key, fallback)
    if cfg.te_mlp is None:  # all-linear is kohya's whole set: 72 text-encoder modules on SD1, not 48
        from sdlora.lora.targets import parse_targets

        values["te_mlp"] = "all-linear" in parse_targets(values.get("targets", cfg.targets))
    return dataclasses.replace(cfg, **values)


def load_toml(path: str | Path) -> dict[str, Any]:
    """Read a TOML preset; unknown keys are a one-line error with a suggestion."""
    p = Path(path)
    try:
        data = tomllib.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SdloraError(f"config file not found: {p}") from None
    except tomllib.TOMLDecodeError as e:
        raise SdloraError(f"invalid TOML in {p}: {e}") from None
    out = {}
    for key, value in _flatten(data).items():
        name = key.replace("-", "_")
        if name not in FIELD_NAMES or name in HIDDEN:
            close = difflib.get_close_matches(name, sorted(FIELD_NAMES - HIDDEN), n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise SdloraError(f"unknown option '{key}' in {p}{hint}")
        if name == "sample_prompt" and isinstance(value, str):
            value = [value]  # one prompt may be written as a plain string
        out[name] = value
    return out


def _flatten(data: dict[str, Any]) -> dict[str, Any]:
    """Tables are only for grouping in presets ([lora], [data]...): their keys are options."""
    out = {}
    for k, v in data.items():
        if isinstance(v, dict):
            out.update(_flatten(v))
        else:
            out[k] = v
    return out


def make_config(toml_path: str | Path | None = None, **overrides: Any) -> TrainConfig:
    """Defaults < TOML file < explicit overrides (the command line)."""
    values = load_toml(toml_path) if toml_path else {}
    values.update({k: v for k, v in overrides.items()})
    unknown = set(values) - FIELD_NAMES
    if unknown:
        raise SdloraError(f"unknown option(s): {', '.join(sorted(unknown))}")
    cfg = TrainConfig(**values)
    validate(cfg)
    return cfg


def _check_type(f, value: Any) -> None:
    """TOML values arrive untyped: a wrong type is a one-line error here, not a TypeError later."""
    kind = str(f.type).replace(" | None", "").replace("typing.", "")
    if value is None:
        if "None" not in str(f.type):
            raise SdloraError(f"{f.name} must not be empty")
        return
    if kind == "bool":
        ok, want = isinstance(value, bool), "true or false"
    elif kind == "int":
        ok, want = isinstance(value, int) and not isinstance(value, bool), "a whole number"
    elif kind == "float":
        ok, want = isinstance(value, (int, float)) and not isinstance(value, bool), "a number"
    elif kind == "str":
        ok, want = isinstance(value, (str, os.PathLike)), "a string"
    elif kind == "list[str]":
        ok, want = isinstance(value, list) and all(isinstance(v, str) for v in value), "a list of strings"
    else:
        return
    if not ok:
        raise SdloraError(f"{f.name} must be {want}, not {value!r}")


def validate(cfg: TrainConfig) -> None:
    for f in fields(TrainConfig):
        choices = f.metadata.get("choices")
        value = getattr(cfg, f.name)
        _check_type(f, value)
        if choices and value is not None and value not in choices:
            raise SdloraError(f"invalid {f.name} '{value}': choose one of {', '.join(choices)}")
    from sdlora.lora.targets import parse_targets  # lazy: keeps torch out of `sdlora --help`

    presets = parse_targets(cfg.targets or "cross-attn")
    if (cfg.conv_rank is not None or cfg.conv_alpha is not None) and "conv" not in presets:
        raise SdloraError("--conv-rank/--conv-alpha need conv in --targets, e.g. --targets cross-attn,conv")
    if cfg.conv_rank is not None and cfg.conv_rank < 1:
        raise SdloraError("--conv-rank must be at least 1")
    if cfg.images is None and cfg.resume is None:
        raise SdloraError("no images: pass --images DIR (a folder of images with .txt captions)")
    for name in ("rank", "batch_size", "grad_accum"):
        if getattr(cfg, name) < 1:
            raise SdloraError(f"--{name.replace('_', '-')} must be at least 1")
    if cfg.steps is not None and cfg.steps < 1:
        raise SdloraError("--steps must be at least 1")
    if cfg.epochs is not None and cfg.epochs < 1:
        raise SdloraError("--epochs must be at least 1")
    if cfg.steps is not None and cfg.epochs is not None:
        raise SdloraError("give --steps or --epochs, not both")
    if cfg.resolution is not None and (cfg.resolution < 64 or cfg.resolution % 64):
        raise SdloraError("--resolution must be a multiple of 64 (at least 64)")
    if (cfg.unet_lr is not None and cfg.unet_lr <= 0) or (cfg.te_lr is not None and cfg.te_lr < 0):
        raise SdloraError("learning rates must be positive")
