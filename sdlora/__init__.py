"""sdlora: train and mix Stable Diffusion style LoRAs in the community (kohya) format."""

__version__ = "0.1.0"
