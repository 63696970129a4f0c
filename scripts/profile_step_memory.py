"""Where a training step's peak GPU memory sits: weights, forward (saved activations) and backward, with and without
gradient checkpointing, eagerly, for the step `sdlora train` builds (issue 5's batch-1 memory question).

GPU: python scripts/profile_step_memory.py --work /tmp/bench --json out.json
CPU smoke: --small --device cpu (memory figures are CUDA-only and read as null there)
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))


def gib(device: torch.device, peak: bool) -> float | None:
    if device.type != "cuda":
        return None
    return round((torch.cuda.max_memory_allocated(device) if peak else torch.cuda.memory_allocated(device)) / 2**30, 3)


def profile(base, folder: Path, work: Path, batch: int, latent: int, device: torch.device, **overrides) -> dict:
    from accelerate import Accelerator

    from sdlora.config import apply_base_defaults, make_config
    from sdlora.train import build_train_step, inject_lora, make_optimizer, pick_precisions
    from sdlora.train_step import MicroBatch

    cfg = apply_base_defaults(make_config(None, base=str(folder), images=str(work), rank=4, batch_size=batch,
                                          device=device.type, cuda_graph=False, **overrides), base.path)
    mp, _ = pick_precisions(cfg, device)
    acc = Accelerator(mixed_precision=mp, cpu=device.type == "cpu")
    unet_hosts, te_hosts = inject_lora(base, cfg)
    params = [p for h in unet_hosts + te_hosts for p in h.adapters["trainee"].parameters()]
    opt = acc.prepare(make_optimizer(cfg, params, [], device))
    te = base.text_encoders["text_encoder"]
    caps = ["sks sketch, a small red circle"] * batch
    if cfg.text_encoder:
        cond = {k: v.to(device) for k, v in base.family.tokenize(base, caps).items()}
        encode = functools.partial(base.family.encode_prompt, base)
    else:
        with torch.no_grad():
            cond = base.family.encode_prompt(base, base.family.tokenize(base, caps))
        te.to("cpu")

        def encode(c):
            return c
    step = build_train_step(base, cfg, params, opt, acc, mp, encode, 10, print)
    g = torch.Generator(device).manual_seed(0)
    mb = MicroBatch(torch.randn(batch, 4, latent, latent, device=device, generator=g), torch.randn(batch, 4, latent, latent, device=device, generator=g),
                    torch.randint(0, 1000, (batch,), device=device, generator=g), cond)
    for _ in range(2):
        step.eager([mb])  # optimizer state and kernels exist before measuring
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    row = {"overrides": overrides, "batch": batch, "resident_gib": gib(device, False)}
    loss = step.loss(mb)
    row |= {"forward_peak_gib": gib(device, True), "after_forward_gib": gib(device, False)}
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    loss.backward()
    row |= {"backward_peak_gib": gib(device, True), "after_backward_gib": gib(device, False)}
    opt.zero_grad(set_to_none=True)
    te.to(device)
    base.unet.disable_gradient_checkpointing()
    te.gradient_checkpointing_disable()
    base.unet.to(memory_format=torch.contiguous_format)
    print(json.dumps(row), flush=True)
    return row


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", required=True)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--small", action="store_true")
    ap.add_argument("--work")
    args = ap.parse_args(argv)
    from make_random_sd15 import write_random_base

    from sdlora.base import load_base

    device = torch.device(args.device)
    work = Path(args.work or tempfile.mkdtemp(prefix="profile-mem-"))
    folder = work / "base"
    if not (folder / "model_index.json").exists():
        write_random_base(folder, torch.float16, args.device, small=args.small)
    latent = 8 if args.small else 64
    base = load_base(str(folder), "bf16" if device.type == "cuda" else "fp32", device)
    base.vae.to("cpu")
    rows = []
    for kw in ({"text_encoder": False, "channels_last": "off"}, {"text_encoder": False, "channels_last": "off", "gradient_checkpointing": True},
               {"text_encoder": False}, {"text_encoder": False, "gradient_checkpointing": True}):
        rows.append(profile(base, folder, work, 1, latent, device, **kw))
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")
    return rows


if __name__ == "__main__":
    main()
