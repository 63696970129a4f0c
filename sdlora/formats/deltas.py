"""Adapter modules that are not a plain down/up pair: LyCORIS LoHa and LoKr, Tucker LoCon (`lora_mid`), DoRA and full
`.diff` weights. Each is reduced to the full update ΔW of its layer, computed on demand, because that is the one form
every type shares; the layer then adds strength * ΔW exactly as for a LoRA (the way ComfyUI merges them).

Formulas (r = the factor's rank, scale = alpha / r, alpha missing or 0 means scale 1 as in ComfyUI/LyCORIS):
  LoHa   ΔW = scale * (w1_a @ w1_b) ⊙ (w2_a @ w2_b)     (with hada_t1/t2, each factor is a Tucker product)
  LoKr   ΔW = scale * kron(w1, w2), w1 = lokr_w1 or w1_a @ w1_b, w2 = lokr_w2 or w2_a @ w2_b (or Tucker with lokr_t2);
         r is the rank of the decomposed factor (scale 1 when both are full)
  Tucker ΔW[o,i,k,l] = scale * Σ up[o,a] mid[a,b,k,l] down[b,i]
  diff   ΔW = diff
  DoRA   V = W + scale * up @ down; W' = m ⊙ V / ‖V‖; ΔW = W' - W, so strength s gives W + s (W' - W) and s = 1 is
         exactly the DoRA weight. The norm axis follows dora_scale's shape: [out, 1, ...] or 1-D [out] is one
         magnitude per output row (LyCORIS since 2025-04, peft's lora_magnitude_vector); [1, in, ...] is one per
         input column (older LyCORIS files, as ComfyUI/A1111 read them). The chosen axis is kept in `orientation`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from sdlora.errors import SdloraError


def compose_lora(up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """up @ down (unscaled) in the layer weight's layout: [out, in], or [out, in, k, k] for a conv (kxk down, 1x1 up)."""
    if down.dim() == 2:
        return up.flatten(1) @ down
    if down.shape[2:] == (1, 1):
        return (up.flatten(1) @ down.flatten(1)).reshape(up.shape[0], down.shape[1], 1, 1)
    return torch.einsum("or,rikl->oikl", up.flatten(1), down)  # kxk down then 1x1 up: compose the kernels


# What each family needs, as key suffixes (the kohya module name comes before them).
LOHA = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")
DELTA_SUFFIXES = {
    *LOHA, "hada_t1", "hada_t2",
    "lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2",
    "lora_mid.weight", "diff", "dora_scale",
}


def family_of(parts: set[str]) -> str:
    """Name of the adapter type a module's keys belong to (the names inspect and error messages use)."""
    if any(p.startswith("hada_") for p in parts):
        return "LoHa"
    if any(p.startswith("lokr_") for p in parts):
        return "LoKr"
    if "diff" in parts:
        return "full diff"
    if "dora_scale" in parts:
        return "DoRA"
    if "mid" in parts:
        return "LoCon (Tucker)"
    return "LoRA"


def _tucker(t: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """[out, in, k, k] from a core t [r1, r2, k, k], a [r1, out] and b [r2, in] (LyCORIS' Tucker layout)."""
    return torch.einsum("ijkl,ip,jr->prkl", t, a.flatten(1), b.flatten(1))


def _mat(t: torch.Tensor) -> torch.Tensor:
    return t.flatten(1) if t.dim() > 2 else t


@dataclass
class DeltaWeights:
    """One non-LoRA module of a file: its fp32 tensors by key suffix, and its alpha (None when the file has none)."""

    kind: str  # "LoHa", "LoKr", "DoRA", "LoCon (Tucker)", "full diff"
    tensors: dict[str, torch.Tensor]
    alpha: float | None = None

    def _require(self, name: str, *keys: str) -> None:
        missing = [k for k in keys if k not in self.tensors]
        if missing:
            shown = [{"down": "lora_down.weight", "up": "lora_up.weight"}.get(k, k) for k in missing]
            raise SdloraError(f"incomplete {self.kind} module {name}: missing {', '.join(shown)}")

    def validate(self, name: str) -> None:
        """Refuse a module whose keys do not make a complete update (one line naming what is missing)."""
        t = self.tensors
        if self.kind == "LoHa":
            self._require(name, *LOHA)
        elif self.kind == "LoKr":
            if "lokr_w1" not in t:
                self._require(name, "lokr_w1_a", "lokr_w1_b")
            if "lokr_w2" not in t:
                self._require(name, "lokr_w2_a", "lokr_w2_b")
        elif self.kind in ("DoRA", "LoCon (Tucker)"):
            self._require(name, "down", "up")
        if self.kind in ("DoRA", "LoCon (Tucker)") and t["up"].shape[1] != t["down"].shape[0]:
            raise SdloraError(f"rank mismatch in {self.kind} module {name}: down {list(t['down'].shape)}, up {list(t['up'].shape)}")
        try:
            n = self.numel()
        except (IndexError, KeyError) as exc:
            raise SdloraError(f"malformed {self.kind} module {name}: unexpected tensor shapes") from exc
        if n <= 0:
            raise SdloraError(f"malformed {self.kind} module {name}: empty update")

    @property
    def rank(self) -> int | None:
        """The rank alpha is divided by, or None where the type has none (full factors, diff, DoRA magnitude)."""
        t = self.tensors
        if self.kind == "LoHa":
            return int(t["hada_w1_b"].shape[0])
        if self.kind == "LoKr":
            for k in ("lokr_w1_b", "lokr_w2_b"):
                if k in t:
                    return int(t[k].shape[0])
            return None
        if "down" in t:
            return int(t["down"].shape[0])
        return None

    @property
    def scale(self) -> float:
        r = self.rank
        return 1.0 if r is None or not self.alpha else self.alpha / r

    @property
    def orientation(self) -> str | None:
        """DoRA only: 'output' (one magnitude per output row) or 'input' (one per input column)."""
        if self.kind != "DoRA":
            return None
        m = self.tensors["dora_scale"]
        return "input" if m.dim() > 1 and m.shape[0] == 1 and m.shape[1] != 1 else "output"

    def out_features(self) -> int:
        t = self.tensors
        if self.kind == "LoHa":  # Tucker factors are stored [rank, out]
            return int(t["hada_w1_a"].shape[1 if "hada_t1" in t else 0])
        if self.kind == "LoKr":
            w1 = t["lokr_w1"].shape[0] if "lokr_w1" in t else t["lokr_w1_a"].shape[0]
            w2 = t["lokr_w2"].shape[0] if "lokr_w2" in t else t["lokr_w2_a"].shape[1 if "lokr_t2" in t else 0]
            return int(w1 * w2)
        if self.kind == "full diff":
            return int(t["diff"].shape[0])
        return int(t["up"].shape[0])

    def numel(self) -> int:
        """Number of elements of ΔW, from shapes alone (so fitting a layer needs no computation)."""
        t = self.tensors
        if self.kind == "full diff":
            return t["diff"].numel()
        if self.kind == "LoHa":
            kernel = math.prod(t["hada_t1"].shape[2:]) if "hada_t1" in t else 1
            return self.out_features() * int(t["hada_w1_b"].shape[1]) * kernel
        if self.kind == "LoKr":
            w1 = t["lokr_w1"].numel() if "lokr_w1" in t else t["lokr_w1_a"].shape[0] * t["lokr_w1_b"].shape[1]
            if "lokr_w2" in t:
                w2 = t["lokr_w2"].numel()
            else:
                kernel = math.prod(t["lokr_t2"].shape[2:]) if "lokr_t2" in t else 1
                w2 = t["lokr_w2_a"].shape[1 if "lokr_t2" in t else 0] * _mat(t["lokr_w2_b"]).shape[1] * kernel
            return int(w1 * w2)
        kernel = math.prod(t["mid"].shape[2:]) if "mid" in t else math.prod(t["down"].shape[2:])
        return self.out_features() * int(t["down"].shape[1]) * kernel

    def fits(self, weight_shape: torch.Size) -> bool:
        return self.out_features() == weight_shape[0] and self.numel() == math.prod(weight_shape)

    def delta(self, base_weight: torch.Tensor) -> torch.Tensor:
        """ΔW in the base weight's shape, fp32, on the base weight's device (DoRA reads the base weight)."""
        t = {k: v.to(base_weight.device, torch.float32) for k, v in self.tensors.items()}
        shape = base_weight.shape
        if self.kind == "full diff":
            return t["diff"].reshape(shape)
        if self.kind == "LoHa":
            if "hada_t1" in t and "hada_t2" in t:
                w1 = _tucker(t["hada_t1"], t["hada_w1_a"], t["hada_w1_b"])
                w2 = _tucker(t["hada_t2"], t["hada_w2_a"], t["hada_w2_b"])
            else:
                w1 = t["hada_w1_a"] @ _mat(t["hada_w1_b"])
                w2 = t["hada_w2_a"] @ _mat(t["hada_w2_b"])
            return (w1 * w2 * self.scale).reshape(shape)
        if self.kind == "LoKr":
            w1 = t["lokr_w1"] if "lokr_w1" in t else t["lokr_w1_a"] @ t["lokr_w1_b"]
            if "lokr_w2" in t:
                w2 = t["lokr_w2"]
            elif "lokr_t2" in t:
                w2 = _tucker(t["lokr_t2"], t["lokr_w2_a"], t["lokr_w2_b"])
            else:
                w2 = t["lokr_w2_a"] @ _mat(t["lokr_w2_b"])
                if len(shape) == 4:  # a flattened conv factor: back to [out2, in2, k, k]
                    w2 = w2.reshape(w2.shape[0], -1, *shape[2:])
            while w1.dim() < w2.dim():
                w1 = w1.unsqueeze(-1)
            return (torch.kron(w1, w2) * self.scale).reshape(shape)
        up, down = t["up"].flatten(1), t["down"]
        if self.kind == "LoCon (Tucker)":
            return (_tucker(t["mid"], up.T, down) * self.scale).reshape(shape)
        # DoRA: a plain LoRA update, then the weight renormalised to the stored magnitude.
        lora = compose_lora(up, down)
        w = base_weight.float()
        v = w + self.scale * lora.reshape(shape)
        m = t["dora_scale"]
        if self.orientation == "output":
            norm = v.flatten(1).norm(dim=1).reshape(-1, *[1] * (v.dim() - 1))
            m = m.reshape(norm.shape)
        else:
            norm = v.transpose(0, 1).flatten(1).norm(dim=1).reshape(1, -1, *[1] * (v.dim() - 2))
            m = m.reshape(norm.shape)
        return m * v / norm - w
