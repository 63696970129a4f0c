"""What the benchmark scripts share: device sync and freeing, the environment record, the random bases, and the
driver's view of GPU memory."""

from __future__ import annotations

import gc
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def driver_view(device: torch.device) -> dict:
    """The allocator's reserved peak (caches and graph pools included) and the device memory in use as the driver
    sees it (CUDA context and every process included), at the end of a case."""
    if device.type != "cuda":
        return {}
    free_b, total_b = torch.cuda.mem_get_info(device)
    return {"reserved_peak_gib": torch.cuda.max_memory_reserved(device) / 2**30, "driver_used_gib": (total_b - free_b) / 2**30}


def environment(device: torch.device, argv: list[str] | None) -> dict:
    """What a benchmark row depends on, recorded beside it."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    return {"date": time.strftime("%Y-%m-%d"), "device": name, "torch": torch.__version__, "python": platform.python_version(),
            "argv": sys.argv[1:] if argv is None else argv}


def random_base(work: Path, device: torch.device, small: bool, family: str = "sd15") -> Path:
    """The random-weight SD1.5- (work/base) or SDXL-layout folder (work/base-sdxl), written once and reused."""
    folder = work / ("base" if family == "sd15" else "base-sdxl")
    if not (folder / "model_index.json").exists():
        if family == "sd15":
            from make_random_sd15 import write_random_base

            write_random_base(folder, torch.float16, device.type, small=small)
        else:
            from make_random_sdxl import write_random_sdxl

            write_random_sdxl(folder, torch.bfloat16 if device.type == "cuda" else torch.float32, device.type, small=small)
    return folder


def native_size(family: str, small: bool) -> int:
    """Training/generation size in pixels: 512 (SD1.5) or 1024 (SDXL); 64 for the small models."""
    return 64 if small else {"sd15": 512, "sdxl": 1024}[family]


def loaded_random_base(work: Path, device: torch.device, small: bool, family: str = "sd15"):
    """(base, folder, latent side): the random base loaded as `sdlora train` holds it (bf16 on a GPU, VAE off the
    device once latents are cached)."""
    from sdlora.models.base import load_base

    folder = random_base(work, device, small, family)
    base = load_base(str(folder), "bf16" if device.type == "cuda" else "fp32", "cpu")
    base.unet.to(device)
    for te in base.text_encoders.values():
        te.to(device)
    return base, folder, native_size(family, small) // 8


class DriverPeak:
    """Samples a child process's GPU memory as the driver reports it while it runs: nvidia-smi's per-process figure
    where the PID is visible, and the device's used memory (mem_get_info) above what it was at the start."""

    def __init__(self, pid: int, device: torch.device, every_s: float = 0.2):
        import threading

        self.pid, self.device, self.every = pid, device, every_s
        self.proc = self.delta = None
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> DriverPeak:
        if self.device.type == "cuda":
            free_b, total_b = torch.cuda.mem_get_info(self.device)
            self.start_used = total_b - free_b
            self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        if self.thread.is_alive():
            self.thread.join()

    def _run(self) -> None:
        import shutil

        smi = shutil.which("nvidia-smi")
        while not self.stop.wait(self.every):
            free_b, total_b = torch.cuda.mem_get_info(self.device)
            self.delta = max(self.delta or 0, total_b - free_b - self.start_used)
            if smi:
                q = subprocess.run([smi, "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
                                   capture_output=True, text=True)
                for line in q.stdout.splitlines():
                    pid, _, mib = line.partition(",")
                    if pid.strip() == str(self.pid) and mib.strip().isdigit():
                        self.proc = max(self.proc or 0, int(mib) * 2**20)

    def result(self) -> dict:
        if self.device.type != "cuda":
            return {}
        gib = lambda b: None if b is None else b / 2**30  # noqa: E731
        return {"driver_peak_gib_process": gib(self.proc), "driver_peak_gib_device_delta": gib(self.delta)}


def xformers_status() -> str:
    try:
        import xformers.ops as xops

        q = torch.randn(1, 16, 1, 40, device="cuda", dtype=torch.float16)
        xops.memory_efficient_attention(q, q, q)
        import xformers

        return f"loads and runs ({xformers.__version__})"
    except ImportError as e:
        return f"not importable ({str(e).splitlines()[0][:120]})"
    except Exception as e:  # installed but its kernels do not match this torch/CUDA
        return f"imports but fails ({type(e).__name__}: {str(e).splitlines()[0][:120]})"
