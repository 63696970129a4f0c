"""Frozen base weights stored in float8 (e4m3) and up-cast per layer for the matmul, as kohya's --fp8_base does.

Each frozen Linear/Conv2d keeps its weight as float8_e4m3fn with one fp32-derived scale per output channel
(amax / 448, so small SDXL weights do not sink into e4m3's subnormals) and computes in the input's dtype: the layer
up-casts its weight, runs the matmul/convolution and drops the copy. The backward re-casts from fp8 instead of keeping
the bf16 copy, through a custom autograd function: the input's gradient is all a frozen layer needs.

Written here rather than taken from a library: diffusers' `enable_layerwise_casting` and kohya's autocast route leave
every up-cast bf16 weight saved in autograd for the backward (most of the memory fp8 was meant to save), and torchao's
float8 weight-only tensors target inference and are built against one torch release (the GPU host runs 2.11, this
machine 2.13).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max  # 448; e4m3fn has no infinity: a value past it would become NaN, so it is clamped
KEEP = ("conv_in", "conv_out")  # 4-channel latent in/out, 0.01% of SDXL's weights; also what diffusers' .dtype reads


def dequantize(w8: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The layer's weight in `dtype`: the fp8 values times their channel's scale (in the scale's dtype, then cast)."""
    return (w8.to(scale.dtype) * scale).to(dtype)


def quantize(weight: torch.Tensor, scale_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(fp8 weight, per-output-channel scale in `scale_dtype`); quantized with the rounded scale that dequantize uses.
    fp16 would flush the small scales of small weights to zero, so under fp16 the scale stays fp32."""
    scale_dtype = torch.float32 if scale_dtype == torch.float16 else scale_dtype
    w = weight.detach().float()
    amax = w.abs().reshape(w.shape[0], -1).amax(dim=1).clamp(min=1e-12)
    scale = (amax / FP8_MAX).to(scale_dtype).reshape(-1, *[1] * (w.ndim - 1))
    return (w / scale.float()).clamp(-FP8_MAX, FP8_MAX).to(FP8), scale


class _Fp8LinearFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w8, scale, bias):
        ctx.save_for_backward(w8, scale)
        ctx.x_dtype = x.dtype
        w = dequantize(w8, scale, x.dtype)
        return F.linear(x, w, None if bias is None else bias.to(x.dtype))

    @staticmethod
    def backward(ctx, grad):
        w8, scale = ctx.saved_tensors
        gx = grad.matmul(dequantize(w8, scale, grad.dtype)).to(ctx.x_dtype) if ctx.needs_input_grad[0] else None
        return gx, None, None, None


class _Fp8ConvFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w8, scale, bias, stride, padding, dilation, groups):
        ctx.save_for_backward(w8, scale)
        ctx.conf = (x.shape, x.dtype, stride, padding, dilation, groups)
        w = dequantize(w8, scale, x.dtype)
        return F.conv2d(x, w, None if bias is None else bias.to(x.dtype), stride, padding, dilation, groups)

    @staticmethod
    def backward(ctx, grad):
        w8, scale = ctx.saved_tensors
        shape, dtype, stride, padding, dilation, groups = ctx.conf
        gx = None
        if ctx.needs_input_grad[0]:
            w = dequantize(w8, scale, grad.dtype)
            gx = torch.nn.grad.conv2d_input(shape, w, grad, stride, padding, dilation, groups).to(dtype)
        return gx, None, None, None, None, None, None, None


class Fp8Linear(nn.Linear):
    """An nn.Linear whose frozen weight is float8 (+ `fp8_scale`); still an nn.Linear for targeting and LoRA hosts."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _Fp8LinearFn.apply(x, self.weight, self.fp8_scale, self.bias)


class Fp8Conv2d(nn.Conv2d):
    """An nn.Conv2d whose frozen weight is float8 (+ `fp8_scale`)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _Fp8ConvFn.apply(x, self.weight, self.fp8_scale, self.bias, self.stride, self.padding, self.dilation,
                                self.groups)


def is_fp8(layer: nn.Module) -> bool:
    return isinstance(layer, (Fp8Linear, Fp8Conv2d))


def layer_weight(layer: nn.Module, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A layer's weight as its matmul sees it (dequantized for fp8 layers), in `dtype` or its own."""
    if is_fp8(layer):
        return dequantize(layer.weight, layer.fp8_scale, dtype or layer.compute_dtype)
    return layer.weight if dtype is None else layer.weight.to(dtype)


@torch.no_grad()
def store_fp8(model: nn.Module, device: torch.device | str | None = None) -> int:
    """Store every frozen plain Linear/Conv2d weight of `model` (but KEEP's) in fp8, layer by layer on `device` (so
    a model still on the host reaches the GPU one bf16 layer at a time). Call it before adapters are added: trainable
    layers are left alone. Returns the number of layers converted."""
    n = 0
    for name, m in model.named_modules():
        if type(m) not in (nn.Linear, nn.Conv2d) or m.weight.requires_grad or name.split(".")[-1] in KEEP:
            continue
        if isinstance(m, nn.Conv2d) and (m.padding_mode != "zeros" or isinstance(m.padding, str)):
            continue
        w = m.weight.to(device) if device is not None else m.weight
        w8, scale = quantize(w, w.dtype)
        m.weight = nn.Parameter(w8, requires_grad=False)
        m.register_buffer("fp8_scale", scale)
        m.compute_dtype = w.dtype
        if m.bias is not None and device is not None:
            m.bias = nn.Parameter(m.bias.to(device), requires_grad=False)
        m.__class__ = Fp8Linear if isinstance(m, nn.Linear) else Fp8Conv2d
        n += 1
    return n
