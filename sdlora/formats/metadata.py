"""The metadata written into an adapter: kohya's `ss_*` keys (read by A1111, civitai and metadata viewers) plus
Stability's `modelspec.*` keys. Every value is a string, nested data compact JSON, as those consumers expect."""

from __future__ import annotations

import json
import secrets
from datetime import UTC, datetime

from sdlora import __version__
from sdlora.errors import SdloraError
from sdlora.formats.kohya import ModuleWeights

# base_model_version -> (modelspec architecture for epsilon, for v-prediction, implementation)
_DIFFUSERS = "diffusers"
_SGM = "https://github.com/Stability-AI/generative-models"
_ARCHITECTURES = {
    "sd_v1": ("stable-diffusion-v1", "stable-diffusion-v1", _DIFFUSERS),
    "sd_v2": ("stable-diffusion-v2-512", "stable-diffusion-v2-768-v", _DIFFUSERS),
    "sdxl_base_v1-0": ("stable-diffusion-xl-v1-base", "stable-diffusion-xl-v1-base", _SGM),
}


def _json(value: object) -> str:
    return json.dumps(value, separators=(",", ":"))


def modelspec_architecture(base_model_version: str, v_prediction: bool) -> tuple[str, str]:
    """(modelspec.architecture, modelspec.implementation) for a LoRA on this base, e.g. 'stable-diffusion-v1/lora'."""
    try:
        eps, v, implementation = _ARCHITECTURES[base_model_version]
    except KeyError:
        known = ", ".join(_ARCHITECTURES)
        raise SdloraError(f"unknown base model version {base_model_version!r} (expected one of {known})") from None
    return f"{v if v_prediction else eps}/lora", implementation


def training_metadata(
    *,
    output_name: str,
    base_model_version: str,
    v_prediction: bool,
    rank: int,
    alpha: float,
    network_args: dict,
    resolution: tuple[int, int],
    unet_lr: float,
    te_lr: float | None,
    learning_rate: float,
    optimizer: str,
    lr_scheduler: str,
    lr_warmup_steps: int,
    max_grad_norm: float,
    steps: int,
    max_train_steps: int,
    epoch: int,
    num_epochs: int,
    batch_size: int,
    grad_accum: int,
    num_batches_per_epoch: int,
    num_train_images: int,
    seed: int,
    mixed_precision: str,
    gradient_checkpointing: bool,
    noise_offset: float,
    min_snr_gamma: float | None,
    flip_aug: bool,
    enable_bucket: bool,
    bucket_info: dict | None,
    tag_frequency: dict,
    dataset_dirs: dict,
    training_started_at: float,
    training_finished_at: float | None,
    sd_model_name: str,
    comment: str,
    trigger_phrase: str | None,
    title: str | None,
    description: str | None,
    clip_skip: int | None = None,
    session_id: str | None = None,
    cache_latents: bool = False,
    zero_terminal_snr: bool = False,
    fp8_base: bool = False,
    num_processes: int = 1,
) -> dict[str, str]:
    """Metadata for one saved adapter. `resolution` is (width, height). `batch_size` is per process (GPU); the total
    batch is kohya's: batch x processes x gradient accumulation.

    A v-prediction base keeps its modelspec architecture (SDXL has no v variant there, as in kohya's
    sai_model_spec) and says so in `modelspec.prediction_type` "v"; SD 2.x's 768-v is the one separate name.

    `ss_*` values are `str(value)` exactly as kohya writes them (so None becomes "None" and booleans "True"/"False");
    optional `modelspec.*` keys are left out when their value is None, as sai_model_spec does.
    """
    architecture, implementation = modelspec_architecture(base_model_version, v_prediction)
    width, height = resolution
    if session_id is None:
        session_id = str(secrets.randbelow(2**32))  # kohya: a random integer shared by a run's epochs

    ss: dict[str, object] = {
        "ss_session_id": session_id,
        "ss_training_started_at": training_started_at,
        "ss_training_finished_at": training_finished_at,
        "ss_output_name": output_name,
        "ss_learning_rate": learning_rate,
        "ss_text_encoder_lr": te_lr,
        "ss_unet_lr": unet_lr,
        "ss_num_train_images": num_train_images,
        "ss_num_reg_images": 0,
        "ss_num_batches_per_epoch": num_batches_per_epoch,
        "ss_num_epochs": num_epochs,
        "ss_epoch": epoch,
        "ss_steps": steps,
        "ss_max_train_steps": max_train_steps,
        "ss_lr_warmup_steps": lr_warmup_steps,
        "ss_lr_scheduler": lr_scheduler,
        "ss_network_module": "networks.lora",
        "ss_network_dim": rank,
        "ss_network_alpha": float(alpha),
        "ss_network_args": _json(network_args),
        "ss_network_dropout": None,
        "ss_mixed_precision": mixed_precision,
        "ss_full_fp16": False,
        "ss_v2": base_model_version == "sd_v2",
        "ss_base_model_version": base_model_version,
        "ss_clip_skip": clip_skip,
        "ss_max_grad_norm": max_grad_norm,
        "ss_fp8_base": fp8_base,  # kohya: the frozen base was stored in fp8
        "ss_optimizer": optimizer,
        "ss_seed": seed,
        "ss_noise_offset": noise_offset,
        "ss_zero_terminal_snr": zero_terminal_snr,
        "ss_min_snr_gamma": min_snr_gamma,
        "ss_prior_loss_weight": 1.0,
        "ss_resolution": (width, height),
        "ss_flip_aug": flip_aug,
        "ss_enable_bucket": enable_bucket,
        "ss_bucket_info": _json(bucket_info),
        "ss_cache_latents": cache_latents,
        "ss_gradient_checkpointing": gradient_checkpointing,
        "ss_gradient_accumulation_steps": grad_accum,
        "ss_batch_size_per_device": batch_size,
        "ss_num_processes": num_processes,
        "ss_total_batch_size": batch_size * num_processes * grad_accum,
        "ss_tag_frequency": _json(tag_frequency),
        "ss_dataset_dirs": _json(dataset_dirs),
        "ss_sd_model_name": sd_model_name,
        "ss_training_comment": comment,
    }
    metadata = {key: str(value) for key, value in ss.items()}

    date = datetime.fromtimestamp(int(training_started_at), tz=UTC).isoformat()
    spec: dict[str, object | None] = {
        "modelspec.sai_model_spec": "1.0.1",
        "modelspec.architecture": architecture,
        "modelspec.implementation": implementation,
        "modelspec.implementation_version": f"sdlora {__version__}",
        "modelspec.title": title if title is not None else output_name,
        "modelspec.resolution": f"{width}x{height}",
        "modelspec.date": date,
        "modelspec.prediction_type": "v" if v_prediction else "epsilon",
        "modelspec.description": description,
        "modelspec.trigger_phrase": trigger_phrase,
        "modelspec.encoder_layer": clip_skip,
    }
    metadata.update({key: str(value) for key, value in spec.items() if value is not None})
    metadata["sdlora_version"] = __version__
    return metadata


# ---------------------------------------------------------------- dims, read from the modules written


def dim_label(values: list[float]) -> str:
    """kohya writes per-module ranks/alphas that differ as 'Dynamic'."""
    unique = set(values)
    if len(unique) != 1:
        return "Dynamic"
    v = unique.pop()
    return str(int(v)) if float(v).is_integer() else str(v)


def _is_kxk(m: ModuleWeights) -> bool:
    return m.down.dim() == 4 and tuple(m.down.shape[2:]) != (1, 1)


def rank_label(modules: dict[str, ModuleWeights]) -> str:
    """'4', or '4 (conv 8)' for a LoCon file whose kxk convs have their own rank."""
    main = dim_label([float(m.rank) for m in modules.values() if not _is_kxk(m)] or [0.0])
    conv = [float(m.rank) for m in modules.values() if _is_kxk(m)]
    return f"{main} (conv {dim_label(conv)})" if conv and dim_label(conv) != main else main


def apply_dims(meta: dict[str, str], modules: dict[str, ModuleWeights]) -> None:
    """ss_network_dim/alpha from Linear and 1x1 modules, network_args conv_dim/conv_alpha from kxk convs (kohya's split)."""
    main = [m for m in modules.values() if not _is_kxk(m)]
    conv = [m for m in modules.values() if _is_kxk(m)]
    head = main or conv
    meta["ss_network_dim"] = dim_label([float(m.rank) for m in head])
    meta["ss_network_alpha"] = dim_label([m.alpha for m in head])
    try:
        args = json.loads(meta.get("ss_network_args") or "{}")
    except json.JSONDecodeError:
        args = {}
    if not isinstance(args, dict):
        args = {}
    args.pop("conv_dim", None)
    args.pop("conv_alpha", None)
    if conv:
        args["conv_dim"] = dim_label([float(m.rank) for m in conv])
        args["conv_alpha"] = dim_label([m.alpha for m in conv])
    meta["ss_network_args"] = json.dumps(args, separators=(",", ":"))
