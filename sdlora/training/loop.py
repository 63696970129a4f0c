"""Training a LoRA: set-up helpers, then one loop you can read on a screen."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import math
import random
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from sdlora.data.folder import dataset_dirs, scan_images, tag_frequency
from sdlora.data.latents import Example, encode_images, epoch_batches, sample_latents
from sdlora.errors import SdloraError
from sdlora.formats.kohya import ModuleWeights, save_adapter
from sdlora.formats.metadata import training_metadata
from sdlora.lora.layer import LoraAdapter, LoraHost
from sdlora.lora.targets import ensure_host, parse_targets, text_encoder_targets, unet_targets, uses_conv_rank
from sdlora.models.base import BaseModel, load_base
from sdlora.training.checkpoint import (
    STATE_FILE,
    find_checkpoint,
    load_state,
    prune_checkpoints,
    rng_states,
    save_checkpoint,
    set_rng_states,
)
from sdlora.training.config import TrainConfig, apply_base_defaults, validate
from sdlora.training.step import MicroBatch, SpeedOptions, TrainStep, to_device
from sdlora.training.token_rows import base_token_rows
from sdlora.training.validation import make_cases, split_items, validation_loss

TRAIN_ADAPTER = "trainee"
# --compile auto: compile only where it repays itself. Measured on an H100, SD1.5 at 512 px (BENCHMARKS.md, issue 5):
# compiling costs ~150 s per input shape and saves this many ms per step over the CUDA-graph step, by batch size.
COMPILE_SECONDS, COMPILE_SAVES_MS = 150.0, {1: 4.5, 4: 10.7, 16: 27.0}
CHANNELS_LAST_AUTO_BATCH = 4  # --channels-last auto: faster up to here, slower at 16 (BENCHMARKS.md, issue 5)
LOG_EVERY = 10  # losses are read back from the GPU every this many steps, not every step


@dataclass
class TrainResult:
    adapter: Path
    steps: int
    last_loss: float
    interrupted: bool = False
    checkpoint: Path | None = None
    steps_per_second: float | None = None  # over the steps after the first 5 (warm-up excluded)
    peak_vram_gib: float | None = None


def _warn(msg: str) -> None:
    print(f"warning: {msg}", file=sys.stderr)


def _info(msg: str) -> None:
    print(msg, file=sys.stderr)


# ---------------------------------------------------------------- set-up


def pick_device(cfg: TrainConfig) -> torch.device:
    if cfg.device:
        dev = torch.device(cfg.device)
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise SdloraError("--device cuda was asked for but no CUDA GPU is available")
        return dev
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def pick_precisions(cfg: TrainConfig, device: torch.device) -> tuple[str, str]:
    """(autocast precision, base weight precision): fp32 on CPU, bf16 on GPUs that have it."""
    mp = cfg.mixed_precision or ("bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "no")
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


def inject_lora(base: BaseModel, cfg: TrainConfig) -> tuple[list[LoraHost], list[LoraHost]]:
    """Wrap the targeted layers and add the trainable adapter; returns (unet hosts, te hosts)."""
    torch.manual_seed(cfg.seed)  # the down-matrix init is part of what the seed fixes
    groups: tuple[list[LoraHost], list[LoraHost]] = ([], [])
    targets = unet_targets(base.unet, cfg.targets)
    if cfg.text_encoder:
        for prefix, key in base.family.te_prefixes.items():
            targets += text_encoder_targets(base.text_encoders[key], prefix, cfg.te_mlp)
    for t in targets:
        host = ensure_host(t.model, t.module_path, t.kohya_name)
        layer = host.base
        conv = uses_conv_rank(layer)  # kxk convs take --conv-rank/--conv-alpha, as in kohya's LoCon
        rank, alpha = cfg.conv_dims() if conv else (cfg.rank, cfg.alpha)
        limit = min(layer.weight.shape[0], layer.weight[0].numel())
        if rank > limit:
            flag = "--conv-rank" if conv and cfg.conv_rank is not None else "--rank"
            raise SdloraError(f"{flag} {rank} is larger than layer {t.kohya_name} allows ({limit})")
        host.add(TRAIN_ADAPTER, LoraAdapter(layer, rank, alpha, cfg.lora_init).to(layer.weight.device))
        groups[int(t.is_text_encoder)].append(host)
    return groups


def lora_weights(hosts: list[LoraHost]) -> dict[str, ModuleWeights]:
    out = {}
    for h in hosts:
        a = h.adapters[TRAIN_ADAPTER]
        out[h.kohya_name] = ModuleWeights(a.down.weight.detach().float().cpu(), a.up.weight.detach().float().cpu(), a.alpha)
    return out


def make_optimizer(cfg: TrainConfig, unet_params: list, te_params: list, device: torch.device, capturable: bool = False):
    """AdamW (fused on GPUs). `capturable`: learning rates live on the GPU so a CUDA graph sees the schedule."""
    te_lr = cfg.te_lr if cfg.te_lr is not None else cfg.unet_lr / 2
    groups = [{"params": unet_params, "lr": cfg.unet_lr}]
    if te_params:
        groups.append({"params": te_params, "lr": te_lr})
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
                     total_steps: int, info: Callable[[str], None] = _info) -> TrainStep:
    """The step `sdlora train` runs; scripts/bench_train.py times this same object."""
    if cfg.gradient_checkpointing:
        base.unet.enable_gradient_checkpointing()
        base.unet.train()
        if cfg.text_encoder:
            base.text_encoders["text_encoder"].gradient_checkpointing_enable({"use_reentrant": False})
            base.text_encoders["text_encoder"].train()
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
                     v_prediction=base.family.v_prediction, speed=speed)


def step_generator(seed: int, micro_step: int) -> torch.Generator:
    """All randomness of one micro-batch comes from (seed, micro-step): resuming replays it exactly."""
    return torch.Generator().manual_seed((seed * 1_000_003 + micro_step) % (2**63))


def prepare_output(cfg: TrainConfig) -> Path:
    out = cfg.resolved_output()
    if cfg.resume is None and out.exists() and any(out.iterdir()):
        if not cfg.overwrite:
            raise SdloraError(f"output folder {out} already exists and is not empty; pass --overwrite or another --output")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    return out


def resume_config(cfg_overrides: dict, resume: str) -> tuple[TrainConfig, Path]:
    """The saved config of a checkpoint, with explicitly given options on top."""
    folder = find_checkpoint(resume)
    saved = load_state(folder)["config"]
    values = {**saved, **cfg_overrides, "resume": str(folder)}
    if "output" not in cfg_overrides:
        values["output"] = str(folder.parent.parent)
    cfg = TrainConfig(**values)
    validate(cfg)
    return cfg, folder


# ---------------------------------------------------------------- the loop


def train(cfg: TrainConfig, warn: Callable[[str], None] = _warn, info: Callable[[str], None] = _info) -> TrainResult:
    from accelerate import Accelerator
    from diffusers.optimization import get_scheduler

    validate(cfg)
    ckpt_dir = find_checkpoint(cfg.resume) if cfg.resume else None
    state = load_state(ckpt_dir) if ckpt_dir else None
    items = scan_images(cfg.images, cfg.caption_ext, cfg.trigger, warn)  # bad folders fail before anything loads
    val_items: list = []
    if cfg.validation_images:
        val_items = scan_images(cfg.validation_images, cfg.caption_ext, cfg.trigger, warn)
    elif cfg.validation_split:
        items, val_items = split_items(items, cfg.validation_split, cfg.seed)
    device = pick_device(cfg)
    mp, weight_precision = pick_precisions(cfg, device)
    out = prepare_output(cfg)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)  # the peak reported covers the whole run, caching included
    accelerator = Accelerator(mixed_precision=mp, cpu=device.type == "cpu")
    base = load_base(cfg.base, weight_precision, device)
    cfg = apply_base_defaults(cfg, base.path)
    attention = set_attention(base, cfg.attention, warn)
    resolution = cfg.resolution or base.resolution
    cache_dir = out / "cache" if cfg.cache_latents == "disk" else None
    examples = encode_images(items, base.vae, resolution, cfg.buckets, cfg.center_crop, cfg.flip, cfg.seed, cache_dir, cfg.progress)
    val_examples = encode_images(val_items, base.vae, resolution, cfg.buckets, True, False, cfg.seed, None, False) if val_items else []
    base.vae.to("cpu")  # not needed while training; frees GPU memory (sampling moves it back)

    unet_hosts, te_hosts = inject_lora(base, cfg)
    unet_params = [p for h in unet_hosts for p in h.adapters[TRAIN_ADAPTER].parameters()]
    te_params = [p for h in te_hosts for p in h.adapters[TRAIN_ADAPTER].parameters()]
    info(f"LoRA rank {cfg.rank} on {len(unet_hosts)} UNet + {len(te_hosts)} text-encoder modules "
         f"({sum(p.numel() for p in unet_params + te_params):,} trainable parameters), attention: {attention}")
    all_captions = sorted({e.item.caption for e in examples + val_examples})
    row = {c: i for i, c in enumerate(all_captions)}
    trimmed = contextlib.ExitStack()  # the token tables, trimmed while training; put back when the loop ends
    if cfg.text_encoder:  # captions are tokenized once; the text encoder (with its LoRA) runs in every step
        token_ids = base.family.tokenize(base, all_captions)
        sampled = base.family.tokenize(base, [*cfg.sample_prompt, ""])  # sample images' prompts and empty negative
        trimmed.enter_context(base_token_rows(base, {k: torch.cat([ids, sampled[k]]) for k, ids in token_ids.items()}))
        encode = functools.partial(base.family.encode_prompt, base)

        def cond_input(captions: list[str]) -> dict[str, torch.Tensor]:
            idx = torch.tensor([row[c] for c in captions])
            return {k: to_device(v[idx], device) for k, v in token_ids.items()}
    else:  # frozen text encoder: each caption is encoded once and kept on the device
        frozen = encode_captions(base, all_captions)
        cached = torch.stack([frozen[c] for c in all_captions]).to(device, base.dtype)
        for te in base.text_encoders.values():
            te.to("cpu")  # not needed again until samples are drawn: frees its GPU memory

        def encode(cond: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
            return cond

        def cond_input(captions: list[str]) -> dict[str, torch.Tensor]:
            return {"encoder_hidden_states": cached[to_device(torch.tensor([row[c] for c in captions]), device)]}

    def condition(captions: list[str]) -> dict[str, torch.Tensor]:
        return encode(cond_input(captions))

    n_batches = len(epoch_batches(examples, cfg.batch_size, cfg.seed, 0))
    total = cfg.steps or math.ceil(cfg.epochs * n_batches / cfg.grad_accum)
    capturable = use_cuda_graph(cfg, device, mp)
    optimizer = accelerator.prepare(make_optimizer(cfg, unet_params, te_params, device, capturable))
    lr_sched = get_scheduler(cfg.lr_scheduler, optimizer, num_warmup_steps=cfg.lr_warmup_steps, num_training_steps=total)
    step, started, ema, session, best_val = 0, time.time(), None, str(random.randrange(2**31)), math.inf
    if state is not None:
        step, started = _restore(state, unet_hosts + te_hosts, optimizer, lr_sched, accelerator)
        ema, session, best_val = state["loss_smooth"], state["session_id"], state["best_val_loss"]
        info(f"resuming from {ckpt_dir} at step {step}")

    sched = base.noise_scheduler
    v_pred = base.family.v_prediction
    scaling = base.vae.config.scaling_factor
    last_loss, batches_epoch, batches, first_step = float("nan"), -1, [], step
    run_step = build_train_step(base, cfg, unet_params + te_params, optimizer, accelerator, mp, encode, total, info)
    pending: list[tuple[int, torch.Tensor, float]] = []  # (step, loss on the device, lr) not yet logged

    def micro_batch(micro: int) -> MicroBatch:
        nonlocal batches, batches_epoch
        epoch, pos = divmod(micro, n_batches)
        if epoch != batches_epoch:
            batches, batches_epoch = epoch_batches(examples, cfg.batch_size, cfg.seed, epoch), epoch
        batch = [examples[i] for i in batches[pos]]
        g = step_generator(cfg.seed, micro)
        flips = torch.rand(len(batch), generator=g) < 0.5 if cfg.flip else torch.zeros(len(batch), dtype=torch.bool)
        latents = sample_latents(batch, flips, g, scaling)
        noise = torch.randn(latents.shape, generator=g)
        if cfg.noise_offset:
            noise = noise + cfg.noise_offset * torch.randn(latents.shape[:2] + (1, 1), generator=g)
        t = torch.randint(0, sched.config.num_train_timesteps, (len(batch),), generator=g)
        return MicroBatch(to_device(latents, device), to_device(noise, device), to_device(t, device),
                          cond_input([ex.item.caption for ex in batch]))

    def flush(extra: dict | None = None) -> None:
        """Log the pending steps' losses: one read-back from the GPU for many steps."""
        nonlocal ema, last_loss
        if not pending:
            return
        values = torch.stack([loss for _, loss, _ in pending]).tolist()
        for (s, _, lr), value in zip(pending, values):
            if not math.isfinite(value):
                raise SdloraError(
                    f"loss became {value} at step {s}; stopped. The last good adapter is the latest "
                    f"checkpoint in {out / 'checkpoints'}; try a lower learning rate or --mixed-precision bf16"
                )
            last_loss = value
            ema = value if ema is None else 0.95 * ema + 0.05 * value
            record = {"step": s, "loss": value, "loss_smooth": ema, "lr": lr} | (extra if s == step and extra else {})
            log.write(json.dumps(record) + "\n")
            if writer:
                for key in ("loss", "lr", "val_loss"):
                    if key in record:
                        writer.add_scalar(key, record[key], s)
        bar.set_postfix(loss=f"{ema:.4f}", lr=f"{pending[-1][2]:.2e}")
        pending.clear()

    def snapshot(folder: Path, step_now: int) -> Path:
        meta = _metadata(cfg, base, items, examples, resolution, mp, step_now, total, n_batches, started, None, session)
        state_now = {
            "step": step_now, "loss_smooth": ema, "session_id": session, "best_val_loss": best_val, "epoch": step_now * cfg.grad_accum // n_batches,
            "batch_in_epoch": step_now * cfg.grad_accum % n_batches, "started": started,
            "lora_params": [p.detach().cpu() for p in unet_params + te_params],
            "optimizer": optimizer.state_dict(), "lr_scheduler": lr_sched.state_dict(),
            "scaler": accelerator.scaler.state_dict() if accelerator.scaler else {}, "rng": rng_states(),
            "config": dataclasses.asdict(cfg) | {"resume": None, "interrupt_at_step": None},
        }
        return save_checkpoint(folder, state_now, lambda d: _save_adapter(d / f"{cfg.name}.safetensors", unet_hosts + te_hosts, meta, cfg))

    val_cases = make_cases(val_examples, cfg.seed, scaling, sched.config.num_train_timesteps)
    val_every = cfg.validation_every or max(1, total // 10)

    def validate_now(step_now: int) -> float:
        nonlocal best_val
        vl = validation_loss(val_cases, base.unet, sched, condition, v_pred, accelerator.autocast)
        if vl < best_val:
            best_val = vl
            meta = _metadata(cfg, base, items, examples, resolution, mp, step_now, total, n_batches, started, None, session)
            meta["sdlora_validation_loss"] = f"{vl:.6f}"
            _save_adapter(out / f"{cfg.name}-best.safetensors", unet_hosts + te_hosts, meta, cfg)
        return vl

    log = open(out / "train_log.jsonl", "a", encoding="utf-8")
    writer = _tensorboard(out, cfg, warn)
    t0, n0 = None, 0  # it/s is timed from the 6th step on, excluding warm-up
    bar = tqdm(total=total, initial=step, desc="training", disable=not cfg.progress, unit="step", dynamic_ncols=True)
    try:
        while step < total:
            micro = [micro_batch(step * cfg.grad_accum + k) for k in range(cfg.grad_accum)]
            loss = run_step(micro)
            lr_sched.step()
            step += 1
            pending.append((step, loss, current_lr(lr_sched)))
            # ---- bookkeeping
            if t0 is None and step - first_step >= min(5, total - first_step - 1):
                _sync(device)
                t0, n0 = time.perf_counter(), step
            bar.update(1)
            extra = {}
            if val_cases and (step % val_every == 0 or step == total):
                extra["val_loss"] = validate_now(step)
                bar.write(f"step {step}: validation loss {extra['val_loss']:.4f} (best {best_val:.4f})")
            if extra or step % LOG_EVERY == 0 or step == total:
                flush(extra)
            if cfg.save_every and step % cfg.save_every == 0 and step < total:
                flush()
                snapshot(out / "checkpoints" / f"step-{step:06d}", step)
                prune_checkpoints(out / "checkpoints", cfg.keep_checkpoints)
            if cfg.sample_prompt and cfg.sample_every and step % cfg.sample_every == 0 and step < total:
                render_samples(base, cfg, out, step)
            if cfg.interrupt_at_step is not None and step == cfg.interrupt_at_step:
                raise KeyboardInterrupt
    except KeyboardInterrupt:
        bar.close()
        flush()
        folder = snapshot(out / "checkpoints" / f"step-{step:06d}", step)
        info(f"interrupted at step {step}/{total}: saved {folder}; continue with: sdlora train --resume {out}")
        return TrainResult(folder / f"{cfg.name}.safetensors", step, last_loss, interrupted=True, checkpoint=folder)
    finally:
        bar.close()
        log.close()
        trimmed.close()
        if writer:
            writer.close()

    _sync(device)
    speed = (step - n0) / (time.perf_counter() - t0) if t0 and step > n0 else None
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    meta = _metadata(cfg, base, items, examples, resolution, mp, step, total, n_batches, started, time.time(), session)
    path = out / f"{cfg.name}.safetensors"
    sha = _save_adapter(path, unet_hosts + te_hosts, meta, cfg)
    extra = (f", {speed:.2f} it/s" if speed else "") + (f", peak VRAM {peak:.2f} GiB" if peak else "")
    info(f"saved {path} (sha256 {sha[:10]}, {step} steps, last loss {last_loss:.4f}{extra})")
    if cfg.sample_prompt:
        render_samples(base, cfg, out, step)
    return TrainResult(path, step, last_loss, steps_per_second=speed, peak_vram_gib=peak)


def current_lr(lr_sched) -> float:
    """The UNet learning rate, computed on the host: reading a GPU-resident lr back would sync every step."""
    if hasattr(lr_sched, "lr_lambdas"):
        return lr_sched.base_lrs[0] * lr_sched.lr_lambdas[0](lr_sched.last_epoch)
    return float(lr_sched.get_last_lr()[0])


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _restore(state: dict, hosts: list[LoraHost], optimizer, lr_sched, accelerator) -> tuple[int, float]:
    params = [p for h in hosts for p in h.adapters[TRAIN_ADAPTER].parameters()]
    saved = state["lora_params"]
    if len(saved) != len(params) or any(a.shape != b.shape for a, b in zip(saved, params)):
        raise SdloraError("the checkpoint's LoRA does not match this configuration (rank, targets or base changed?)")
    with torch.no_grad():
        for p, s in zip(params, saved):
            p.copy_(s)
    optimizer.load_state_dict(state["optimizer"])
    lr_sched.load_state_dict(state["lr_scheduler"])
    if accelerator.scaler and state["scaler"]:
        accelerator.scaler.load_state_dict(state["scaler"])
    set_rng_states(state["rng"])
    return int(state["step"]), float(state["started"])


@torch.no_grad()
def encode_captions(base: BaseModel, captions: list[str]) -> dict[str, torch.Tensor]:
    """Frozen text encoder: each distinct caption is encoded once."""
    out = {}
    for i in range(0, len(captions), 32):
        chunk = captions[i : i + 32]
        hidden = base.family.encode_prompt(base, base.family.tokenize(base, chunk))["encoder_hidden_states"]
        out.update({c: h.cpu() for c, h in zip(chunk, hidden)})
    return out


def _save_adapter(path: Path, hosts: list[LoraHost], meta: dict[str, str], cfg: TrainConfig) -> str:
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[cfg.save_dtype]
    return save_adapter(path, lora_weights(hosts), meta, dtype)


def _metadata(cfg, base, items, examples: list[Example], resolution, mp, step, total, n_batches, started, finished, session) -> dict[str, str]:
    te_lr = (cfg.te_lr if cfg.te_lr is not None else cfg.unet_lr / 2) if cfg.text_encoder else None
    buckets = sorted({ex.bucket for ex in examples})
    conv_rank, conv_alpha = cfg.conv_dims()
    conv_args = {"conv_dim": str(conv_rank), "conv_alpha": f"{conv_alpha:g}"} if "conv" in parse_targets(cfg.targets) else {}
    return training_metadata(
        output_name=cfg.name, base_model_version=base.family.version, v_prediction=base.family.v_prediction,
        rank=cfg.rank, alpha=cfg.alpha or cfg.rank,
        network_args={"targets": cfg.targets, "text_encoder": cfg.text_encoder, "te_mlp": cfg.te_mlp, **conv_args},
        resolution=(resolution, resolution), unet_lr=cfg.unet_lr, te_lr=te_lr, learning_rate=cfg.unet_lr,
        optimizer=cfg.optimizer, lr_scheduler=cfg.lr_scheduler, lr_warmup_steps=cfg.lr_warmup_steps,
        max_grad_norm=cfg.max_grad_norm, steps=step, max_train_steps=total,
        epoch=step * cfg.grad_accum // n_batches, num_epochs=math.ceil(total * cfg.grad_accum / n_batches),
        batch_size=cfg.batch_size, grad_accum=cfg.grad_accum, num_batches_per_epoch=n_batches,
        num_train_images=sum(it.repeats for it in items), seed=cfg.seed, mixed_precision=mp,
        gradient_checkpointing=cfg.gradient_checkpointing, noise_offset=cfg.noise_offset, min_snr_gamma=cfg.min_snr_gamma,
        flip_aug=cfg.flip, enable_bucket=cfg.buckets,
        bucket_info={"buckets": {str(i): {"resolution": list(b)} for i, b in enumerate(buckets)}},
        tag_frequency=tag_frequency(items), dataset_dirs=dataset_dirs(items), training_started_at=started,
        training_finished_at=finished, sd_model_name=str(cfg.base), comment=cfg.comment, trigger_phrase=cfg.trigger,
        title=cfg.name, description=cfg.description, session_id=session, cache_latents=True,
    )


def _tensorboard(out: Path, cfg: TrainConfig, warn):
    if not cfg.tensorboard:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        warn("--tensorboard needs the tensorboard package (pip install 'sdlora[tensorboard]'); not logging to it")
        return None
    return SummaryWriter(str(out / "logs"))


def render_samples(base: BaseModel, cfg: TrainConfig, out: Path, step: int) -> list[Path]:
    """Sample images with a fixed seed; training RNG state is left untouched."""
    from sdlora.sample.generate import generate_images

    folder = out / "samples"
    folder.mkdir(parents=True, exist_ok=True)
    device = base.unet.device
    parked = [m for m in (base.vae, *base.text_encoders.values()) if m.device != device]
    for m in parked:
        m.to(device)
    paths = []
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        for i, prompt in enumerate(cfg.sample_prompt):
            img = generate_images(base, prompt, seed=cfg.sample_seed, steps=cfg.sample_steps)[0]
            p = folder / f"step-{step:06d}-{i}.png"
            img.save(p)
            paths.append(p)
    for m in parked:
        m.to("cpu")
    return paths


__all__ = ["train", "TrainResult", "STATE_FILE"]
