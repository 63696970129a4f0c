"""Set-up choices of a training run: device, precision, attention, optimizer and the speed levers of the step."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from sdlora.errors import SdloraError
from sdlora.models.base import BaseModel
from sdlora.training.config import TrainConfig
from sdlora.training.dist import launcher_mixed_precision
from sdlora.training.step import SpeedOptions, TrainStep
from sdlora.util import info as _info

# --compile auto: compile only where it repays itself. Measured on an H100, SD1.5 at 512 px (BENCHMARKS.md, issue 5):
# compiling costs ~150 s per input shape and saves this many ms per step over the CUDA-graph step, by batch size.
COMPILE_SECONDS, COMPILE_SAVES_MS = 150.0, {1: 4.5, 4: 10.7, 16: 27.0}
CHANNELS_LAST_AUTO_BATCH = 4  # --channels-last auto: faster up to here, slower at 16 (BENCHMARKS.md, issue 5)


def pick_device(cfg: TrainConfig) -> torch.device:
    if cfg.device:
        dev = torch.device(cfg.device)
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise SdloraError("--device cuda was asked for but no CUDA GPU is available")
        return dev
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def pick_precisions(cfg: TrainConfig, device: torch.device) -> tuple[str, str]:
    """(autocast precision, base weight precision): fp32 on CPU, bf16 on GPUs that have it; unset, an
    `accelerate launch --mixed_precision` (or its config file) asking for bf16/fp16 is followed."""
    mp = cfg.mixed_precision or launcher_mixed_precision()
    mp = mp or ("bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "no")
    if mp == "fp16" and device.type != "cuda":
        raise SdloraError("--mixed-precision fp16 needs a CUDA GPU; use bf16 or no on the CPU")
    weights = cfg.precision or {"no": "fp32", "bf16": "bf16", "fp16": "fp16"}[mp]
    return mp, weights


def set_attention(base: BaseModel, attention: str, warn: Callable[[str], None]) -> str:
    """SDPA is diffusers' default; xformers is optional and falls back with a message."""
    if attention != "xformers":
        return "sdpa"
    try:
        base.unet.enable_xformers_memory_efficient_attention()
        return "xformers"
    except ImportError:
        warn("xformers is not installed (pip install 'sdlora[xformers]'); using PyTorch SDPA attention")
        return "sdpa"
    except Exception as e:  # installed but built for another torch/CUDA, as PyPI's 0.0.35 is for torch 2.11
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        warn(f"xformers is installed but does not work with this torch/CUDA ({first[:160]}); using PyTorch SDPA attention")
        return "sdpa"


def place_unet(base: BaseModel, device: torch.device, fp8: bool, info: Callable[[str], None] = _info) -> None:
    """The UNet reaches the device after latents and text embeddings are cached (so the VAE's and the encoders'
    work never sits beside it in memory); with `fp8` its frozen layers are stored in float8 on the way, one layer
    at a time (sdlora/models/fp8.py)."""
    if fp8:
        from sdlora.models.fp8 import store_fp8

        before = sum(p.numel() * p.element_size() for p in base.unet.parameters())
        n = store_fp8(base.unet, device)
        after = sum(p.numel() * p.element_size() for p in base.unet.parameters())
        info(f"fp8 base: {n} UNet layers stored as float8_e4m3fn ({before / 2**30:.2f} -> {after / 2**30:.2f} GiB)")
    base.unet.to(device)


def te_lr(cfg: TrainConfig, prefix: str | None = None) -> float:
    """A text encoder's LoRA learning rate; SDXL's two may differ (--te1-lr / --te2-lr, 0 = no LoRA there)."""
    own = {"lora_te1": cfg.te1_lr, "lora_te2": cfg.te2_lr}.get(prefix or "")
    if own is not None:
        return own
    return cfg.te_lr if cfg.te_lr is not None else cfg.unet_lr / 2


def make_optimizer(cfg: TrainConfig, unet_params: list, te_params: list | dict[str, list], device: torch.device,
                   capturable: bool = False, lr_scale: float = 1.0):
    """AdamW (fused on GPUs). `capturable`: learning rates live on the GPU so a CUDA graph sees the schedule.
    `te_params` may be split by kohya prefix, one group (and learning rate) per text encoder. `lr_scale`:
    --scale-lr's factor (1 unless asked for)."""
    groups = [{"params": unet_params, "lr": cfg.unet_lr * lr_scale}]
    by_prefix = te_params if isinstance(te_params, dict) else {None: te_params}
    groups += [{"params": ps, "lr": te_lr(cfg, prefix) * lr_scale} for prefix, ps in by_prefix.items() if ps]
    if capturable:
        for g in groups:  # initial_lr stays a float, so the scheduler computes on the host and never syncs
            g["initial_lr"], g["lr"] = g["lr"], torch.tensor(g["lr"], dtype=torch.float32, device=device)
        return torch.optim.AdamW(groups, weight_decay=cfg.weight_decay, fused=True, capturable=True)
    if cfg.optimizer == "adamw8bit":
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise SdloraError("--optimizer adamw8bit needs bitsandbytes: pip install 'sdlora[bnb]'") from None
        return bnb.optim.AdamW8bit(groups, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(groups, weight_decay=cfg.weight_decay, fused=device.type == "cuda")


def use_cuda_graph(cfg: TrainConfig, device: torch.device, mp: str) -> bool:
    return cfg.cuda_graph and device.type == "cuda" and cfg.optimizer == "adamw" and cfg.grad_accum == 1 and mp != "fp16"


def compile_pays(steps: int, batch: int) -> bool:
    """Would the steps saved repay the compilation? (nearest measured batch size on a log scale)"""
    nearest = min(COMPILE_SAVES_MS, key=lambda b: abs(math.log(b / batch)))
    return steps * COMPILE_SAVES_MS[nearest] / 1000 > COMPILE_SECONDS


def build_train_step(base: BaseModel, cfg: TrainConfig, params: list, optimizer, accelerator, mp: str, encode,
                     total_steps: int, info: Callable[[str], None] = _info, grad_sync=None) -> TrainStep:
    """The step `sdlora train` runs; scripts/bench_train.py times this same object. `grad_sync`: several
    processes' gradient sum (training/dist.py's GradBucket)."""
    if cfg.gradient_checkpointing:
        base.unet.enable_gradient_checkpointing()
        base.unet.train()
        if cfg.text_encoder:
            for te in base.text_encoders.values():
                te.gradient_checkpointing_enable({"use_reentrant": False})
                te.train()
    model, device = base.unet, base.unet.device
    if cfg.sdpa_backend not in (None, "math") and device.type != "cuda":
        raise SdloraError(f"--sdpa-backend {cfg.sdpa_backend} needs a CUDA GPU; leave it unset on the CPU")
    if cfg.compile == "on" or (cfg.compile == "auto" and device.type == "cuda" and compile_pays(total_steps, cfg.batch_size)):
        info("compiling the UNet with torch.compile (takes a few minutes on the first steps)")
        torch._dynamo.config.automatic_dynamic_shapes = False  # each bucket shape gets its own static kernels
        model = torch.compile(model)  # a wrapper: validation and samples keep using the eager UNet
    nhwc = cfg.channels_last == "on" or (cfg.channels_last == "auto" and device.type == "cuda" and cfg.batch_size <= CHANNELS_LAST_AUTO_BATCH)
    speed = SpeedOptions(cuda_graph=use_cuda_graph(cfg, device, mp), channels_last=nhwc,
                         autocast=cfg.autocast_bf16_weights, sdpa_backend=cfg.sdpa_backend, log=info)
    return TrainStep(model, encode, base.noise_scheduler, params, optimizer, accelerator, mixed_precision=mp,
                     max_grad_norm=cfg.max_grad_norm, min_snr_gamma=cfg.min_snr_gamma,
                     v_prediction=base.family.v_prediction, speed=speed, grad_sync=grad_sync)
