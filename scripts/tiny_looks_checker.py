"""The looks base's checker stage (scripts/tiny_looks_stages.py calls it; `--stage checker` runs it alone on OUT's
VAE): one sigmoid per look of ALL_LOOKS and colour/shape heads, trained on VAE-passed single-look renders and two-look
composites, its accuracy measured on held-out scenes and written with the weights' style names."""

from __future__ import annotations

import random
import time

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tiny_build_common import checker_step, round_trip, to_pixels
from tiny_looks_stages import _scene, collect

from sdlora.eval import world
from sdlora.eval.looks import ALL_LOOKS


def _mixes(job: tuple) -> tuple[list[np.ndarray], list[tuple[str, str]]]:
    """Two-look composites of one scene from its VAE-passed renders (ALL_LOOKS order): objects in one look over the
    other's background (world.split_mix), and sketch's ink printed over the other look when one of them is sketch."""
    renders, seed, index, k = job
    scene = _scene(seed, index, True)
    rng = random.Random(f"mix/{seed}/{index}")
    out, pairs = [], []
    for _ in range(k):
        a, b = rng.sample(ALL_LOOKS, 2)
        ims = {n: Image.fromarray(renders[ALL_LOOKS.index(n)]) for n in (a, b)}
        if "sketch" in (a, b) and rng.random() < 0.5:
            out.append(np.asarray(world.ink_mix([ims[a], ims[b]])))
        else:
            out.append(np.asarray(world.split_mix(ims[a], ims[b], scene)))
        pairs.append((a, b))
    return out, pairs


def train_checker(args, device, vae, pool, rendering) -> dict:
    """Colour/shape softmax heads and one sigmoid per look, on VAE-passed single-look renders and composites;
    accuracy on the first held_n scenes, which it never trains on."""
    from sdlora.eval.checker import COLOUR_NAMES, INPUT, SHAPE_NAMES, Checker, save_checker

    looks, n, t0 = list(ALL_LOOKS), args.checker_scenes, time.time()
    renders, _, labels = collect(rendering)
    renders = round_trip(vae, renders, device, sample=True, generator=torch.Generator().manual_seed(args.seed + 1))
    by_scene = renders.reshape(n, len(looks), *renders.shape[1:])
    mixed = pool.map(_mixes, [(by_scene[i], args.seed + 1, i, args.mixes_per_scene) for i in range(n)], chunksize=16)
    print(f"checker data: {len(renders)} renders + {n * args.mixes_per_scene} composites in {time.time() - t0:.0f}s", flush=True)
    main = labels[:: len(looks)]
    m_scene = [i for i in range(n) for _ in range(args.mixes_per_scene)]
    colour = torch.tensor([COLOUR_NAMES.index(c) for c, _ in labels] + [COLOUR_NAMES.index(main[i][0]) for i in m_scene])
    shape = torch.tensor([SHAPE_NAMES.index(k) for _, k in labels] + [SHAPE_NAMES.index(main[i][1]) for i in m_scene])
    style = torch.zeros(len(labels) + len(m_scene), len(looks))
    style[torch.arange(len(labels)), torch.arange(len(labels)) % len(looks)] = 1.0
    for row, (a, b) in enumerate(p for _, pairs in mixed for p in pairs):
        style[len(labels) + row, [looks.index(a), looks.index(b)]] = 1.0
    scene = torch.tensor([i // len(looks) for i in range(len(labels))] + m_scene)
    pixels = np.concatenate([renders] + [np.stack(m) for m, _ in mixed])
    x = torch.cat([F.interpolate(to_pixels(pixels[i : i + 4096], device), size=(INPUT, INPUT), mode="bilinear", antialias=True)
                   for i in range(0, len(pixels), 4096)])
    colour, shape, style = colour.to(device), shape.to(device), style.to(device)
    held_n = min(200, max(1, n // 4))
    train_idx, val_idx = (scene >= held_n).nonzero().squeeze(1).to(device), (scene < held_n).nonzero().squeeze(1).to(device)
    torch.manual_seed(args.seed)
    model = Checker(args.checker_width, looks).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=args.checker_lr, weight_decay=1e-4)
    g = torch.Generator(device=device).manual_seed(args.seed)
    t0 = time.time()
    for step in range(args.checker_steps):
        for grp in opt.param_groups:  # warm-up, then cosine to 5%
            grp["lr"] = args.checker_lr * min((step + 1) / 100, 0.05 + 0.95 * 0.5 * (1 + np.cos(np.pi * step / args.checker_steps)))
        loss = checker_step(model, opt, (x, colour, shape, style), train_idx, args.checker_batch, g, device.type == "cuda")
        if (step + 1) % 500 == 0:
            print(f"checker step {step + 1} loss {loss.item():.4f} ({time.time() - t0:.0f}s)", flush=True)
    model.eval()
    with torch.no_grad():
        c, s, sl = (torch.cat(t) for t in zip(*(model(x[val_idx[i : i + 512]]) for i in range(0, len(val_idx), 512))))
    p, vs = torch.sigmoid(sl), style[val_idx]
    single = vs.sum(1) == 1
    ok_c, ok_s = c.argmax(1) == colour[val_idx], s.argmax(1) == shape[val_idx]
    per_look = {}
    for k, name in enumerate(looks):
        rows = single & (vs[:, k] == 1)
        per_look[name] = {"style_acc": float(((p[rows].argmax(1) == k) & (p[rows, k] > 0.5)).float().mean()),
                          "colour_acc": float(ok_c[rows].float().mean()), "shape_acc": float(ok_s[rows].float().mean())}
    acc = {"checker_per_look": per_look, "checker_colour_acc": float(ok_c[single].float().mean()),
           "checker_shape_acc": float(ok_s[single].float().mean()),
           "checker_style_acc": float((p[single].argmax(1) == vs[single].argmax(1)).float().mean()),
           "checker_mix_colour_acc": float(ok_c[~single].float().mean()),
           "checker_mix_both_looks_acc": float(((p[~single] > 0.5) == (vs[~single] > 0.5)).all(1).float().mean()),
           "checker_mix_pair_shown": float((p[~single] > 0.5)[vs[~single] > 0.5].view(-1, 2).all(1).float().mean()),
           "checker_steps": args.checker_steps, "checker_scenes": n, "checker_held_scenes": held_n,
           "checker_width": args.checker_width, "checker_seconds": round(time.time() - t0), "checker_style_names": looks}
    save_checker(model.cpu(), args.out / "checker.safetensors")
    print(f"checker on {held_n} held-out scenes: colour {acc['checker_colour_acc']:.3f} shape {acc['checker_shape_acc']:.3f} "
          f"style {acc['checker_style_acc']:.3f} mixes: both looks > 0.5 {acc['checker_mix_pair_shown']:.3f}, exactly "
          f"those two {acc['checker_mix_both_looks_acc']:.3f}", flush=True)
    return acc
