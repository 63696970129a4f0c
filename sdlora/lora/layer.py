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

from sdlora.errors import SdloraError
from sdlora.formats.deltas import compose_lora
from sdlora.models.fp8 import is_fp8, layer_weight

_structure_version = [0]


def structure_version() -> int:
    """Changes whenever some host's forward would launch different kernels (adapters added or removed, fused,
    unfused, a strength baked into a kernel changed). A captured CUDA graph of an older version is stale."""
    return _structure_version[0]


def _bump() -> None:
    _structure_version[0] += 1


def add_low_rank(y: torch.Tensor, x: torch.Tensor, down: torch.Tensor, up: torch.Tensor, scale: float) -> torch.Tensor:
    """y + scale * x @ down.T @ up.T for a Linear layer, with the scale and the sum folded into one addmm.

    Fewer, larger kernels matter here: at batch 1 a LoRA step is bound by kernel launches, and the naive
    form (cast x, two matmuls, two scalings, a cast, an add) costs 7 launches per layer instead of 3.
    """
    h = F.linear(x, down.to(x.dtype))
    out = torch.addmm(y.reshape(-1, y.shape[-1]), h.reshape(-1, h.shape[-1]), up.to(x.dtype).t(), alpha=scale)
    return out.view(y.shape)


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
            w = layer_weight(self._base[0])
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

    # Inference with frozen adapters: None = on GPUs, keep one merged copy of the weight (W + sum s*dW) and run
    # the layer once, as fast as no LoRA (the base weight itself stays untouched); False = add the adapters'
    # low-rank products (less memory: the CPU default). Tests set True to check the GPU path on the CPU.
    merged_inference: bool | None = None

    def __init__(self, base: nn.Module, kohya_name: str):
        super().__init__()
        self.base = base
        self.kohya_name = kohya_name
        self.adapters = nn.ModuleDict()
        self.strengths: dict[str, float] = {}
        self._backup: torch.Tensor | None = None  # original weight while fused
        # Inference caches, reset by add/remove/fuse; frozen adapters' weights are not edited in place (the mixer
        # copies them in before add), so strengths are all that can change under them, and set_strength updates
        # both in place (so CUDA graphs that read them stay valid).
        self._stacked: tuple | None = None  # ((dtype, device), (down, up)): all LoRAs as one low-rank pair
        self._merged: torch.Tensor | None = None  # W + sum s*dW in W's dtype
        self._batchable = False

    def _reset(self) -> None:
        self._stacked = self._merged = None
        # refresh_merged may recompute this host's merged copy with others: a plain Linear, frozen LoRA pairs only
        self._batchable = isinstance(self.base, nn.Linear) and not is_fp8(self.base) and all(
            isinstance(a, LoraAdapter) and not any(p.requires_grad for p in a.parameters()) for a in self.adapters.values())
        _bump()

    def add(self, name: str, adapter: LoraAdapter | DeltaAdapter, strength: float = 1.0) -> None:
        self.adapters[name] = adapter.to(self.base.weight.device)
        self.strengths[name] = float(strength)
        self._reset()

    def set_strength(self, name: str, strength: float, batch: list[LoraHost] | None = None) -> None:
        """Updates the inference caches in place when it can, so captured CUDA graphs stay valid. With `batch`, a
        merged copy that refresh_merged can recompute together with others is left to it (appended to batch)."""
        if batch is not None and self._batchable and self._merged is not None:  # the fast path: no module walks
            self.strengths[name] = float(strength)
            batch.append(self)
            return
        was_active = any(self.strengths.values())
        self.strengths[name] = float(strength)
        stacked = self._stacked[1] if self._stacked is not None else None
        pure = all(isinstance(a, LoraAdapter) for a in self.adapters.values())
        if self._trainable():
            self._reset()
        elif self._merged is not None:
            self._merged.copy_(self._merged_weight())
        elif stacked is not None and pure and was_active == any(self.strengths.values()):
            stacked[1].copy_(self._stack(stacked[1].dtype, up_only=True)[1])
        else:  # a strength is baked into a kernel (or nothing is cached yet): rebuild
            self._reset()

    def remove(self, name: str) -> None:
        if self.fused:
            raise RuntimeError("unfuse before removing an adapter")
        del self.adapters[name]
        self.strengths.pop(name)
        self._reset()

    def _trainable(self) -> bool:
        """Adapters being trained change in place, so an inference copy would go stale."""
        return any(p.requires_grad for a in self.adapters.values() for p in a.parameters())

    @property
    def fused(self) -> bool:
        return self._backup is not None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused or not self.adapters:
            return self.base(x)
        frozen = not torch.is_grad_enabled() and not self._trainable()
        merge = self.merged_inference if self.merged_inference is not None else x.is_cuda
        if frozen and merge:
            return self._merged_forward(x)
        y = self.base(x)
        linear = isinstance(self.base, nn.Linear)
        if linear and frozen:
            return self._frozen_linear(x, y)
        for name, adapter in self.adapters.items():
            s = self.strengths[name]
            if s == 0.0:  # strength 0 skips the adapter so the output is the base bit-for-bit
                continue
            if linear and isinstance(adapter, LoraAdapter):
                y = add_low_rank(y, x, adapter.down.weight, adapter.up.weight, adapter.scale * s)
            else:
                y = y + (adapter(x) * s).to(y.dtype)
        return y

    @torch.no_grad()
    def _merged_weight(self) -> torch.Tensor:
        """W + sum s*dW in W's dtype: what fuse writes, and the GPU inference copy."""
        w = layer_weight(self.base)  # an fp8-stored weight in its compute dtype
        delta = sum((a.delta_weight() * s for n, a in self.adapters.items() if (s := self.strengths[n]) != 0.0),
                    torch.zeros((), device=w.device))
        return (w.float() + delta).to(w.dtype)

    def _merged_forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._merged is None or self._merged.device != self.base.weight.device:
            self._merged = self._merged_weight()
        b = self.base
        if isinstance(b, nn.Linear):
            return F.linear(x, self._merged, b.bias)
        return F.conv2d(x, self._merged, b.bias, b.stride, b.padding, b.dilation, b.groups)

    def _stack(self, dtype: torch.dtype, up_only: bool = False) -> tuple[torch.Tensor | None, torch.Tensor] | None:
        """Every LoRA of this layer as one low-rank pair, strengths folded into up (zero strengths add exact zeros)."""
        lora = [(a, self.strengths[n]) for n, a in self.adapters.items() if isinstance(a, LoraAdapter)]
        if not lora or not any(s for _, s in lora):
            return None
        downs = None if up_only else torch.cat([a.down.weight for a, _ in lora]).to(dtype)
        return downs, torch.cat([a.up.weight * (a.scale * s) for a, s in lora], dim=1).to(dtype)

    def _frozen_linear(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Inference: all LoRAs of the layer in one stacked low-rank pair, so 3 LoRAs cost what 1 does."""
        key = (x.dtype, x.device)
        if self._stacked is None or self._stacked[0] != key:
            self._stacked = (key, self._stack(x.dtype))
        pair = self._stacked[1]
        if pair is not None:
            y = add_low_rank(y, x, pair[0], pair[1], 1.0)
        for name, adapter in self.adapters.items():
            s = self.strengths[name]
            if s and not isinstance(adapter, LoraAdapter):
                y = y + (adapter(x) * s).to(y.dtype)
        return y

    def check_fusable(self) -> None:
        if is_fp8(self.base):  # W + dW rounded back to e4m3 would lose most of a LoRA's small update
            raise SdloraError(f"{self.kohya_name}: LoRAs cannot be fused into base weights stored in fp8; "
                              "generate unfused, or load the base without fp8")

    @torch.no_grad()
    def fuse(self) -> None:
        """Fold every active adapter into the weight; the original is kept so unfuse is exact."""
        if self.fused:
            return
        self.check_fusable()
        w = self.base.weight
        self._backup = w.detach().clone()
        w.copy_(self._merged_weight())
        self._reset()

    @torch.no_grad()
    def unfuse(self) -> None:
        if self._backup is not None:
            self.base.weight.copy_(self._backup)
            self._backup = None
            self._reset()


_CHUNK_ELEMENTS = 1 << 25  # weights per batched refresh (128 MB in fp32): bounds the extra memory a refresh takes
_plans: dict[tuple, list[tuple]] = {}  # refresh_merged's stacked LoRA factors, per (structure, hosts, copies)


def _refresh_plan(hosts: list[LoraHost]) -> list[tuple]:
    """Hosts grouped by weight shape and adapters, in chunks, with each chunk's LoRA factors stacked once: the
    adapters are frozen, so a later strength change only rescales the stacked ups."""
    key = (structure_version(), tuple(map(id, hosts)), tuple(id(h._merged) for h in hosts))
    if key in _plans:
        return _plans[key]
    groups: dict[tuple, list[LoraHost]] = {}
    for h in hosts:
        w = h._merged
        groups.setdefault((tuple(w.shape), w.dtype, w.device, tuple((n, a.rank) for n, a in h.adapters.items())),
                          []).append(h)
    plan = []
    for (shape, dtype, device, adapters), group in groups.items():
        per_chunk = max(1, _CHUNK_ELEMENTS // math.prod(shape))
        for k in range(0, len(group), per_chunk):
            part = group[k : k + per_chunk]
            names = [n for n, _ in adapters]
            ups = [torch.stack([h.adapters[n].up.weight for h in part]) for n in names]  # [G, out, r] each
            downs = torch.cat([torch.stack([h.adapters[n].down.weight for h in part]) for n in names], dim=1)
            scales = [[h.adapters[n].scale for n in names] for h in part]
            plan.append((part, [h.base.weight for h in part], [h._merged for h in part], names, ups, downs, scales,
                         dtype, device))
    if len(_plans) > 8:
        _plans.clear()
    _plans[key] = plan
    return plan


@torch.no_grad()
def refresh_merged(hosts: list[LoraHost]) -> None:
    """Recompute the merged inference weights W + sum s*dW of many Linear hosts: per chunk of same-shape layers one
    stack, one baddbmm over every adapter's (rescaled) factors and one foreach copy, instead of ~17 launches and
    several module walks per layer. On SDXL (~1,000 layers) that is what a strength change costs; the copies are
    written in place, so captured CUDA graphs stay valid. A host listed twice (shared by several changed adapters)
    is recomputed once."""
    plan = _refresh_plan(list(dict.fromkeys(hosts)))
    # every chunk's coefficients in one host-to-device copy: a copy per chunk would make the host wait for the GPU
    # once per chunk (a pageable copy synchronises), serialising Python and the kernels
    flat = [h.strengths[n] * sc for part, _, _, names, _, _, scales, _, _ in plan
            for h, row in zip(part, scales) for n, sc in zip(names, row)]
    host = torch.tensor(flat, dtype=torch.float32)
    on = {dev: host.to(dev) for dev in {entry[8] for entry in plan}}
    start = 0
    for part, weights, merged, names, ups, downs, _scales, dtype, device in plan:
        count = len(part) * len(names)
        coef = on[device][start : start + count].view(len(part), len(names))
        start += count
        scaled = torch.cat([u * coef[:, j].view(-1, 1, 1) for j, u in enumerate(ups)], dim=2)
        acc = torch.baddbmm(torch.stack(weights).float(), scaled, downs)
        torch._foreach_copy_(merged, list(acc.to(dtype).unbind(0)))


def iter_hosts(model: nn.Module):
    for m in model.modules():
        if isinstance(m, LoraHost):
            yield m
