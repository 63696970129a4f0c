"""Sampling with the UNet forward replayed from CUDA graphs.

At 512 px and batch 1-2 an eager SD UNet step is bound by Python and kernel launches (BENCHMARKS.md, issue 5),
so every LoRA layer's few extra launches show in the step time. Replayed from a graph, the step costs what the
GPU needs, and a LoRA's rank-r matmuls are nearly free. Graphs are keyed by input shapes and by
`lora_layer.structure_version()`: loading, removing, fusing or unfusing LoRAs captures anew, while changing
strengths updates the stacked LoRA weights in place and keeps the graph.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch.utils._pytree import tree_flatten, tree_unflatten

from sdlora.lora.layer import structure_version
from sdlora.util import warn as _warn


class UNetGraphs:
    """Replaces `unet.forward` while active; anything it cannot replay (training, extra inputs, CPU) runs eagerly."""

    def __init__(self, unet: torch.nn.Module, max_graphs: int = 4, warn=_warn):
        self.unet, self.max_graphs, self.warn = unet, max_graphs, warn
        self.plain = type(unet).forward.__get__(unet)
        self.graphs: dict[tuple, tuple] = {}
        self.seen: dict[tuple, int] = {}
        self.version = structure_version()
        self.disabled = False
        self.replays = 0  # how many UNet calls came from a graph (tests check the SDXL path replays)

    def forward(self, sample, timestep, encoder_hidden_states, *args, return_dict: bool = True, **kwargs):
        given = {k: v for k, v in kwargs.items() if v is not None}  # e.g. SDXL's added_cond_kwargs
        leaves, spec = tree_flatten((encoder_hidden_states, given))
        graphable = not args and all(torch.is_tensor(x) for x in leaves)
        if self.disabled or not graphable or torch.is_grad_enabled() or sample.device.type != "cuda":
            return self.plain(sample, timestep, encoder_hidden_states, *args, return_dict=return_dict, **kwargs)
        t = timestep if torch.is_tensor(timestep) else torch.tensor(timestep)
        t = t.to(sample.device)
        if structure_version() != self.version:  # LoRAs changed: old graphs are stale; free them
            self.graphs.clear()
            self.seen.clear()
            self.version = structure_version()
        inputs = [sample, t, *leaves]
        key = (str(spec), *((tuple(x.shape), x.dtype) for x in inputs))
        if key not in self.graphs:
            self.seen[key] = self.seen.get(key, 0) + 1
            if self.seen[key] == 1 or len(self.graphs) >= self.max_graphs:  # warm-up: lazy LoRA stacks, cuDNN plans
                return self.plain(sample, t, encoder_hidden_states, return_dict=return_dict, **given)
            try:
                self.graphs[key] = self._capture(inputs, spec)
            except Exception as e:  # a host sync somewhere in the model: sample eagerly
                self.disabled = True
                self.warn(f"CUDA graph capture of the UNet failed ({(str(e).splitlines() or [type(e).__name__])[0][:200]}); sampling eagerly")
                torch.cuda.synchronize(sample.device)
                return self.plain(sample, t, encoder_hidden_states, return_dict=return_dict, **given)
        graph, static, out = self.graphs[key]
        for dst, src in zip(static, inputs):
            dst.copy_(src)
        graph.replay()
        self.replays += 1
        result = out.clone()  # the next replay overwrites `out`
        if return_dict:
            from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput

            return UNet2DConditionOutput(sample=result)
        return (result,)

    def _capture(self, inputs: list[torch.Tensor], spec) -> tuple:
        static = [x.clone() for x in inputs]
        context, extra = tree_unflatten(static[2:], spec)
        torch.cuda.synchronize(static[0].device)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = self.plain(static[0], static[1], context, return_dict=False, **extra)[0]
        return graph, static, out


@contextlib.contextmanager
def graphed_unet(unet: torch.nn.Module, enabled: bool = True) -> Iterator[UNetGraphs | None]:
    """While active, calls to `unet` (as the diffusers pipeline makes them) replay CUDA graphs on a GPU."""
    if not enabled or next(unet.parameters()).device.type != "cuda":
        yield None
        return
    graphs = unet.__dict__.get("_sdlora_graphs")  # kept between calls: a capture is reused by the next image
    if graphs is None:
        graphs = unet.__dict__["_sdlora_graphs"] = UNetGraphs(unet, warn=_warn)
    unet.forward = graphs.forward
    try:
        yield graphs
    finally:
        del unet.forward  # back to the class's forward


__all__ = ["UNetGraphs", "graphed_unet"]
