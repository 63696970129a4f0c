"""The files a run leaves: the adapter (with its metadata), checkpoints and sample images. Main process only."""

from __future__ import annotations

import math
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from sdlora.data.folder import ImageItem, dataset_dirs, tag_frequency
from sdlora.data.latents import Example
from sdlora.errors import SdloraError
from sdlora.formats.kohya import save_adapter
from sdlora.formats.metadata import apply_dims, training_metadata
from sdlora.lora.inject import lora_weights
from sdlora.lora.layer import LoraHost
from sdlora.models.base import BaseModel
from sdlora.training.checkpoint import prune_checkpoints, save_checkpoint
from sdlora.training.config import TrainConfig
from sdlora.training.setup import te_lr
from sdlora.util import torch_dtype


def prepare_output(out: Path, resume: bool, overwrite: bool) -> Path:
    """The output folder, emptied with --overwrite; a fresh run never mixes with an old one's files."""
    if out.exists() and not out.is_dir():
        raise SdloraError(f"--output {out} is a file, not a folder; choose another --output")
    if not resume and out.exists() and any(out.iterdir()):
        if not overwrite:
            raise SdloraError(f"output folder {out} already exists and is not empty; pass --overwrite or another --output")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    for stale in (out / "checkpoints").glob(".step-*.tmp-*"):  # a save killed half-way
        shutil.rmtree(stale, ignore_errors=True)
    return out


@dataclass
class RunFacts:
    """What the metadata records about the data and the schedule, fixed once the data is prepared."""

    base: BaseModel
    items: list[ImageItem]
    examples: list[Example]
    resolution: int
    mixed_precision: str
    total: int
    n_batches: int
    batch_size: int  # per process, as used (clamped to the data)
    started: float
    session: str
    num_processes: int = 1
    lr_scale: float = 1.0  # --scale-lr's factor: the rates recorded are the rates used


class Outputs:
    def __init__(self, cfg: TrainConfig, out: Path, hosts: list[LoraHost], facts: RunFacts, is_main: bool):
        self.cfg, self.out, self.hosts, self.facts, self.is_main = cfg, out, hosts, facts, is_main

    def metadata(self, step: int, finished: float | None = None) -> dict[str, str]:
        cfg, f = self.cfg, self.facts
        spec = cfg.network()
        buckets = sorted({ex.bucket for ex in f.examples})
        meta = training_metadata(
            output_name=cfg.name, base_model_version=f.base.family.version, v_prediction=f.base.family.v_prediction,
            rank=spec.rank, alpha=spec.alpha or spec.rank, network_args=spec.network_args(),
            resolution=(f.resolution, f.resolution), unet_lr=cfg.unet_lr * f.lr_scale,
            te_lr=te_lr(cfg) * f.lr_scale if cfg.text_encoder else None, learning_rate=cfg.unet_lr * f.lr_scale,
            optimizer=cfg.optimizer, lr_scheduler=cfg.lr_scheduler,
            lr_warmup_steps=cfg.lr_warmup_steps, max_grad_norm=cfg.max_grad_norm, steps=step, max_train_steps=f.total,
            epoch=step * cfg.grad_accum // f.n_batches, num_epochs=math.ceil(f.total * cfg.grad_accum / f.n_batches),
            batch_size=f.batch_size, grad_accum=cfg.grad_accum, num_batches_per_epoch=f.n_batches,
            num_train_images=sum(it.repeats for it in f.items), seed=cfg.seed, mixed_precision=f.mixed_precision,
            gradient_checkpointing=cfg.gradient_checkpointing, noise_offset=cfg.noise_offset,
            min_snr_gamma=cfg.min_snr_gamma, flip_aug=cfg.flip, enable_bucket=cfg.buckets,
            bucket_info={"buckets": {str(i): {"resolution": list(b)} for i, b in enumerate(buckets)}},
            tag_frequency=tag_frequency(f.items), dataset_dirs=dataset_dirs(f.items), training_started_at=f.started,
            training_finished_at=finished, sd_model_name=str(cfg.base), comment=cfg.comment,
            trigger_phrase=cfg.trigger, title=cfg.name, description=cfg.description, session_id=f.session,
            cache_latents=True, zero_terminal_snr=cfg.zero_terminal_snr, fp8_base=cfg.fp8_base,
            num_processes=f.num_processes,
        )
        return meta

    def save_adapter(self, path: Path, meta: dict[str, str]) -> str | None:
        """The kohya file; its ss_network_dim/alpha are read from the modules written. Returns the file's sha256."""
        if not self.is_main:
            return None
        modules = lora_weights(self.hosts)
        apply_dims(meta, modules)
        return save_adapter(path, modules, meta, torch_dtype(self.cfg.save_dtype))

    def checkpoint(self, step: int, state: dict, prune: bool = True) -> Path:
        folder = self.out / "checkpoints" / f"step-{step:06d}"
        if self.is_main:
            meta = self.metadata(step)
            save_checkpoint(folder, state, lambda d: self.save_adapter(d / f"{self.cfg.name}.safetensors", meta))
            if prune:
                prune_checkpoints(self.out / "checkpoints", self.cfg.keep_checkpoints)
        return folder

    def samples(self, step: int) -> list[Path]:
        if not self.is_main or not self.cfg.sample_prompt:
            return []
        return render_samples(self.facts.base, self.cfg.sample_prompt, self.cfg.sample_seed, self.cfg.sample_steps,
                              self.out / "samples", step)


def render_samples(base: BaseModel, prompts: list[str], seed: int, steps: int, folder: Path, step: int) -> list[Path]:
    """Sample images with a fixed seed; training RNG state is left untouched."""
    from sdlora.sample.generate import generate_images

    folder.mkdir(parents=True, exist_ok=True)
    device = base.unet.device
    parked = [m for m in (base.vae, *base.text_encoders.values()) if m.device != device]
    for m in parked:
        m.to(device)
    paths = []
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        for i, prompt in enumerate(prompts):
            img = generate_images(base, prompt, seed=seed, steps=steps)[0]
            p = folder / f"step-{step:06d}-{i}.png"
            img.save(p)
            paths.append(p)
    for m in parked:
        m.to("cpu")
    return paths
