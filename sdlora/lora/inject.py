"""Attach a trainable adapter to the targeted layers of a base, and collect its weights for the file."""

from __future__ import annotations

import torch
from torch import nn

from sdlora.errors import SdloraError
from sdlora.formats.kohya import ModuleWeights
from sdlora.formats.names import SD1_NAMES, NameTable
from sdlora.lora.layer import LoraAdapter, LoraHost
from sdlora.lora.spec import NetworkSpec
from sdlora.lora.targets import ensure_host, text_encoder_targets, unet_targets, uses_conv_rank

TRAIN_ADAPTER = "trainee"


def inject_lora(unet: nn.Module, text_encoders: dict[str, nn.Module], te_prefixes: dict[str, str], spec: NetworkSpec,
                seed: int, conv_flag: str = "--conv-rank",
                names: NameTable = SD1_NAMES) -> tuple[list[LoraHost], list[LoraHost]]:
    """Wrap the targeted layers and add the trainable adapter; returns (UNet hosts, text-encoder hosts).

    `te_prefixes` maps kohya prefixes to keys of `text_encoders` (the family's); it is empty-handed when the
    spec trains no text encoder. `names` is the family's kohya name table (SDXL names its UNet by SGM paths).
    """
    torch.manual_seed(seed)  # the down-matrix init is part of what the seed fixes
    groups: tuple[list[LoraHost], list[LoraHost]] = ([], [])
    targets = unet_targets(unet, spec.targets, names)
    if spec.text_encoder:
        for prefix, key in te_prefixes.items():
            targets += text_encoder_targets(text_encoders[key], prefix, spec.te_mlp)
    for t in targets:
        host = ensure_host(t.model, t.module_path, t.kohya_name)
        layer = host.base
        conv = uses_conv_rank(layer)  # kxk convs take the conv rank/alpha, as in kohya's LoCon
        rank, alpha = spec.conv_dims() if conv else (spec.rank, spec.alpha)
        limit = min(layer.weight.shape[0], layer.weight[0].numel())
        if rank > limit:
            flag = conv_flag if conv and spec.conv_rank is not None else "--rank"
            raise SdloraError(f"{flag} {rank} is larger than layer {t.kohya_name} allows ({limit})")
        host.add(TRAIN_ADAPTER, LoraAdapter(layer, rank, alpha, spec.init).to(layer.weight.device))
        groups[int(t.is_text_encoder)].append(host)
    return groups


def trainable_parameters(hosts: list[LoraHost]) -> list[nn.Parameter]:
    return [p for h in hosts for p in h.adapters[TRAIN_ADAPTER].parameters()]


def lora_weights(hosts: list[LoraHost]) -> dict[str, ModuleWeights]:
    """The trained pairs by kohya name, fp32 on the host: what the file writer takes."""
    out = {}
    for h in hosts:
        a = h.adapters[TRAIN_ADAPTER]
        out[h.kohya_name] = ModuleWeights(a.down.weight.detach().float().cpu(), a.up.weight.detach().float().cpu(), a.alpha)
    return out
