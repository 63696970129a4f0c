"""sdlora: train and mix Stable Diffusion style LoRAs in the community (kohya) format.

The public API is imported lazily so `sdlora --help` does not pay for torch and diffusers.
"""

__version__ = "0.1.0"

_API = {
    "train": "sdlora.train",
    "TrainResult": "sdlora.train",
    "TrainConfig": "sdlora.config",
    "make_config": "sdlora.config",
    "load_base": "sdlora.base",
    "BaseModel": "sdlora.base",
    "LoraMixer": "sdlora.mixer",
    "generate_images": "sdlora.generate",
    "load_adapter": "sdlora.adapter_file",
    "save_adapter": "sdlora.adapter_file",
    "SdloraError": "sdlora.errors",
}
__all__ = list(_API)


def __getattr__(name: str):
    if name in _API:
        import importlib

        return getattr(importlib.import_module(_API[name]), name)
    raise AttributeError(f"module 'sdlora' has no attribute {name!r}")
