"""The LoRA layer: a frozen Linear/Conv2d plus any number of low-rank adapters at strengths.

Written by hand rather than with peft because one host must fold several adapters, each at
its own UNet/text-encoder strength, into a single update (peft applies adapters one after
another), and keys must follow the kohya layout exactly.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn


def compose_lora(up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """up @ down (unscaled) in the layer weight's layout: [out, in], or [out, in, k, k] for a conv (kxk down, 1x1 up)."""
    if down.dim() == 2:
        return up.flatten(1) @ down
    if down.shape[2:] == (1, 1):
        return (up.flatten(1) @ down.flatten(1)).reshape(up.shape[0], down.shape[1], 1, 1)
    return torch.einsum("or,rikl->oikl", up.flatten(1), down)  # kxk down then 1x1 up: compose the kernels


class LoraAdapter(nn.Module):
    """down/up pair of one LoRA on one layer. Parameters stay fp32 whatever the base dtype."""

    def __init__(self, base: nn.Module, rank: int, alpha: float | None = None, init: str = "kaiming"):
        super().__init__()
        if isinstance(base, nn.Linear):
            self.down = nn.Linear(base.in_features, rank, bias=False)
            self.up = nn.Linear(rank, base.out_features, bias=False)
        elif isinstance(base, nn.Conv2d):
            self.down = nn.Conv2d(base.in_channels, rank, base.kernel_size, base.stride, base.padding, bias=False)
            self.up = nn.Conv2d(rank, base.out_channels, 1, bias=False)
        else:
            raise TypeError(f"LoRA supports Linear and Conv2d, not {type(base).__name__}")
        self.rank = rank
        self.alpha = float(alpha if alpha else rank)  # kohya: alpha 0 or missing means alpha = rank
        if init == "gaussian":
            nn.init.normal_(self.down.weight, std=1.0 / rank)
        else:
            nn.init.kaiming_uniform_(self.down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.up.weight)  # the base is reproduced exactly at step 0

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = self.down.weight.dtype
        return self.up(self.down(x.to(dtype))) * self.scale

    def delta_weight(self) -> torch.Tensor:
        """The update this adapter adds to the base weight, in the base weight's shape."""
        return compose_lora(self.up.weight, self.down.weight) * self.scale


class DeltaAdapter(nn.Module):
    """A full weight update ΔW (LoHa, LoKr, DoRA, .diff...) on one layer: adds F.linear/F.conv2d(x, ΔW).

    ΔW is given as a tensor or as a function of the base weight (DoRA needs it); the function runs once, on first
    use, against the unfused base weight, and its fp32 result is kept as a non-persistent buffer.
    """

    def __init__(self, base: nn.Module, delta: torch.Tensor | Callable[[torch.Tensor], torch.Tensor]):
        super().__init__()
        if not isinstance(base, (nn.Linear, nn.Conv2d)):
            raise TypeError(f"a weight delta applies to Linear and Conv2d, not {type(base).__name__}")
        self._base = [base]  # a list, so the base is not registered (and moved, saved) twice
        self._compute = delta if callable(delta) else None
        self.register_buffer("delta", None if callable(delta) else delta.detach().float().reshape(base.weight.shape),
                             persistent=False)

    def delta_weight(self) -> torch.Tensor:
        """ΔW in the base weight's shape, fp32."""
        if self.delta is None:
            w = self._base[0].weight
            self.delta = self._compute(w.detach()).to(w.device, torch.float32).reshape(w.shape)
        return self.delta

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dw = self.delta_weight()
        base = self._base[0]
        x = x.to(dw.dtype)
        if isinstance(base, nn.Linear):
            return F.linear(x, dw)
        return F.conv2d(x, dw, None, base.stride, base.padding, base.dilation, base.groups)


class LoraHost(nn.Module):
    """Replaces a targeted layer; `base` keeps the original weights untouched unless fused."""

    def __init__(self, base: nn.Module, kohya_name: str):
        super().__init__()
        self.base = base
        self.kohya_name = kohya_name
        self.adapters = nn.ModuleDict()
        self.strengths: dict[str, float] = {}
        self._backup: torch.Tensor | None = None  # original weight while fused

    def add(self, name: str, adapter: LoraAdapter | DeltaAdapter, strength: float = 1.0) -> None:
        self.adapters[name] = adapter.to(self.base.weight.device)
        self.strengths[name] = float(strength)

    def remove(self, name: str) -> None:
        if self.fused:
            raise RuntimeError("unfuse before removing an adapter")
        del self.adapters[name]
        self.strengths.pop(name)

    @property
    def fused(self) -> bool:
        return self._backup is not None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        if self.fused:
            return y
        for name, adapter in self.adapters.items():
            s = self.strengths[name]
            if s != 0.0:  # strength 0 skips the adapter so the output is the base bit-for-bit
                y = y + (adapter(x) * s).to(y.dtype)
        return y

    @torch.no_grad()
    def fuse(self) -> None:
        """Fold every active adapter into the weight; the original is kept so unfuse is exact."""
        if self.fused:
            return
        w = self.base.weight
        delta = sum(
            (a.delta_weight() * self.strengths[n] for n, a in self.adapters.items() if self.strengths[n] != 0.0),
            torch.zeros((), device=w.device),
        )
        self._backup = w.detach().clone()
        w.copy_((w.float() + delta).to(w.dtype))

    @torch.no_grad()
    def unfuse(self) -> None:
        if self._backup is not None:
            self.base.weight.copy_(self._backup)
            self._backup = None


def iter_hosts(model: nn.Module):
    for m in model.modules():
        if isinstance(m, LoraHost):
            yield m
