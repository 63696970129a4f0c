"""The network's shape: what injection builds and what the file's metadata says, read from one place."""

from __future__ import annotations

from dataclasses import dataclass

from sdlora.lora.targets import parse_targets


@dataclass(frozen=True)
class NetworkSpec:
    rank: int = 4
    alpha: float | None = None  # None or 0: alpha = rank (kohya's rule)
    conv_rank: int | None = None  # kxk convs (LoCon); None: the main rank/alpha
    conv_alpha: float | None = None
    targets: str = "cross-attn"  # comma list of presets (sdlora/lora/targets.py)
    text_encoder: bool = True
    te_mlp: bool = False
    init: str = "kaiming"

    def conv_dims(self) -> tuple[int, float]:
        """(rank, alpha) of kxk conv LoRAs; without a conv rank they behave like every other layer."""
        if self.conv_rank is None:
            return self.rank, float(self.conv_alpha or self.alpha or self.rank)
        return self.conv_rank, float(self.conv_alpha or self.conv_rank)

    @property
    def uses_conv(self) -> bool:
        return "conv" in parse_targets(self.targets)

    def network_args(self) -> dict[str, object]:
        """kohya's ss_network_args: how the network was built, beside the dims read from the modules."""
        args: dict[str, object] = {"targets": self.targets, "text_encoder": self.text_encoder, "te_mlp": self.te_mlp}
        if self.uses_conv:
            rank, alpha = self.conv_dims()
            args |= {"conv_dim": str(rank), "conv_alpha": f"{alpha:g}"}
        return args
