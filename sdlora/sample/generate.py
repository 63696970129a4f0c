"""Image generation on a loaded base (with whatever LoRAs a mixer attached), and saving the images."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from sdlora.errors import SdloraError
from sdlora.lora.blocks import format_block_weights
from sdlora.lora.specs import LoraSpec
from sdlora.models.base import BaseModel


@dataclass
class GenerateOptions:
    """What one `sdlora generate` call asks for; image i uses seed + i."""

    prompt: str
    negative: str = ""
    seed: int = 0
    steps: int = 20
    guidance: float = 7.5
    width: int | None = None  # None: the base's native size
    height: int | None = None
    num_images: int = 1
    scheduler: str | None = None
    cuda_graph: bool = True
    prompts: list[str] | None = None  # one image per entry instead (batched evals); image i uses seed + i still


def generate_images(base: BaseModel, prompt: str, negative: str = "", seed: int = 0, steps: int = 20,
                    guidance: float = 7.5, width: int | None = None, height: int | None = None, num_images: int = 1,
                    scheduler: str | None = None, cuda_graph: bool = True,
                    on_step: Callable[[int], None] | None = None) -> list[Image.Image]:
    """Images from the base with whatever LoRAs a mixer attached (the public API; see GenerateOptions)."""
    return generate(base, GenerateOptions(prompt, negative, seed, steps, guidance, width, height, num_images, scheduler,
                                          cuda_graph), on_step)


@torch.no_grad()
def generate(base: BaseModel, opts: GenerateOptions, on_step: Callable[[int], None] | None = None) -> list[Image.Image]:
    """Image i uses seed + i on a CPU generator, so results do not depend on batch size or device.

    On a GPU the UNet steps are replayed from CUDA graphs (sdlora/sample/unet_graph.py) unless opts.cuda_graph is off.
    Prompts over 77 tokens are encoded in 75-token chunks (sdlora/sample/prompts.py). Sampling stops with an error
    as soon as the latents hold NaN or inf, rather than decoding a black image. `on_step(i)` is called after each
    sampling step (progress bars).
    """
    from sdlora.sample.prompts import long_prompt_embeds
    from sdlora.sample.unet_graph import graphed_unet

    size = base.resolution
    width, height = opts.width or size, opts.height or size
    if width % 8 or height % 8:
        raise SdloraError("--width and --height must be multiples of 8")
    prompts = list(opts.prompts) if opts.prompts else [opts.prompt] * opts.num_images
    n, negatives = len(prompts), [opts.negative] * len(prompts)
    pipe = base.pipeline(opts.scheduler)
    channels, f = base.unet.config.in_channels, base.vae_scale_factor
    generators = [torch.Generator("cpu").manual_seed(opts.seed + i) for i in range(n)]
    latents = torch.stack([torch.randn((channels, height // f, width // f), generator=g) for g in generators])
    text = long_prompt_embeds(base, prompts, negatives) or base.family.prompt_kwargs(base, prompts, negatives)

    def check_step(_pipe, i: int, _t, tensors: dict) -> dict:
        if not bool(torch.isfinite(tensors["latents"]).all()):
            raise SdloraError(f"sampling stopped at step {i + 1} of {opts.steps}: the latents became NaN or infinite "
                              "(a LoRA strength too high, or a broken base/adapter); no image was written")
        if on_step:
            on_step(i)
        return {}

    with graphed_unet(base.unet, opts.cuda_graph):
        out = pipe(
            **text,
            num_inference_steps=opts.steps,
            guidance_scale=opts.guidance,
            width=width,
            height=height,
            latents=latents.to(base.unet.device, base.unet.dtype),
            output_type="latent",
            callback_on_step_end=check_step,
        ).images
    return decode_latents(base, out, pipe.image_processor)


def decode_latents(base: BaseModel, latents: torch.Tensor, image_processor) -> list[Image.Image]:
    """Decode with the VAE in its own dtype: under fp16 it stays fp32 (SD VAEs overflow), which pipelines ignore."""
    vae = base.vae
    pixels = vae.decode(latents.to(vae.device, vae.dtype) / vae.config.scaling_factor).sample
    if not bool(torch.isfinite(pixels).all()):
        raise SdloraError("the VAE decoded NaN or infinite pixels (an fp16 overflow?); try --precision fp32")
    return image_processor.postprocess(pixels.float(), output_type="pil")


def a1111_parameters(opts: GenerateOptions, model: str, specs: list[LoraSpec]) -> str:
    """A1111's `parameters` text for the PNGs, so the settings travel with the image."""
    loras = ", ".join(f"{Path(s.path).stem}:{s.strength}" + (f":lbw={format_block_weights(s.blocks)}" if s.blocks else "")
                      for s in specs)
    return (f"{opts.prompt}\nNegative prompt: {opts.negative}\nSteps: {opts.steps}, Sampler: {opts.scheduler or 'dpm++'}, "
            f"CFG scale: {opts.guidance}, Seed: {opts.seed}, Model: {model}" + (f", LoRAs: {loras}" if loras else ""))


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
