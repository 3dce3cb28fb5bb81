"""Diffusion Policy's min/max ("limits") normalizer: per-dimension affine map to [-1, 1]."""

from __future__ import annotations

import torch


class LinearNormalizer:
    """``normalize(x) = x * scale + offset``; dims whose range is below ``range_eps`` map to 0."""

    def __init__(self, scale: torch.Tensor, offset: torch.Tensor, stats: dict[str, torch.Tensor] | None = None):
        if scale.shape != offset.shape or scale.ndim != 1:
            raise ValueError(f"scale {tuple(scale.shape)} and offset {tuple(offset.shape)} must be equal 1-D shapes")
        self.scale = scale.float()
        self.offset = offset.float()
        self.stats = stats or {}

    @classmethod
    def fit(cls, data: torch.Tensor, range_eps: float = 1e-4) -> LinearNormalizer:
        flat = data.reshape(-1, data.shape[-1]).float()
        lo, hi = flat.min(0).values, flat.max(0).values
        span = hi - lo
        ok = span >= range_eps
        scale = torch.where(ok, 2.0 / span.clamp(min=range_eps), torch.ones_like(span))
        offset = torch.where(ok, -1.0 - scale * lo, -lo)
        stats = {"min": lo, "max": hi, "mean": flat.mean(0), "std": flat.std(0)}
        return cls(scale, offset, stats)

    def to(self, device: torch.device | str) -> LinearNormalizer:
        """Keep the coefficients on the policy's device (no per-call host-to-device copies)."""
        self.scale, self.offset = self.scale.to(device), self.offset.to(device)
        return self

    @property
    def dim(self) -> int:
        return self.scale.shape[0]

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale.to(x.device) + self.offset.to(x.device)

    def unnormalize(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.offset.to(x.device)) / self.scale.to(x.device)

    def state_dict(self, prefix: str) -> dict[str, torch.Tensor]:
        out = {f"{prefix}.scale": self.scale, f"{prefix}.offset": self.offset}
        out.update({f"{prefix}.input_stats.{k}": v for k, v in self.stats.items()})
        return out

    @classmethod
    def concat(cls, parts: list[LinearNormalizer]) -> LinearNormalizer:
        """One normalizer for the concatenation of ``parts``' vectors: sources normalize each observation key on its
        own, our policy normalizes their concatenation. Statistics every part has are kept."""
        names = set.intersection(*(set(p.stats) for p in parts))
        stats = {name: torch.cat([p.stats[name].reshape(-1).float() for p in parts]) for name in sorted(names)}
        return cls(torch.cat([p.scale for p in parts]), torch.cat([p.offset for p in parts]), stats)

    @classmethod
    def from_state_dict(cls, tensors: dict[str, torch.Tensor], prefix: str) -> LinearNormalizer:
        try:
            scale, offset = tensors[f"{prefix}.scale"], tensors[f"{prefix}.offset"]
        except KeyError as err:
            raise KeyError(f"normalizer tensor {err.args[0]!r} missing") from None
        stats_prefix = f"{prefix}.input_stats."
        stats = {k[len(stats_prefix) :]: v for k, v in tensors.items() if k.startswith(stats_prefix)}
        return cls(scale, offset, stats)
