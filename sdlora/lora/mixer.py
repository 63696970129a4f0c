"""Attach several LoRA files to a loaded base at chosen strengths, without reloading it."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from sdlora.errors import SdloraError
from sdlora.formats.deltas import DeltaWeights
from sdlora.formats.detect import LABELS, canonical_modules, context_width, guess_architecture, sdxl_by_names
from sdlora.formats.kohya import AdapterFile, load_adapter
from sdlora.formats.names import NameTable
from sdlora.formats.names_sdxl import SgmNameTable
from sdlora.lora.blocks import block_multiplier, block_table, check_fits
from sdlora.lora.layer import DeltaAdapter, LoraAdapter, LoraHost, refresh_merged
from sdlora.lora.specs import check_strengths
from sdlora.lora.targets import all_lora_layers, ensure_host
from sdlora.models.base import BaseModel
from sdlora.util import warn as _warn


class LoraMixer:
    """Owns the LoRA hosts of one base; each loaded file is one named adapter on every layer it touches."""

    def __init__(self, base: BaseModel, warn: Callable[[str], None] = _warn):
        self.base = base
        self.warn = warn
        self.loaded: dict[str, list[LoraHost]] = {}
        self._te_hosts: set[int] = set()
        # per adapter: (UNet strength, text-encoder strength or None, block vector or None), and each host's block
        self.settings: dict[str, tuple[float, float | None, tuple[float, ...] | None]] = {}
        self._host_keys: dict[str, list[str]] = {}
        self._multipliers: dict[str, tuple] = {}  # name -> (block vector, each host's block multiplier)
        lpb = getattr(base.unet.config, "layers_per_block", 2)
        self._layers_per_block = int(lpb[0] if isinstance(lpb, (list, tuple)) else lpb)

    @property
    def names(self) -> NameTable:
        return self.base.family.names

    def _layers(self) -> dict[str, tuple[torch.nn.Module, str, torch.nn.Module, bool]]:
        layers = {}
        for name, (path, mod) in all_lora_layers(self.base.unet, "lora_unet", False, self.names).items():
            layers[name] = (self.base.unet, path, mod, False)
        for prefix, key in self.base.family.te_prefixes.items():
            te = self.base.text_encoders[key]
            for name, (path, mod) in all_lora_layers(te, prefix, te=True).items():
                layers[name] = (te, path, mod, True)
        return layers

    def load(self, path: str | Path, strength: float = 1.0, te_strength: float | None = None, name: str | None = None,
             blocks: tuple[float, ...] | None = None) -> str:
        return self.add(load_adapter(path), strength, te_strength, name, blocks)

    def add(self, adapter: AdapterFile, strength: float = 1.0, te_strength: float | None = None, name: str | None = None,
            blocks: tuple[float, ...] | None = None) -> str:
        """Attach a file as adapter `name`; `blocks` (a LoRA Block Weight vector) scales each block's strength."""
        table = self._block_table(blocks)
        label = str(adapter.path) if adapter.path else "adapter"
        check_strengths(label, strength, te_strength)
        adapter.require_finite()
        name = _safe_name(name or (Path(adapter.path).stem if adapter.path else f"lora{len(self.loaded)}"))
        base_name = name
        i = 1
        while name in self.loaded:
            i += 1
            name = f"{base_name}_{i}"
        _check_family(adapter, self.base, label)
        adapter = canonical_modules(adapter, self.names)  # SDXL files may name UNet modules by diffusers paths
        layers = self._layers()
        fits, misfits = [], []
        for key, w in [*adapter.modules.items(), *adapter.deltas.items()]:
            hit = layers.get(key)
            if hit is None or not _fits(hit[2], w):
                misfits.append(key)
            else:
                fits.append((key, hit, w))
        total = len(adapter.modules) + len(adapter.deltas)
        if not fits:
            raise SdloraError(
                f"{label} does not fit this base ({self.base.family.version}): 0 of {total} modules match"
                f"{_arch_hint(adapter)}; unmatched e.g. {', '.join(misfits[:3])}"
            )
        if misfits:
            shown = ", ".join(misfits[:10]) + (f" and {len(misfits) - 10} more" if len(misfits) > 10 else "")
            self.warn(f"{label}: {len(misfits)} of {total} modules do not fit this base and are ignored: {shown}")
        hosts, keys = [], []
        te_s = strength if te_strength is None else te_strength
        for key, (model, path, _, is_te), w in fits:
            host = ensure_host(model, path, key)
            if isinstance(w, DeltaWeights):
                layer = DeltaAdapter(host.base, w.delta)  # computed on first use, from the unfused base weight
            else:
                layer = LoraAdapter(host.base, w.rank, w.alpha)
                with torch.no_grad():
                    layer.down.weight.copy_(w.down.reshape(layer.down.weight.shape))
                    layer.up.weight.copy_(w.up.reshape(layer.up.weight.shape))
            layer.requires_grad_(False)
            multiplier = block_multiplier(key, table, self._layers_per_block)
            host.add(name, layer, (te_s if is_te else strength) * multiplier)
            if is_te:
                self._te_hosts.add(id(host))
            hosts.append(host)
            keys.append(key)
        self.loaded[name] = hosts
        self._host_keys[name] = keys
        self.settings[name] = (float(strength), te_strength, blocks)
        return name

    def set_strength(self, name: str, strength: float, te_strength: float | None = None) -> None:
        """New strengths, in place (CUDA graphs stay valid); the adapter's block vector still applies."""
        self.set_strengths({name: (strength, te_strength)})

    def set_strengths(self, changes: dict[str, tuple[float, float | None]]) -> None:
        """Several adapters' (strength, te_strength) at once: one recompute of the merged weights covers them all, so
        changing three LoRAs costs what changing one does."""
        for name, (strength, te_strength) in changes.items():
            check_strengths(name, strength, te_strength)
        batch: list = []
        for name, (strength, te_strength) in changes.items():
            self._apply(name, strength, te_strength, self._settings(name)[2], batch)
        refresh_merged(batch)

    def set_blocks(self, name: str, blocks: tuple[float, ...] | None) -> None:
        """A new LoRA Block Weight vector (None: every block at 1) at the adapter's current strengths, in place."""
        strength, te_strength, _ = self._settings(name)
        batch: list = []
        self._apply(name, strength, te_strength, blocks, batch)
        refresh_merged(batch)

    def _apply(self, name: str, strength: float, te_strength: float | None, blocks: tuple[float, ...] | None,
               batch: list) -> None:
        """Sets the hosts' strengths; merged inference copies to recompute are appended to `batch`."""
        table = self._block_table(blocks)
        te_s = strength if te_strength is None else te_strength
        if any(host.fused for host in self._hosts(name)):
            raise SdloraError("unfuse before changing strengths")
        cached = self._multipliers.get(name)
        if cached is None or cached[0] != blocks:
            cached = (blocks, [block_multiplier(k, table, self._layers_per_block) for k in self._host_keys[name]])
            self._multipliers[name] = cached
        te_hosts = self._te_hosts
        for host, m in zip(self._hosts(name), cached[1]):
            host.set_strength(name, (te_s if id(host) in te_hosts else strength) * m, batch)
        self.settings[name] = (float(strength), te_strength, blocks)

    def _settings(self, name: str) -> tuple[float, float | None, tuple[float, ...] | None]:
        self._hosts(name)  # the one-line error for an unknown name
        return self.settings[name]

    def _block_table(self, blocks: tuple[float, ...] | None) -> dict[str, float] | None:
        if blocks is None:
            return None
        family = self.base.family
        sdxl = getattr(family, "name", "") == "sdxl" or str(family.version).startswith("sdxl")
        check_fits(blocks, "sdxl" if sdxl else "sd1")
        return block_table(blocks)

    def remove(self, name: str) -> None:
        for host in self._hosts(name):
            host.remove(name)
        del self.loaded[name]
        self.settings.pop(name, None)
        self._host_keys.pop(name, None)
        self._multipliers.pop(name, None)

    def _hosts(self, name: str) -> list[LoraHost]:
        if name not in self.loaded:
            raise SdloraError(f"no LoRA named '{name}' is loaded (loaded: {', '.join(self.loaded) or 'none'})")
        return self.loaded[name]

    def _all_hosts(self) -> list[LoraHost]:
        seen, out = set(), []
        for hosts in self.loaded.values():
            for h in hosts:
                if id(h) not in seen:
                    seen.add(id(h))
                    out.append(h)
        return out

    def fuse(self) -> None:
        hosts = self._all_hosts()
        for h in hosts:
            h.check_fusable()  # all or nothing: an fp8-stored layer refuses before any weight changes
        for h in hosts:
            h.fuse()

    def unfuse(self) -> None:
        for h in self._all_hosts():
            h.unfuse()

    @contextmanager
    def fused(self) -> Iterator[None]:
        self.fuse()
        try:
            yield
        finally:
            self.unfuse()


def _safe_name(name: str) -> str:
    """Adapter names are ModuleDict keys: no dots, no clash with nn.Module attributes."""
    name = re.sub(r"[^0-9A-Za-z_]", "_", name)
    return name if name and not hasattr(torch.nn.ModuleDict(), name) else f"lora_{name}"


def _fits(layer: torch.nn.Module, w: object) -> bool:
    """Whether a LoRA pair or a weight delta matches the layer's kind and shape."""
    base = layer.base if isinstance(layer, LoraHost) else layer
    if isinstance(w, DeltaWeights):
        return isinstance(base, (torch.nn.Linear, torch.nn.Conv2d)) and w.fits(base.weight.shape)
    return _shape_fits(base, w.down, w.up)


def _shape_fits(base: torch.nn.Module, down: torch.Tensor, up: torch.Tensor) -> bool:
    if isinstance(base, torch.nn.Linear):
        return down.dim() == 2 and down.shape[1] == base.in_features and up.shape[0] == base.out_features
    if isinstance(base, torch.nn.Conv2d):
        kernel_ok = (down.dim() == 2 and base.kernel_size == (1, 1)) or (
            down.dim() == 4 and tuple(down.shape[2:]) == base.kernel_size
        )
        return kernel_ok and down.shape[1] == base.in_channels and up.shape[0] == base.out_channels
    return False


def _base_label(base: BaseModel) -> str:
    return "SDXL" if base.family.version.startswith("sdxl") else LABELS.get(base.family.version, base.family.version)


def _check_family(adapter: AdapterFile, base: BaseModel, label: str) -> None:
    """Refuse a file made for another family with the reason: an SD 1.x LoRA shares some layer shapes with SDXL
    (640-wide self-attention), so matching shapes alone would apply a fraction of it and call that a success."""
    base_xl = "lora_te1" in base.family.te_prefixes or isinstance(base.family.names, SgmNameTable)  # SDXL's naming
    by_names = sdxl_by_names(adapter)
    if by_names is not None and by_names != base_xl:
        kind = ("an SDXL LoRA (lora_te1/lora_te2 or SGM block names)" if by_names
                else "an SD 1.x/2.x LoRA (one text encoder: lora_te_ keys)")
        raise SdloraError(f"{label} does not fit this base: it is {kind} and the base {base.name} is "
                          f"{_base_label(base)}; use a LoRA trained for an {_base_label(base)} base "
                          f"(its modules: {', '.join([*adapter.modules, *adapter.deltas][:3])}, ...)")
    width, ctx = context_width(adapter), getattr(base.unet.config, "cross_attention_dim", None)
    if width is not None and isinstance(ctx, int) and width != ctx:
        arch = guess_architecture(adapter)[0]
        made_for = f", {LABELS[arch]}" if arch in LABELS else ""
        raise SdloraError(f"{label} does not fit this base: its cross-attention LoRAs take a {width}-wide text context"
                          f"{made_for}, the base {base.name} ({_base_label(base)}) gives {ctx}")


def _arch_hint(adapter: AdapterFile) -> str:
    arch, evidence = guess_architecture(adapter)
    return f" (it looks like an {LABELS[arch]} LoRA: {evidence})" if arch in LABELS else ""
