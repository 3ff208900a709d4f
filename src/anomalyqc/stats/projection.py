"""Embedding-dimension reductions (thesis 8.3.5.3): PCA, sparse random projection, and the
fixed random projection PatchCore uses only to speed up its coreset search (eq. 8.34).

Each is a (D, D') matrix applied as phi' = (phi - centre) R, stored with the model.
"""

from __future__ import annotations

import math

import torch


def pca_matrix(cov: torch.Tensor, out_dim: int) -> torch.Tensor:
    """Top out_dim eigenvectors of a (D, D) covariance (eqs. 8.27-8.28), as columns."""
    evals, evecs = torch.linalg.eigh(cov.to(torch.float64))
    order = evals.argsort(descending=True)[:out_dim]
    return evecs[:, order].to(torch.float32)


def sparse_random_matrix(in_dim: int, out_dim: int, seed: int = 0,
                         density: float | None = None) -> torch.Tensor:
    """Achlioptas / Li sparse projection (eq. 8.31), entries +-sqrt(s/d') w.p. 1/(2s), else 0.

    s = 1/density, default s = sqrt(in_dim). Scaled by the output dimension so squared
    distances are preserved in expectation (Johnson-Lindenstrauss, eq. 8.33).
    """
    s = 1.0 / density if density else math.sqrt(in_dim)
    g = torch.Generator().manual_seed(seed)
    u = torch.rand(in_dim, out_dim, generator=g)
    signs = torch.where(u < 0.5 / s, 1.0, torch.where(u < 1.0 / s, -1.0, 0.0))
    return signs * math.sqrt(s / out_dim)


def gaussian_random_matrix(in_dim: int, out_dim: int, seed: int = 0) -> torch.Tensor:
    """Dense Gaussian projection N(0, 1/d') (eq. 8.34): the coreset-search speed-up."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(in_dim, out_dim, generator=g) / math.sqrt(out_dim)
