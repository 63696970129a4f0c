"""Does a colour-weighted loss keep hues through the looks VAE? (issue 15: the round trip must keep >= 97% of object
colours on every look, held-out ones included). A CPU-sized probe: fine-tune a built looks VAE for --steps on renders
of the TRAINING looks only, with the builder's loss ("rgb": L1 + 0.5 MSE) or with its chroma part weighted
("chroma": tiny_build_common.recon_loss with --chroma-weight), then measure the hue judge's
colour accuracy after the round trip on --scenes scenes of every look (scripts/tiny_looks_stages.measure_vae's rule).
--jitter gives part of each batch tiny_build_common.jitter (desaturate and lighten; no look rendered).

    OMP_NUM_THREADS=1 python scripts/vae_colour_probe.py --vae BUILD/vae --loss chroma --steps 300 --json out.json
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import tiny_looks_stages as looks  # noqa: E402
from tiny_build_common import jitter, vae_step  # noqa: E402

from sdlora.eval.looks import ALL_LOOKS, HELD_OUT_LOOKS, TRAINING_LOOKS  # noqa: E402


def colour_accuracy(vae, eval_renders, check: argparse.Namespace) -> dict:
    """Per look, the share of objects whose hue survives the round trip (the builder's measure_vae)."""
    with torch.no_grad():
        return {look: r["colour_acc"] for look, r in looks.measure_vae(check, torch.device("cpu"), vae, eval_renders)["vae_round_trip"].items()}


def main(argv: list[str] | None = None) -> dict:
    from diffusers import AutoencoderKL

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vae", required=True, help="a looks base's vae folder")
    ap.add_argument("--loss", choices=["rgb", "chroma"], default="rgb")
    ap.add_argument("--chroma-weight", type=float, default=4.0)
    ap.add_argument("--jitter", type=float, default=0.0, help="share of each batch given jitter() (0: none)")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--images", type=int, default=1500, help="training-look renders to draw batches from")
    ap.add_argument("--scenes", type=int, default=20, help="scenes per look for the colour check")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", required=True)
    args = ap.parse_args(argv)
    torch.manual_seed(args.seed)
    vae = AutoencoderKL.from_pretrained(args.vae).float()
    cpu, check = torch.device("cpu"), argparse.Namespace(vae_eval_scenes=args.scenes)
    result: dict = {"args": vars(args), "torch": torch.__version__}
    with mp.get_context("fork").Pool(1) as pool:  # the builder's renders: the same scenes, looks and caption-free images
        eval_renders = looks.render_async(pool, list(ALL_LOOKS), args.scenes * len(ALL_LOOKS), "vae-eval", per_scene=True)
        train_renders = looks.render_async(pool, TRAINING_LOOKS, args.images, f"probe/{args.seed}")
        t0 = time.time()
        vae.eval()
        result["before"] = colour_accuracy(vae, eval_renders, check)
        result["check_seconds"] = round(time.time() - t0)
        data = torch.from_numpy(looks.collect(train_renders)[0]).permute(0, 3, 1, 2)
        opt = torch.optim.AdamW(vae.parameters(), lr=args.lr, weight_decay=0.0)
        rng, t0, losses = random.Random(args.seed), time.time(), []
        g = torch.Generator().manual_seed(args.seed)
        vae.train()
        for step in range(args.steps):
            x = data[[rng.randrange(len(data)) for _ in range(args.batch)]].float() / 127.5 - 1.0
            if args.jitter:
                x = jitter(x, g, args.jitter)
            losses.append(float(vae_step(vae, opt, x, 1e-6, cpu,  # KL weight: the builder's --vae-kl
                                               args.chroma_weight if args.loss == "chroma" else 0.0)))
            if (step + 1) % 50 == 0:
                print(f"step {step + 1} loss {np.mean(losses[-50:]):.4f} ({time.time() - t0:.0f}s)", flush=True)
        result["train_seconds"] = round(time.time() - t0)
        vae.eval()
        result["after"] = colour_accuracy(vae, eval_renders, check)
    for when in ("before", "after"):
        acc = result[when]
        result[f"{when}_min_held_out"] = min(acc[k] for k in HELD_OUT_LOOKS)
        result[f"{when}_mean_held_out"] = float(np.mean([acc[k] for k in HELD_OUT_LOOKS]))
        result[f"{when}_mean_training"] = float(np.mean([acc[k] for k in TRAINING_LOOKS]))
    Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k not in ("args",)}), flush=True)
    return result


if __name__ == "__main__":
    main()
