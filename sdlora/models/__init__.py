"""Base models: `load_base` and the registry of model families.

A diffusers folder is matched to the first family whose `matches` accepts its components; single files are
recognised by their keys (sdlora/models/single_file_sgm.py: classify).
"""

from __future__ import annotations

from pathlib import Path

from sdlora.errors import SdloraError
from sdlora.models.family import ModelFamily
from sdlora.models.sd1 import SD1Family
from sdlora.models.sdxl import SDXLFamily

# One line per family, most specific first.
FAMILIES: list[type[ModelFamily]] = [SDXLFamily, SD1Family]


def family_of_folder(name: str, path: Path) -> type[ModelFamily]:
    """The family of a diffusers folder, from the components its model_index.json lists."""
    from sdlora.models.base import read_index

    components = {k for k in read_index(path) if not k.startswith("_")}
    for family in FAMILIES:
        if family.matches(components):
            return family
    raise SdloraError(f"{name}: no supported model family has these components ({', '.join(sorted(components))}); "
                      "sdlora trains SD 1.x, SD 2.x and SDXL bases")


def __getattr__(name: str):
    if name in ("load_base", "BaseModel"):  # lazily, so importing the registry stays light
        from sdlora.models import base

        return getattr(base, name)
    raise AttributeError(name)
