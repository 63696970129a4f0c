"""One optimizer step of LoRA training, run eagerly or replayed from a CUDA graph.

At batch 1-4 a Stable Diffusion step is bound by Python and kernel launches, not by the GPU
(BENCHMARKS.md, issue 5). Capturing the whole step once (forward, loss, backward, clipping, fused
AdamW) and replaying it removes that cost. The eager path is the same code; it runs on the CPU,
under fp16 (whose grad scaler reads the GPU every step), with gradient accumulation, while an input
shape warms up, and as the fallback when capture fails. Under several processes both paths sum the
gradients with one all-reduce of one flat buffer (`grad_sync`), the graph path inside the graph.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from sdlora.util import torch_dtype


@dataclass
class MicroBatch:
    latents: torch.Tensor  # scaled VAE latents, on the device
    noise: torch.Tensor
    timesteps: torch.Tensor
    cond: dict[str, torch.Tensor]  # token ids per text encoder, or cached {"encoder_hidden_states": ...}
    weights: torch.Tensor | None = None  # several processes: 1 / global batch per sample (None: the batch mean)

    def tensors(self) -> list[torch.Tensor]:
        weights = [] if self.weights is None else [self.weights]
        return [self.latents, self.noise, self.timesteps, *self.cond.values(), *weights]

    def shape_key(self) -> tuple:
        return tuple((tuple(t.shape), t.dtype) for t in self.tensors())


@dataclass
class SpeedOptions:
    cuda_graph: bool = True  # replay the step from a CUDA graph where possible
    channels_last: bool = False  # NHWC activations for the UNet's convolutions
    autocast: bool = True  # False: the base runs in its own dtype (bf16), LoRA params are cast where used
    sdpa_backend: str | None = None  # None: PyTorch picks; or flash / cudnn / efficient / math
    warmup: int = 2  # eager steps per input shape before capture (optimizer state, cuDNN autotuning)
    max_graphs: int = 4  # input shapes (buckets) that get a graph; the rest run eagerly
    log: Callable[[str], None] = field(default=print, repr=False)


def prediction_error(unet, scheduler, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor, cond: dict,
                     v_prediction: bool, dtype: torch.dtype, channels_last: bool = False) -> torch.Tensor:
    """Per-example MSE between the UNet's prediction on the noised latents and its target (the noise, or the
    velocity for v-prediction models): the training loss before weighting, and the validation loss."""
    noisy = scheduler.add_noise(latents, noise, timesteps)
    target = scheduler.get_velocity(latents, noise, timesteps) if v_prediction else noise
    if channels_last:
        noisy = noisy.contiguous(memory_format=torch.channels_last)
    pred = unet(noisy.to(dtype), timesteps, **cond).sample
    return F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))


class TrainStep:
    """Calls: step(micro_batches) -> mean loss as a device tensor. Never reads the GPU back (no host sync)."""

    def __init__(self, unet: torch.nn.Module, encode: Callable[[dict], dict], scheduler, params: list[torch.Tensor],
                 optimizer, accelerator, *, mixed_precision: str, max_grad_norm: float, min_snr_gamma: float | None,
                 v_prediction: bool, speed: SpeedOptions,
                 grad_sync: Callable[[torch.Tensor], torch.Tensor] | None = None):
        self.unet, self.encode, self.scheduler, self.grad_sync = unet, encode, scheduler, grad_sync
        self.params, self.optimizer, self.accelerator = params, optimizer, accelerator
        self.max_grad_norm, self.min_snr_gamma, self.v_prediction = max_grad_norm, min_snr_gamma, v_prediction
        self.speed = speed
        self.device = next(unet.parameters()).device
        self.dtype = next(unet.parameters()).dtype
        self.amp_dtype = torch_dtype(mixed_precision) if mixed_precision in ("bf16", "fp16") else None
        if self.amp_dtype == self.dtype and not speed.autocast:
            self.amp_dtype = None  # the weights already are the compute dtype; autocast would only add casts
        self.fp16_scaler = mixed_precision == "fp16"
        scheduler.alphas_cumprod = scheduler.alphas_cumprod.to(self.device)  # indexed by timesteps on the device
        if speed.channels_last:
            unet.to(memory_format=torch.channels_last)
        self.graphs: dict[tuple, tuple[torch.cuda.CUDAGraph, MicroBatch, torch.Tensor]] = {}
        self.seen: dict[tuple, int] = {}
        self.graph_ok = speed.cuda_graph and self.device.type == "cuda" and not self.fp16_scaler
        self.side = torch.cuda.Stream(self.device) if self.graph_ok else None

    # ---- the computation, shared by both paths
    def _autocast(self, capturing: bool):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, self.amp_dtype, cache_enabled=not capturing)  # no cache in graphs

    def _attention(self):
        if not self.speed.sdpa_backend:
            return contextlib.nullcontext()
        from torch.nn.attention import SDPBackend, sdpa_kernel

        name = {"flash": "FLASH_ATTENTION", "cudnn": "CUDNN_ATTENTION", "efficient": "EFFICIENT_ATTENTION", "math": "MATH"}
        return sdpa_kernel(getattr(SDPBackend, name[self.speed.sdpa_backend]))

    def loss(self, mb: MicroBatch, capturing: bool = False) -> torch.Tensor:
        from diffusers.training_utils import compute_snr

        sched = self.scheduler
        with self._autocast(capturing), self._attention():
            loss = prediction_error(self.unet, sched, mb.latents, mb.noise, mb.timesteps, self.encode(mb.cond),
                                    self.v_prediction, self.dtype, self.speed.channels_last)
        if self.min_snr_gamma:
            snr = compute_snr(sched, mb.timesteps)
            loss = loss * snr.clamp(max=self.min_snr_gamma) / (snr + 1 if self.v_prediction else snr)
        return loss.mean() if mb.weights is None else (loss * mb.weights).sum()

    def eager(self, micro: list[MicroBatch | None]) -> torch.Tensor:
        """None: this process has no samples in that micro-batch (a bucket's short last batch)."""
        self.optimizer.zero_grad(set_to_none=True)  # after a capture, .grad still points at a graph's buffers
        total = torch.zeros((), device=self.device)
        for mb in micro:
            if mb is None:
                continue
            loss = self.loss(mb)
            self.accelerator.backward(loss / len(micro))
            total += loss.detach()
        total = total / len(micro)
        if self.grad_sync is not None:
            total = self.grad_sync(total)
        if self.max_grad_norm:
            self.accelerator.clip_grad_norm_(self.params, self.max_grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return total

    # ---- the graph path
    def __call__(self, micro: list[MicroBatch | None]) -> torch.Tensor:
        if not self.graph_ok or len(micro) != 1 or micro[0] is None or not getattr(self.grad_sync, "ready", True):
            return self.eager(micro)
        mb = micro[0]
        key = mb.shape_key()
        self.seen[key] = self.seen.get(key, 0) + 1
        if key not in self.graphs:
            if self.seen[key] <= self.speed.warmup or len(self.graphs) >= self.speed.max_graphs:
                return self._on_side_stream(micro)
            try:
                self.graphs[key] = self._capture(mb)
            except Exception as e:  # anything not capturable (a host sync in a model's code...): stay eager
                self.graph_ok = False
                first = (str(e).splitlines() or [type(e).__name__])[0][:200]
                self.speed.log(f"CUDA graph capture failed ({first}); training continues without it")
                torch.cuda.synchronize(self.device)
                return self.eager(micro)
        graph, static, loss = self.graphs[key]
        for dst, src in zip(static.tensors(), mb.tensors()):
            dst.copy_(src, non_blocking=True)
        graph.replay()
        return loss.clone()

    def _on_side_stream(self, micro: list[MicroBatch]) -> torch.Tensor:
        """Warm-up steps run on a side stream, as capture requires (lazy cuBLAS/autograd state)."""
        self.side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.side):
            loss = self.eager(micro)
        torch.cuda.current_stream(self.device).wait_stream(self.side)
        loss.record_stream(torch.cuda.current_stream(self.device))  # read later on the main stream
        return loss

    def _capture(self, mb: MicroBatch) -> tuple[torch.cuda.CUDAGraph, MicroBatch, torch.Tensor]:
        weights = None if mb.weights is None else mb.weights.clone()
        static = MicroBatch(mb.latents.clone(), mb.noise.clone(), mb.timesteps.clone(),
                            {k: v.clone() for k, v in mb.cond.items()}, weights)
        self.optimizer.zero_grad(set_to_none=True)  # backward in the graph then writes, not accumulates, .grad
        torch.cuda.synchronize(self.device)
        graph = torch.cuda.CUDAGraph()
        # with an all-reduce inside, NCCL's watchdog thread keeps querying events: only this thread must not sync
        with torch.cuda.graph(graph, capture_error_mode="thread_local" if self.grad_sync else "global"):
            loss = self.loss(static, capturing=True)
            loss.backward()
            if self.grad_sync is not None:
                loss = self.grad_sync(loss)
            if self.max_grad_norm:
                torch.nn.utils.clip_grad_norm_(self.params, self.max_grad_norm, foreach=True)
            self.optimizer.step()
            loss = loss.detach()
        return graph, static, loss


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Host -> GPU without stalling the host: a pageable copy would wait for the GPU to finish queued steps."""
    if device.type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


__all__ = ["MicroBatch", "SpeedOptions", "TrainStep", "to_device"]
