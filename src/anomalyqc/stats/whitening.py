"""Cholesky whitening (thesis 8.3.5.4, appendix D).

Sigma = L L^T; z = L^{-1} (phi - mu) is found by a triangular solve, never an explicit
inverse. The Euclidean norm of z is the Mahalanobis distance of phi, and Euclidean distances
between whitened points are Mahalanobis distances between the original ones (D.4).
"""

from __future__ import annotations

import torch


def cholesky(cov: torch.Tensor, jitter: float = 1e-6, tries: int = 6) -> torch.Tensor:
    """Lower Cholesky factor of a batch of covariances (..., D, D).

    A matrix that is not numerically positive definite gets a growing diagonal jitter
    (regularised Cholesky, D.3) rather than failing the whole fit.
    """
    if cov.ndim == 2:
        return cholesky(cov.unsqueeze(0), jitter, tries)[0]
    eye = torch.eye(cov.shape[-1], dtype=cov.dtype)
    factor, info = torch.linalg.cholesky_ex(cov)
    bad = info > 0
    added = 0.0
    for _ in range(tries):
        if not bool(bad.any()):
            return factor
        # Only the failing matrices get jitter: one degenerate location must not change
        # the factors of the others.
        sub = cov[bad]
        scale = sub.diagonal(dim1=-2, dim2=-1).mean().clamp_min(1e-12)
        added = jitter * float(scale) if added == 0.0 else added * 10
        f, i = torch.linalg.cholesky_ex(sub + added * eye)
        factor[bad] = f
        info = info.clone()
        info[bad] = i
        bad = info > 0
    if bool(bad.any()):
        raise ValueError("covariance is not positive definite even after regularisation; "
                         "raise the regularisation eps or reduce the embedding dimension")
    return factor


def whiten(x: torch.Tensor, mean: torch.Tensor, chol: torch.Tensor) -> torch.Tensor:
    """Solve L z = x - mu for every location.

    x: (P, N, D) embeddings of N samples at each of P locations; mean: (P, D) or (1, D);
    chol: (P, D, D) or (1, D, D). Returns z with the shape of x.
    """
    centred = (x - mean.unsqueeze(1)).transpose(1, 2)  # (P, D, N)
    if chol.shape[0] == 1 and x.shape[0] > 1:
        # One global factor: solve all locations as extra right-hand sides of one system.
        p, d, n = centred.shape
        rhs = centred.permute(1, 0, 2).reshape(1, d, p * n)
        z = torch.linalg.solve_triangular(chol, rhs, upper=False)
        return z.reshape(d, p, n).permute(1, 2, 0)
    return torch.linalg.solve_triangular(chol, centred, upper=False).transpose(1, 2)
