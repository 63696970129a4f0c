"""Issue 5: generation time per denoising step with 0, 1 and 3 LoRAs active, unfused and fused, and how long
changing strengths takes without reloading the base. One process, SD1.5-architecture base with random weights.

Per case: the diffusers pipeline (DPM++, CFG 7.5, 512 px, output_type="latent" so the VAE is left out) runs
--steps steps --repeats times; the median of (time / steps) is reported. LoRA files are random, in sdlora's
kohya layout, for each --targets layout (cross-attn: what `sdlora train` writes; all-linear: kohya's usual set).

--interleave R adds R rounds in which the cases take turns (0 LoRAs, 1 and 3 unfused, 3 fused; one untimed call after
each switch; "0 LoRAs" here is every LoRA removed, whose emptied hosts run the plain layer): slow drift of the machine then falls on every case alike, and each case is reported as the median over
rounds of its time relative to the 0-LoRA call of the same round.

--family sdxl (issue 16): the SDXL architecture (random weights, scripts/make_random_sdxl.py) at 1024 px, 30 steps,
bf16, LoRAs over kohya's all-linear set on the UNet and both text encoders; each row also gives ms_per_image.

GPU:  python scripts/bench_generate.py --json benchmarks/bench-generate.json
      python scripts/bench_generate.py --family sdxl --work /tmp/bench --json benchmarks/bench-generate-sdxl.json
CPU smoke test: --small --device cpu --steps 2 --repeats 1 [--family sdxl]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from bench_util import environment, native_size, random_base, sync  # noqa: E402 - scripts/ is on the path above

PROMPT = "sks sketch, a small red circle above a blue square on a grey background"


def random_lora(base, path: Path, targets: str, rank: int, seed: int) -> Path:
    """A LoRA file over the layers `sdlora train --targets T` would touch (text encoders included), random weights."""
    from sdlora.formats.kohya import ModuleWeights, save_adapter
    from sdlora.lora.targets import text_encoder_targets, unet_targets

    g = torch.Generator().manual_seed(seed)
    mods = {}
    layers = unet_targets(base.unet, targets, base.family.names)
    for prefix, key in base.family.te_prefixes.items():
        layers += text_encoder_targets(base.text_encoders[key], prefix)
    for t in layers:
        out_f, in_f = t.layer.weight.shape[:2]
        mods[t.kohya_name] = ModuleWeights(torch.randn(rank, in_f, generator=g) * 0.02, torch.randn(out_f, rank, generator=g) * 0.02, rank)
    save_adapter(path, mods, {"ss_output_name": path.stem}, torch.float16)
    return path


def step_time(pipe, device: torch.device, steps: int, repeats: int, size: int) -> float:
    """Median seconds per denoising step."""
    times = []
    for r in range(repeats + 1):  # the first run warms up
        g = torch.Generator(device).manual_seed(r)
        sync(device)
        t = time.perf_counter()
        pipe(PROMPT, num_inference_steps=steps, height=size, width=size, generator=g, output_type="latent")
        sync(device)
        if r:
            times.append((time.perf_counter() - t) / steps)
    return statistics.median(times)


def bench_layout(base, pipe, files: list[Path], device: torch.device, steps: int, repeats: int, size: int, record) -> None:
    """0, 1 and 3 LoRAs unfused and fused, strength changes, and the base again after removing them."""
    from sdlora.lora.mixer import LoraMixer

    none = step_time(pipe, device, steps, repeats, size)
    record("0 LoRAs", ms_per_step=none * 1000)
    mixer = LoraMixer(base)
    names = [mixer.load(files[0], 0.8)]
    for label in ("1 LoRA", "3 LoRAs"):
        if label == "3 LoRAs":
            names += [mixer.load(files[1], 0.5), mixer.load(files[2], 0.3)]
        t = step_time(pipe, device, steps, repeats, size)
        record(f"{label} unfused", ms_per_step=t * 1000, vs_none=t / none - 1)
        with mixer.fused():
            t = step_time(pipe, device, steps, repeats, size)
        record(f"{label} fused", ms_per_step=t * 1000, vs_none=t / none - 1)
    # changing strengths with the base kept: unfused (in place, before the next step) and fused (unfuse, refuse)
    change = []
    for k in range(5):
        sync(device)
        t = time.perf_counter()
        for n, s in zip(names, (0.6 + 0.05 * k, 0.4, 0.2)):
            mixer.set_strength(n, s)
        sync(device)
        change.append(time.perf_counter() - t)
    record("change 3 strengths, unfused", ms=statistics.median(change) * 1000)
    fused = []
    mixer.fuse()
    for k in range(5):
        sync(device)
        t = time.perf_counter()
        mixer.unfuse()
        for n, s in zip(names, (0.7 - 0.05 * k, 0.4, 0.2)):
            mixer.set_strength(n, s)
        mixer.fuse()
        sync(device)
        fused.append(time.perf_counter() - t)
    mixer.unfuse()
    record("change 3 strengths, fused (unfuse + set + fuse)", ms=statistics.median(fused) * 1000)
    t = step_time(pipe, device, steps, repeats, size)
    record("3 LoRAs unfused, after the strength changes", ms_per_step=t * 1000, vs_none=t / none - 1)
    for n in names:
        mixer.remove(n)
    t = step_time(pipe, device, steps, repeats, size)
    record("0 LoRAs after removing all (empty hosts left)", ms_per_step=t * 1000, vs_none=t / none - 1)


def bench_interleaved(base, pipe, files: list[Path], device: torch.device, steps: int, rounds: int, size: int, record) -> None:
    """The cases in turns, so drift cancels out of the paired ratios (see the module docstring)."""
    from sdlora.lora.mixer import LoraMixer

    mixer = LoraMixer(base)
    strengths = (0.8, 0.5, 0.3)

    def state(case: str) -> None:
        mixer.unfuse()
        for n in list(mixer.loaded):
            mixer.remove(n)
        count = {"0 LoRAs": 0, "1 LoRA unfused": 1}.get(case, 3)
        for f, s in zip(files[:count], strengths):
            mixer.load(f, s)
        if case.endswith("fused") and not case.endswith("unfused"):
            mixer.fuse()

    cases = ("0 LoRAs", "1 LoRA unfused", "3 LoRAs unfused", "3 LoRAs fused")
    times: dict[str, list[float]] = {c: [] for c in cases}
    for _ in range(rounds):
        for case in cases:
            state(case)
            times[case].append(step_time(pipe, device, steps, 1, size))  # its first call recaptures and warms up
    state("0 LoRAs")
    none = times["0 LoRAs"]
    for case in cases:
        paired = [t / n - 1 for t, n in zip(times[case], none)]
        record(f"interleaved: {case}", ms_per_step=statistics.median(times[case]) * 1000, vs_none=statistics.median(paired),
               vs_none_min=min(paired), vs_none_max=max(paired), rounds=rounds)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", required=True)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--small", action="store_true", help="a tiny model of the same layout (CPU smoke test)")
    ap.add_argument("--family", default="sd15", choices=["sd15", "sdxl"])
    ap.add_argument("--steps", type=int, help="denoising steps per image (default 20; SDXL: 30)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--targets", help="LoRA layouts to try, comma-separated (default cross-attn,all-linear; SDXL: all-linear)")
    ap.add_argument("--modes", help="graph: UNet replayed from CUDA graphs (the default); eager (default graph,eager; SDXL: graph)")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--interleave", type=int, default=0, help="rounds of the interleaved comparison (0: skip it)")
    ap.add_argument("--work")
    args = ap.parse_args(argv)
    sdxl = args.family == "sdxl"
    for key, sd15, xl in (("steps", 20, 30), ("targets", "cross-attn,all-linear", "all-linear"), ("modes", "graph,eager", "graph")):
        if getattr(args, key) is None:
            setattr(args, key, xl if sdxl else sd15)
    from sdlora.models.base import load_base
    from sdlora.sample.unet_graph import graphed_unet

    device = torch.device(args.device)
    env = environment(device, argv) | {"family": args.family}
    print(json.dumps(env), flush=True)
    work = Path(args.work or tempfile.mkdtemp(prefix="bench-gen-"))
    folder = random_base(work, device, args.small, args.family)
    size = native_size(args.family, args.small)
    precision = ("bf16" if sdxl else "fp16") if device.type == "cuda" else "fp32"  # random SDXL weights overflow fp16
    results: dict = {"env": env, "rows": []}
    for mode in args.modes.split(","):
        for targets in args.targets.split(","):
            def record(case: str, mode=mode, targets=targets, **kw) -> None:
                row = {"case": case, "mode": mode, "targets": targets, **kw}
                if "ms_per_step" in kw:
                    row["ms_per_image"] = kw["ms_per_step"] * args.steps
                results["rows"].append(row)
                print(json.dumps(row), flush=True)
                Path(args.json).write_text(json.dumps(results, indent=2) + "\n")

            base = load_base(str(folder), precision, device)
            pipe = base.pipeline()
            files = [random_lora(base, work / f"{targets}-{i}.safetensors", targets, args.rank, i) for i in range(3)]
            with graphed_unet(base.unet, mode == "graph"):
                bench_layout(base, pipe, files, device, args.steps, args.repeats, size, record)
                if args.interleave:
                    bench_interleaved(base, pipe, files, device, args.steps, args.interleave, size, record)
            del base, pipe
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return results


if __name__ == "__main__":
    main()
