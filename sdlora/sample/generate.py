"""Image generation on a loaded base (with whatever LoRAs a mixer attached), and A1111 prompt tags."""

from __future__ import annotations

import re
from pathlib import Path

import torch
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from sdlora.errors import SdloraError
from sdlora.lora.mixer import LoraSpec
from sdlora.models.base import BaseModel

LORA_TAG = re.compile(r"<lora:([^:>]+)((?::[^:>]*)*)>")


@torch.no_grad()
def generate_images(
    base: BaseModel,
    prompt: str,
    negative: str = "",
    seed: int = 0,
    steps: int = 20,
    guidance: float = 7.5,
    width: int | None = None,
    height: int | None = None,
    num_images: int = 1,
    scheduler: str | None = None,
    cuda_graph: bool = True,
) -> list[Image.Image]:
    """Image i uses seed + i on a CPU generator, so results do not depend on batch size or device.

    On a GPU the UNet steps are replayed from CUDA graphs (sdlora/unet_graph.py) unless cuda_graph is False.
    """
    from sdlora.sample.unet_graph import graphed_unet

    size = base.resolution
    width, height = width or size, height or size
    if width % 8 or height % 8:
        raise SdloraError("--width and --height must be multiples of 8")
    pipe = base.pipeline(scheduler)
    generators = [torch.Generator("cpu").manual_seed(seed + i) for i in range(num_images)]
    latents = torch.stack(
        [torch.randn((4, height // base.vae_scale_factor, width // base.vae_scale_factor), generator=g) for g in generators]
    ).to(base.unet.device, base.unet.dtype)
    with graphed_unet(base.unet, cuda_graph):
        out = pipe(
            [prompt] * num_images,
            negative_prompt=[negative] * num_images if negative else None,
            num_inference_steps=steps,
            guidance_scale=guidance,
            width=width,
            height=height,
            latents=latents,
            output_type="latent",
        ).images
    # Decode ourselves: under fp16 the VAE stays fp32 (SD VAEs overflow in fp16), which the pipeline does not handle.
    vae = base.vae
    pixels = vae.decode(out.to(vae.device, vae.dtype) / vae.config.scaling_factor).sample
    return pipe.image_processor.postprocess(pixels.float(), output_type="pil")


def extract_prompt_loras(prompt: str, lora_dir: str | Path | None) -> tuple[str, list[LoraSpec]]:
    """Take A1111's `<lora:NAME:MULT>` / `<lora:NAME:TE:UNET>` / `te=`/`unet=` tags out of a prompt."""
    specs = []
    for m in LORA_TAG.finditer(prompt):
        name, rest = m.group(1).strip(), [p.strip() for p in m.group(2).split(":")[1:]]
        named = {p.split("=", 1)[0]: p.split("=", 1)[1] for p in rest if "=" in p}
        positional = [p for p in rest if "=" not in p]
        try:
            te = float(named.get("te", positional[0] if positional else 1.0))
            unet = float(named.get("unet", positional[1] if len(positional) > 1 else te))
        except ValueError:
            raise SdloraError(f"bad multiplier in prompt tag {m.group(0)}") from None
        specs.append(LoraSpec(str(find_lora(name, lora_dir)), unet, te))
    clean = re.sub(r"\s*,\s*,", ",", LORA_TAG.sub("", prompt)).strip(" ,")
    return clean, specs


def find_lora(name: str, lora_dir: str | Path | None) -> Path:
    """By file stem, then by the `ss_output_name` alias, as A1111 resolves tags."""
    if lora_dir is None:
        raise SdloraError(f"the prompt uses <lora:{name}:...> but no --lora-dir was given to look it up in")
    root = Path(lora_dir)
    if not root.is_dir():
        raise SdloraError(f"--lora-dir not found: {root}")
    files = sorted(root.rglob("*.safetensors"))
    for f in files:
        if f.stem == name:
            return f
    from safetensors import safe_open

    for f in files:
        try:
            with safe_open(str(f), "pt") as fh:
                if (fh.metadata() or {}).get("ss_output_name") == name:
                    return f
        except Exception:
            continue
    raise SdloraError(f"<lora:{name}> not found in {root} (looked for {name}.safetensors and ss_output_name)")


def save_images(images: list[Image.Image], folder: Path, stem: str, parameters: str) -> list[Path]:
    """PNG files with A1111-style `parameters` text, so the settings travel with the image."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, img in enumerate(images):
        info = PngInfo()
        info.add_text("parameters", parameters)
        p = folder / f"{stem}-{i}.png"
        k = 1
        while p.exists():
            p = folder / f"{stem}-{i}-{k}.png"
            k += 1
        img.save(p, pnginfo=info)
        paths.append(p)
    return paths
