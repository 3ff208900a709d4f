"""Mergeable online moments per grid location (thesis appendix C).

Running count, sum and sum of outer products, in float64, so that the mean and covariance of
any number of images take the memory of one: P x D x D. Two accumulators built on disjoint
shards merge exactly (addition), which is what lets a fit run on many processes.
"""

from __future__ import annotations

import torch


class OnlineMoments:
    """Per-location first and second moments of D-dimensional embeddings.

    Embeddings arrive as (B, P, D): B images, P grid locations, D channels.
    """

    def __init__(self, locations: int, dim: int, dtype: torch.dtype = torch.float64) -> None:
        self.count = 0
        self.sum = torch.zeros(locations, dim, dtype=dtype)
        self.outer = torch.zeros(locations, dim, dim, dtype=dtype)

    @property
    def locations(self) -> int:
        return int(self.sum.shape[0])

    @property
    def dim(self) -> int:
        return int(self.sum.shape[1])

    def update(self, x: torch.Tensor) -> None:
        """Add a batch of embeddings (B, P, D)."""
        if x.ndim != 3 or x.shape[1:] != self.sum.shape:
            raise ValueError(f"expected embeddings (B, {self.locations}, {self.dim}), "
                             f"got {tuple(x.shape)}")
        x = x.to(self.sum.dtype)
        self.count += int(x.shape[0])
        self.sum += x.sum(dim=0)
        xp = x.permute(1, 2, 0)  # (P, D, B)
        self.outer.baddbmm_(xp, xp.transpose(1, 2))

    def merge(self, other: "OnlineMoments") -> "OnlineMoments":
        """Combine with moments of a disjoint shard, in place (exact)."""
        if other.sum.shape != self.sum.shape:
            raise ValueError(f"cannot merge moments of shape {tuple(other.sum.shape)} into "
                             f"{tuple(self.sum.shape)}")
        self.count += other.count
        self.sum += other.sum
        self.outer += other.outer
        return self

    def mean(self) -> torch.Tensor:
        self._need(1)
        return self.sum / self.count

    def covariance(self, eps: float = 0.0) -> torch.Tensor:
        """Unbiased covariance per location (eq. B.5), plus eps * I (regularisation, B.6)."""
        self._need(2)
        mu = self.mean()
        cov = (self.outer - self.count * mu.unsqueeze(2) * mu.unsqueeze(1)) / (self.count - 1)
        if eps:
            cov = cov + eps * torch.eye(self.dim, dtype=cov.dtype)
        return cov

    def pooled(self) -> "OnlineMoments":
        """All locations as one: the moments of a single global distribution (ablation)."""
        out = OnlineMoments(1, self.dim, self.sum.dtype)
        out.count = self.count * self.locations
        out.sum = self.sum.sum(dim=0, keepdim=True)
        out.outer = self.outer.sum(dim=0, keepdim=True)
        return out

    def state(self, prefix: str = "moments") -> dict[str, torch.Tensor]:
        return {
            f"{prefix}.count": torch.tensor([self.count], dtype=torch.int64),
            f"{prefix}.sum": self.sum,
            f"{prefix}.outer": self.outer,
        }

    @classmethod
    def from_state(cls, tensors: dict[str, torch.Tensor], prefix: str = "moments") -> "OnlineMoments":
        s = tensors[f"{prefix}.sum"]
        out = cls(int(s.shape[0]), int(s.shape[1]), s.dtype)
        out.count = int(tensors[f"{prefix}.count"][0])
        out.sum = s.clone()
        out.outer = tensors[f"{prefix}.outer"].clone()
        return out

    def _need(self, n: int) -> None:
        if self.count < n:
            raise ValueError(f"need at least {n} training images, have {self.count}")
