"""sdlora: train and mix Stable Diffusion style LoRAs in the community (kohya) format.

The public API is imported lazily so `sdlora --help` does not pay for torch and diffusers.
"""

__version__ = "0.1.0"

_API = {
    "train": "sdlora.training.loop",
    "TrainResult": "sdlora.training.loop",
    "TrainConfig": "sdlora.training.config",
    "make_config": "sdlora.training.config",
    "load_base": "sdlora.models.base",
    "BaseModel": "sdlora.models.base",
    "LoraMixer": "sdlora.lora.mixer",
    "generate_images": "sdlora.sample.generate",
    "load_adapter": "sdlora.formats.kohya",
    "save_adapter": "sdlora.formats.kohya",
    "SdloraError": "sdlora.errors",
}
__all__ = list(_API)


def __getattr__(name: str):
    if name in _API:
        import importlib

        return getattr(importlib.import_module(_API[name]), name)
    raise AttributeError(f"module 'sdlora' has no attribute {name!r}")
