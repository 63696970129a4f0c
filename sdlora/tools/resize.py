"""Rank reduction of LoRA modules by SVD (`sdlora resize`, and `sdlora merge --rank`).

Each module's update up @ down has rank <= r, so its SVD comes from two thin QRs and an r x r SVD: exact, and
fast even for SD1.5's 3x3 convs ([1280, 11520] as a matrix). Alphas follow kohya's resize_lora rule: the new
alpha keeps the module's alpha/rank scale, so the file reads the same way in every consumer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from sdlora.errors import SdloraError
from sdlora.formats.detect import canonical_modules, names_for
from sdlora.formats.kohya import AdapterFile, ModuleWeights, load_adapter, save_adapter
from sdlora.formats.metadata import apply_dims, rank_label
from sdlora.util import torch_dtype


@dataclass
class ReduceReport:
    """What a rank reduction kept and lost, measured on the factors as written (save dtype included)."""

    ranks: dict[str, int] = field(default_factory=dict)
    energy: dict[str, float] = field(default_factory=dict)  # kept sum S^2 / total sum S^2, per module
    errors: dict[str, float] = field(default_factory=dict)  # ||dW - dW'||_F / ||dW||_F, per module
    error_sq: float = 0.0  # sums over modules, for the overall relative error
    norm_sq: float = 0.0

    @property
    def rel_error(self) -> float:
        """Relative Frobenius error over all modules together."""
        return math.sqrt(self.error_sq / self.norm_sq) if self.norm_sq > 0 else 0.0

    @property
    def worst(self) -> tuple[str, float]:
        name = max(self.errors, key=self.errors.get)
        return name, self.errors[name]

    def summary(self) -> str:
        name, worst = self.worst
        energies = list(self.energy.values())
        return (f"retained energy mean {sum(energies) / len(energies):.4f}, min {min(energies):.4f}; relative Frobenius "
                f"error overall {self.rel_error:.3g}, worst {worst:.3g} ({name})")


def as_matrices(m: ModuleWeights) -> tuple[torch.Tensor, torch.Tensor]:
    """(up [out, r], down [r, in*k*k]): a conv LoRA's delta is up @ down reshaped to the kernel."""
    return m.up.flatten(1), m.down.flatten(1)


def delta_matrix(m: ModuleWeights) -> torch.Tensor:
    """The update the module applies, (alpha/rank) * up @ down, as an [out, in*k*k] fp64 matrix."""
    up, down = as_matrices(m)
    return m.scale * (up.double() @ down.double())


def lowrank_svd(up: torch.Tensor, down: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """U, S, Vh of up @ down (fp64) without forming the product: QR both factors, SVD the small core."""
    qu, ru = torch.linalg.qr(up.double())
    qd, rd = torch.linalg.qr(down.double().T)
    um, s, vmh = torch.linalg.svd(ru @ rd.T, full_matrices=False)
    return qu @ um, s, vmh @ qd.T


def _frob_sq(up: torch.Tensor, down: torch.Tensor) -> float:
    """||up @ down||_F^2 through the small Gram matrices (no [out, in] product)."""
    return float(((up.T @ up) * (down @ down.T)).sum().clamp_min(0))


def energy_rank(s: torch.Tensor, energy: float) -> int:
    """Smallest k whose top-k singular values keep `energy` of sum S^2 (at least 1)."""
    sq = s.double() ** 2
    total = float(sq.sum())
    if total == 0.0:
        return 1
    kept = torch.cumsum(sq, 0) / total
    return int(min(int((kept < energy - 1e-12).sum()) + 1, len(s)))


def reduce_module(m: ModuleWeights, rank: int | None, energy: float | None, dtype: torch.dtype,
                  report: ReduceReport, name: str) -> ModuleWeights:
    """One module re-factorised to `rank` (or to the `energy` rank), sqrt(S) on each side, alpha/rank kept."""
    up, down = as_matrices(m)
    u, s, vh = lowrank_svd(up, down)
    k = energy_rank(s, energy) if energy is not None else min(rank, len(s))
    root = s[:k].sqrt()
    new_up, new_down = (u[:, :k] * root).float(), (root[:, None] * vh[:k]).float()
    alpha = m.scale * k
    # Measure what the file will hold: factors and alpha rounded to the save dtype.
    q_up, q_down = new_up.to(dtype).double(), new_down.to(dtype).double()
    q_scale = float(torch.tensor(alpha, dtype=dtype)) / k
    a = m.scale * up.double()  # the scale on one side: delta = a @ down
    err_sq = _frob_sq(torch.cat([a, -q_scale * q_up], 1), torch.cat([down.double(), q_down], 0))
    norm_sq = _frob_sq(a, down.double())
    sq = s.double() ** 2
    report.ranks[name] = k
    report.energy[name] = float(sq[:k].sum() / sq.sum()) if float(sq.sum()) > 0 else 1.0
    report.errors[name] = math.sqrt(err_sq / norm_sq) if norm_sq > 0 else 0.0
    report.error_sq += err_sq
    report.norm_sq += norm_sq
    if m.down.dim() == 4:
        new_down = new_down.reshape(k, *m.down.shape[1:])
        new_up = new_up.reshape(new_up.shape[0], k, 1, 1)
    return ModuleWeights(down=new_down, up=new_up, alpha=alpha)


def reduce_modules(modules: dict[str, ModuleWeights], rank: int | None = None, energy: float | None = None,
                   dtype: torch.dtype = torch.float16) -> tuple[dict[str, ModuleWeights], ReduceReport]:
    """Every module reduced to at most `rank`, or to the smallest rank keeping `energy` of its squared singular values."""
    if (rank is None) == (energy is None):
        raise SdloraError("give a target --rank or --energy (one of them)")
    if rank is not None and rank < 1:
        raise SdloraError("--rank must be at least 1")
    if energy is not None and not 0.0 < energy <= 1.0:
        raise SdloraError(f"--energy must be in (0, 1], not {energy}")
    report = ReduceReport()
    out = {name: reduce_module(m, rank, energy, dtype, report, name) for name, m in sorted(modules.items())}
    return out, report


def require_plain_lora(adapter: AdapterFile, what: str) -> None:
    """LoHa/LoKr/DoRA/diff modules have no up/down to re-factorise here."""
    deltas = getattr(adapter, "deltas", None) or {}
    if deltas:
        kinds = sorted({getattr(d, "kind", type(d).__name__) for d in deltas.values()})
        raise SdloraError(f"{adapter.path} holds {len(deltas)} non-LoRA modules ({', '.join(map(str, kinds))}); "
                          f"{what} works on plain LoRA files only (bake such files into a base with sdlora merge --base)")


def resize_file(path: str | Path, output: str | Path, rank: int | None = None, energy: float | None = None,
                save_dtype: str = "fp16") -> tuple[str, ReduceReport]:
    """Write `path` reduced to `rank` (or by `energy`) to `output`; returns (file sha256, report)."""
    adapter = load_adapter(path)
    require_plain_lora(adapter, "resize")
    adapter = canonical_modules(adapter, names_for(adapter))  # written as kohya names: SGM paths for SDXL
    old_ranks = [m.rank for m in adapter.modules.values()]
    if rank is not None and rank > max(old_ranks):
        raise SdloraError(f"--rank {rank} is larger than the file's rank ({max(old_ranks)}): resize only reduces")
    modules, report = reduce_modules(adapter.modules, rank, energy, torch_dtype(save_dtype))
    meta = dict(adapter.metadata)
    for key in ("sshs_model_hash", "sshs_legacy_hash", "modelspec.hash_sha256"):
        meta.pop(key, None)  # recomputed by save_adapter over the new tensors
    target = f"rank {rank}" if rank is not None else f"energy {energy:g}"
    apply_dims(meta, modules)
    note = f"resized by sdlora from rank {rank_label(adapter.modules)} to {rank_label(modules)} ({target})"
    old_comment = meta.get("ss_training_comment", "")
    meta["ss_training_comment"] = f"{note}; {old_comment}" if old_comment and old_comment != "None" else note
    sha = save_adapter(output, modules, meta, torch_dtype(save_dtype))
    return sha, report
