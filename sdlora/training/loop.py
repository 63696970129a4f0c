"""Training a LoRA: one function you read top to bottom. Set-up choices live in setup.py, conditioning in
conditioning.py, the step in step.py, every file a run writes in outputs.py and logbook.py, and what several
processes need (rank, sharing, the gradient sum, agreeing to stop) in dist.py."""

from __future__ import annotations

import contextlib
import dataclasses
import math
import random
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from sdlora.data.batches import draw_batch, epoch_batches, process_share
from sdlora.data.folder import scan_images
from sdlora.data.latents import encode_images
from sdlora.errors import SdloraError
from sdlora.lora.inject import inject_lora, trainable_parameters
from sdlora.models.base import load_base
from sdlora.training import dist as dist_seam
from sdlora.training.checkpoint import STATE_FILE, find_checkpoint, load_state, rng_states, set_rng_states
from sdlora.training.conditioning import Conditioning
from sdlora.training.config import TrainConfig, apply_base_defaults, validate
from sdlora.training.logbook import Logbook
from sdlora.training.outputs import Outputs, RunFacts, prepare_output
from sdlora.training.setup import (
    build_train_step,
    make_optimizer,
    pick_device,
    pick_precisions,
    place_unet,
    set_attention,
    te_lr,
    use_cuda_graph,
)
from sdlora.training.step import MicroBatch, to_device
from sdlora.training.validation import make_cases, split_items, validation_loss
from sdlora.util import info as _info
from sdlora.util import warn as _warn

LOG_EVERY = 10  # losses are read back from the GPU at least every this many steps, not every step


@dataclass
class TrainResult:
    adapter: Path
    steps: int
    last_loss: float
    interrupted: bool = False
    checkpoint: Path | None = None
    steps_per_second: float | None = None  # over the steps after the first 5 (warm-up excluded)
    peak_vram_gib: float | None = None


def train(cfg: TrainConfig, warn: Callable[[str], None] = _warn, info: Callable[[str], None] = _info) -> TrainResult:
    from accelerate import Accelerator
    from diffusers.optimization import get_scheduler

    validate(cfg)
    dist = dist_seam.current()
    info, warn = dist.main_only(info), dist.main_only(warn)
    ckpt_dir = find_checkpoint(cfg.resume) if cfg.resume else None
    state = load_state(ckpt_dir) if ckpt_dir else None
    items = scan_images(cfg.images, cfg.caption_ext, cfg.trigger, warn)  # bad folders fail before anything loads
    val_items = scan_images(cfg.validation_images, cfg.caption_ext, cfg.trigger, warn) if cfg.validation_images else []
    if cfg.validation_split and not cfg.validation_images:
        items, val_items = split_items(items, cfg.validation_split, cfg.seed)
    device = dist.device(pick_device(cfg))
    mp, weight_precision = pick_precisions(cfg, device)
    accelerator = Accelerator(mixed_precision=mp, cpu=device.type == "cpu")  # several processes: joins the group
    out = dist.on_main(lambda: prepare_output(cfg.resolved_output(), cfg.resume is not None, cfg.overwrite))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)  # the peak reported covers the whole run, caching included
    # on the host first: each part moves to the device for its phase (VAE, encoders, then the UNet: place_unet)
    base = load_base(cfg.base, weight_precision, "cpu", cfg.vae, cfg.v_prediction, cfg.zero_terminal_snr)
    cfg = apply_base_defaults(cfg, base.path)
    attention = set_attention(base, cfg.attention, warn)
    resolution = cfg.resolution or base.resolution
    cache_dir = out / "cache" if cfg.cache_latents == "disk" else None
    base.vae.to(device)
    examples = dist.interleave(encode_images(items, base.vae, resolution, cfg.buckets, cfg.center_crop, cfg.flip,
                                             cfg.seed, cache_dir, cfg.progress and dist.is_main, dist.shard))
    val_examples = []  # the main process computes the validation loss
    if val_items and dist.is_main:
        val_examples = encode_images(val_items, base.vae, resolution, cfg.buckets, True, False, cfg.seed, None, False)
    base.vae.to("cpu")  # not needed while training; frees GPU memory (sampling moves it back)
    batch_size = clamp_batch_size(cfg.batch_size, sum(e.item.repeats for e in examples), warn)
    plan = dist_seam.BatchPlan(batch_size, dist.world_size, cfg.grad_accum, cfg.scale_lr)

    te_prefixes = {p: k for p, k in base.family.te_prefixes.items() if te_lr(cfg, p) != 0}  # lr 0: no LoRA there
    unet_hosts, te_hosts = inject_lora(base.unet, base.text_encoders, te_prefixes, cfg.network(), cfg.seed,
                                       names=base.family.names)
    params = trainable_parameters(unet_hosts) + trainable_parameters(te_hosts)
    info(f"LoRA rank {cfg.rank} on {len(unet_hosts)} UNet + {len(te_hosts)} text-encoder modules "
         f"({sum(p.numel() for p in params):,} trainable parameters), attention: {attention}")
    captions = sorted({it.caption for it in items + val_items})  # every process: the main one's val_examples too
    for te in base.text_encoders.values():
        te.to(device)  # a frozen one goes back to the host once its captions are encoded
    cond = Conditioning(base, captions, cfg.sample_prompt, cfg.text_encoder and bool(te_hosts), device)
    place_unet(base, device, cfg.fp8_base, info)

    n_batches = len(epoch_batches(examples, plan.global_batch, cfg.seed, 0))
    total = cfg.steps or math.ceil(cfg.epochs * n_batches / cfg.grad_accum)
    info(plan.describe(total, sum(e.item.repeats for e in examples), cfg.unet_lr))
    te_params = {p: trainable_parameters([h for h in te_hosts if h.kohya_name.startswith(p + "_")]) for p in te_prefixes}
    optimizer = accelerator.prepare(make_optimizer(cfg, trainable_parameters(unet_hosts), te_params,
                                                   device, use_cuda_graph(cfg, device, mp), plan.lr_scale))
    lr_sched = get_scheduler(cfg.lr_scheduler, optimizer, num_warmup_steps=cfg.lr_warmup_steps, num_training_steps=total)
    step, started, ema, session, best_val = 0, time.time(), None, str(random.randrange(2**31)), math.inf
    if state is not None:
        step, started = _restore(state, params, optimizer, lr_sched, accelerator)
        ema, session, best_val = state["loss_smooth"], state["session_id"], state["best_val_loss"]
        info(f"resuming from {ckpt_dir} at step {step}")
    facts = RunFacts(base, items, examples, resolution, mp, total, n_batches, batch_size, started, session,
                     dist.world_size, plan.lr_scale)
    outputs = Outputs(cfg, out, unet_hosts + te_hosts, facts, dist.is_main)
    log = Logbook(out, total, step, progress=cfg.progress, tensorboard=cfg.tensorboard, is_main=dist.is_main,
                  warn=warn, ema=ema, agree=dist.any if dist.world_size > 1 else None)
    sched, scaling = base.noise_scheduler, base.vae.config.scaling_factor
    grad_sync = dist_seam.GradBucket(params) if dist.world_size > 1 else None
    run_step = build_train_step(base, cfg, params, optimizer, accelerator, mp, cond.encode, total, info, grad_sync)
    val_cases = make_cases(val_examples, cfg.seed, scaling, sched.config.num_train_timesteps)
    val_every = cfg.validation_every or max(1, total // 10)
    epoch_cache: dict[int, list[list[int]]] = {}

    def micro_batch(micro: int) -> MicroBatch | None:
        """This process's share of a global micro-batch; each sample's randomness comes from (seed, micro-step,
        its index in the global batch), so resuming replays it exactly and any number of processes draws alike."""
        epoch, pos = divmod(micro, n_batches)
        if epoch not in epoch_cache:
            epoch_cache.clear()
            epoch_cache[epoch] = epoch_batches(examples, plan.global_batch, cfg.seed, epoch)
        ids, first = process_share(epoch_cache[epoch][pos], batch_size, dist.rank)
        if not ids:
            return None
        batch = [examples[i] for i in ids]
        d = draw_batch(batch, first, cfg.seed, micro, scaling, sched.config.num_train_timesteps, cfg.flip,
                       cfg.noise_offset)
        weights = to_device(torch.full((len(ids),), 1 / len(epoch_cache[epoch][pos])), device) if grad_sync else None
        sizes = [ex.size_info(f) for ex, f in zip(batch, d.flips)]
        return MicroBatch(to_device(d.latents, device), to_device(d.noise, device), to_device(d.timesteps, device),
                          cond.inputs([ex.item.caption for ex in batch], sizes), weights)

    def training_state(step_now: int) -> dict:
        return {
            "step": step_now, "loss_smooth": log.ema, "session_id": session, "best_val_loss": best_val,
            "epoch": step_now * cfg.grad_accum // n_batches, "batch_in_epoch": step_now * cfg.grad_accum % n_batches,
            "started": started, "lora_params": [p.detach().cpu() for p in params],
            "optimizer": optimizer.state_dict(), "lr_scheduler": lr_sched.state_dict(),
            "scaler": accelerator.scaler.state_dict() if accelerator.scaler else {}, "rng": rng_states(),
            "config": dataclasses.asdict(cfg) | {"resume": None, "interrupt_at_step": None},
            "num_processes": dist.world_size,
        }

    t0, n0, status = None, 0, "failed"  # it/s is timed from the 6th step on, excluding warm-up
    stop = dist.interrupts(every=1 if device.type == "cpu" else LOG_EVERY)  # Ctrl-C under several processes
    try:
        while step < total:
            loss = run_step([micro_batch(step * cfg.grad_accum + k) for k in range(cfg.grad_accum)])
            lr_sched.step()
            step += 1
            log.add(step, loss, current_lr(lr_sched))
            if t0 is None and step - log.first_step >= min(5, total - log.first_step - 1):
                _sync(device)
                t0, n0 = time.perf_counter(), step
            extra = {}
            val_due = bool(val_items) and (step % val_every == 0 or step == total)  # the same on every process
            if val_due and val_cases:  # the main process's
                vl = validation_loss(val_cases, base.unet, sched, cond, base.family.v_prediction, accelerator.autocast)
                if vl < best_val:
                    best_val = vl
                    outputs.save_adapter(out / f"{cfg.name}-best.safetensors",
                                         outputs.metadata(step) | {"sdlora_validation_loss": f"{vl:.6f}"})
                extra["val_loss"] = vl
                log.message(f"step {step}: validation loss {vl:.4f} (best {best_val:.4f})")
            if val_due or step % LOG_EVERY == 0 or step == total or log.due():
                log.flush(extra)
            if cfg.save_every and step % cfg.save_every == 0 and step < total:
                log.flush()
                outputs.checkpoint(step, training_state(step))
            if cfg.sample_every and step % cfg.sample_every == 0 and step < total:
                outputs.samples(step)
            if cfg.interrupt_at_step is not None and step == cfg.interrupt_at_step:
                stop.simulate()
            if stop.agreed(step):
                raise KeyboardInterrupt
        status = "done"
    except KeyboardInterrupt:
        status = "interrupted"
        log.flush()
        with ignoring_interrupts():  # a second Ctrl-C must not tear the checkpoint being written
            folder = outputs.checkpoint(step, training_state(step), prune=False)
        info(f"interrupted at step {step}/{total}: saved {folder}; continue with: sdlora train --resume {out}")
        return TrainResult(folder / f"{cfg.name}.safetensors", step, log.last_loss, interrupted=True, checkpoint=folder)
    finally:
        stop.close()
        log.close(status)
        cond.close()

    _sync(device)
    speed = (step - n0) / (time.perf_counter() - t0) if t0 and step > n0 else None
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    path = out / f"{cfg.name}.safetensors"
    sha = outputs.save_adapter(path, outputs.metadata(step, time.time()))
    extra = (f", {speed:.2f} it/s" if speed else "") + (f", peak VRAM {peak:.2f} GiB" if peak else "")
    info(f"saved {path} (sha256 {(sha or '')[:10]}, {step} steps, last loss {log.last_loss:.4f}{extra})")
    outputs.samples(step)
    return TrainResult(path, step, log.last_loss, steps_per_second=speed, peak_vram_gib=peak)


@contextlib.contextmanager
def ignoring_interrupts() -> Iterator[None]:
    """SIGINT is ignored inside the block (main thread only; elsewhere signals cannot be set)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def clamp_batch_size(batch_size: int, n_images: int, warn: Callable[[str], None]) -> int:
    """A batch cannot hold more images than the (repeated) data set has; the file records what was used."""
    if batch_size > n_images:
        warn(f"--batch-size {batch_size} is larger than the {n_images} training images; using {n_images}")
        return n_images
    return batch_size


def resume_config(cfg_overrides: dict, resume: str, info: Callable[[str], None] = _info) -> tuple[TrainConfig, Path]:
    """The saved config of a checkpoint, with explicitly given options on top. Resumed on another number of
    processes, the per-process batch is re-cut to keep the checkpoint's global batch (and so its schedule)."""
    folder = find_checkpoint(resume)
    state = load_state(folder)
    saved = state["config"]
    values = {**saved, **cfg_overrides, "resume": str(folder)}
    if "output" not in cfg_overrides:
        values["output"] = str(folder.parent.parent)
    dist, was = dist_seam.current(), int(state.get("num_processes", 1))
    if was != dist.world_size and "batch_size" not in cfg_overrides:
        batch = dist_seam.rebatch(saved["batch_size"], was, dist.world_size)
        if batch:
            values["batch_size"] = batch
        then = f"the checkpoint was written by {was} process(es) at batch {saved['batch_size']} each; "
        now = (f"continuing on {dist.world_size} at batch {batch} each (the same global batch)" if batch else
               f"its global batch does not divide by {dist.world_size}: keeping the batch per process, so it changes")
        dist.main_only(info)(then + now)
    cfg = TrainConfig(**values)
    validate(cfg)
    return cfg, folder


def current_lr(lr_sched) -> float:
    """The UNet learning rate, computed on the host: reading a GPU-resident lr back would sync every step."""
    if hasattr(lr_sched, "lr_lambdas"):
        return lr_sched.base_lrs[0] * lr_sched.lr_lambdas[0](lr_sched.last_epoch)
    return float(lr_sched.get_last_lr()[0])


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _restore(state: dict, params: list[torch.Tensor], optimizer, lr_sched, accelerator) -> tuple[int, float]:
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


__all__ = ["train", "TrainResult", "STATE_FILE"]
