"""GPU benchmark of the issue-2 spine: `sdlora train` at batch 1 and 4 on a random-weight SD1.5, then
`sdlora generate` with two LoRAs (plain and --fuse). Prints one JSON object per case and writes them to --json.

Usage (on the GPU machine): python scripts/bench_gpu.py --base /tmp/sd15 --json out.json
"""

import argparse
import json
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def make_images(folder: Path, n: int, size: int) -> None:
    """Captioned 512 px images from the procedural style generator."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("msd", Path(__file__).with_name("make_style_dataset.py"))
    msd = importlib.util.module_from_spec(spec)
    sys.modules["msd"] = msd
    spec.loader.exec_module(msd)
    msd.main(["--style", "sketch", "--count", str(n), "--size", str(size), "--seed", "0", "--out", str(folder)])


def bench_train(base: str, images: Path, out: Path, batch: int, steps: int, **kw) -> dict:
    from sdlora.training.config import make_config
    from sdlora.training.loop import train

    cfg = make_config(None, base=base, images=str(images), output=str(out), steps=steps, batch_size=batch,
                      resolution=512, rank=4, progress=False, overwrite=True, trigger="sks sketch", **kw)
    t = time.perf_counter()
    r = train(cfg)
    return {"case": f"train bs{batch}", "options": kw, "steps": r.steps, "it_per_s": round(r.steps_per_second, 3),
            "img_per_s": round(r.steps_per_second * batch, 2), "peak_vram_gib": round(r.peak_vram_gib, 2),
            "wall_s": round(time.perf_counter() - t, 1), "adapter": str(r.adapter)}


def bench_generate(base: str, loras: list[str], fuse: bool, n: int = 4, steps: int = 20) -> dict:
    from sdlora.lora.mixer import LoraMixer
    from sdlora.models.base import load_base
    from sdlora.sample.generate import generate_images

    b = load_base(base, "fp16", "cuda")
    mixer = LoraMixer(b)
    for i, path in enumerate(loras):
        mixer.load(path, 0.8 if i == 0 else 0.4)
    generate_images(b, "warm-up", steps=2)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    if fuse:
        with mixer.fused():
            for s in range(n):
                generate_images(b, "a small red circle, sks sketch", seed=s, steps=steps)
    else:
        for s in range(n):
            generate_images(b, "a small red circle, sks sketch", seed=s, steps=steps)
    torch.cuda.synchronize()
    dt = (time.perf_counter() - t) / n
    return {"case": "generate 2 LoRAs" + (" --fuse" if fuse else ""), "s_per_image": round(dt, 3),
            "steps": steps, "size": "512x512", "peak_vram_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--base", required=True)
    ap.add_argument("--json", required=True)
    ap.add_argument("--steps", type=int, default=40)
    args = ap.parse_args()
    env = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "python": platform.python_version()}
    import diffusers
    import transformers

    env |= {"diffusers": diffusers.__version__, "transformers": transformers.__version__}
    print(json.dumps(env), flush=True)
    results = [env]
    work = Path(tempfile.mkdtemp())
    make_images(work / "images", 16, 512)
    cases = [dict(batch=1), dict(batch=4), dict(batch=4, gradient_checkpointing=True), dict(batch=1, attention="xformers")]
    adapters = []
    for c in cases:
        c = dict(c)
        batch = c.pop("batch")
        r = bench_train(args.base, work / "images", work / f"out{len(results)}", batch, args.steps, **c)
        print(json.dumps(r), flush=True)
        results.append(r)
        adapters.append(r["adapter"])
    for fuse in (False, True):
        r = bench_generate(args.base, adapters[:2], fuse)
        print(json.dumps(r), flush=True)
        results.append(r)
    Path(args.json).write_text(json.dumps(results, indent=2))
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
