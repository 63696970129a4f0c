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
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import tiny_looks_stages as looks  # noqa: E402
from tiny_build_common import jitter, recon_loss  # noqa: E402

from sdlora.eval.looks import ALL_LOOKS, HELD_OUT_LOOKS, TRAINING_LOOKS, hue_name, render_look  # noqa: E402


def renders(n: int, seed: str, look_names) -> np.ndarray:
    return np.stack([np.asarray(render_look(look_names[i % len(look_names)], looks._scene(seed, i, False), looks.SIZE).convert("RGB"))
                     for i in range(n)])


def colour_accuracy(vae, scenes: int) -> dict:
    out = {}
    for look in ALL_LOOKS:
        right = []
        for i in range(scenes):
            scene = looks._scene("vae-eval", i, False)
            a = np.asarray(render_look(look, scene, looks.SIZE).convert("RGB"))
            with torch.no_grad():
                b = looks.round_trip(vae, a[None], "cpu")[0].astype(np.float32) / 255
            right += [hue_name(b[m]) == s.colour for s, m in zip(scene.shapes, looks._object_masks(scene))]
        out[look] = float(np.mean(right))
    return out


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
    result: dict = {"args": vars(args), "torch": torch.__version__}
    t0 = time.time()
    vae.eval()
    result["before"] = colour_accuracy(vae, args.scenes)
    result["check_seconds"] = round(time.time() - t0)
    data = torch.from_numpy(renders(args.images, f"probe/{args.seed}", TRAINING_LOOKS)).permute(0, 3, 1, 2)
    opt = torch.optim.AdamW(vae.parameters(), lr=args.lr, weight_decay=0.0)
    rng, t0, losses = random.Random(args.seed), time.time(), []
    g = torch.Generator().manual_seed(args.seed)
    vae.train()
    for step in range(args.steps):
        x = data[[rng.randrange(len(data)) for _ in range(args.batch)]].float() / 127.5 - 1.0
        if args.jitter:
            pick = torch.rand(len(x), generator=g) < args.jitter
            x = torch.where(pick[:, None, None, None], jitter(x, g), x)
        dist = vae.encode(x).latent_dist
        rec = vae.decode(dist.sample()).sample
        loss = recon_loss(rec, x, args.chroma_weight if args.loss == "chroma" else 0.0) + 1e-6 * dist.kl().mean() / x[0].numel()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        losses.append(float(loss))
        if (step + 1) % 50 == 0:
            print(f"step {step + 1} loss {np.mean(losses[-50:]):.4f} ({time.time() - t0:.0f}s)", flush=True)
    result["train_seconds"] = round(time.time() - t0)
    vae.eval()
    result["after"] = colour_accuracy(vae, args.scenes)
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
