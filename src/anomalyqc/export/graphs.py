"""Each detector's whole inference as one torch module: images (B, C, H, W) in [0, 1] ->
(score (B,), anomaly_map (B, 1, H, W)), built from the fitted model's own tensors and
networks, with the post-processing (upsampling, blur, image score) inside. This is what goes
to ONNX, so the exported file needs nothing of ours around it.

The embedding detectors' Mahalanobis whitening solves L z = x - mu in torch; ONNX has no
triangular solve, so the graph multiplies by L^-1, computed once here in float64. The
nearest-neighbour search of PatchCore is exact, as in predict: the clustered search with its
pruning (ClusteredBankDistance) for the banks predict clusters, brute force (one GEMM,
BankDistance) for the small ones.
Both agree with predict to float32 rounding, which the parity check of anomalyqc.export.onnx
measures at export.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from anomalyqc.backbones.extractor import aggregate, pool_channels
from anomalyqc.errors import ConfigError
from anomalyqc.models.base import Detector
from anomalyqc.models.reconstruction import gaussian_taps
from anomalyqc.stats.knn import ClusteredBank, may_hold_closer


def gaussian_kernel_1d(sigma: float) -> torch.Tensor:
    """The (k,) factor of the kernel kornia's gaussian_blur2d uses for this sigma (k = 2*round(4s)+1)."""
    return torch.from_numpy(gaussian_taps(2 * int(4.0 * sigma + 0.5) + 1, sigma)).float()


def gaussian_kernel(sigma: float) -> torch.Tensor:
    """The (1, 1, k, k) 2-D kernel: the outer product of gaussian_kernel_1d with itself."""
    g = gaussian_kernel_1d(sigma).double()
    return (g[:, None] * g[None, :]).float().view(1, 1, g.numel(), g.numel())


class MapHead(nn.Module):
    """(B, h, w) patch scores -> smoothed map at input size and the max of it. The Gaussian
    is separable: a column pass then a row pass, 2k taps a pixel instead of k*k (k = 33 at
    sigma 4)."""

    kernel_v: torch.Tensor  # buffers, registered in __init__
    kernel_h: torch.Tensor

    def __init__(self, size: tuple[int, int], blur_sigma: float) -> None:
        super().__init__()
        self.size = size
        g = gaussian_kernel_1d(blur_sigma) if blur_sigma > 0 else torch.empty(0)
        self.register_buffer("kernel_v", g.view(1, 1, -1, 1) if g.numel() else g)
        self.register_buffer("kernel_h", g.view(1, 1, 1, -1) if g.numel() else g)

    def forward(self, patch: torch.Tensor) -> torch.Tensor:
        m = F.interpolate(patch.unsqueeze(1), size=self.size, mode="bilinear", align_corners=False)
        if self.kernel_v.numel():
            pad = int(self.kernel_v.shape[2]) // 2
            m = F.conv2d(F.pad(m, (pad, pad, pad, pad), mode="reflect"), self.kernel_v)
            m = F.conv2d(m, self.kernel_h)
        return m


class EmbeddingGraph(nn.Module):
    """Backbone -> aggregated grid -> reduction -> patch scores -> map (models.embedding)."""

    mean: torch.Tensor  # buffers, registered in __init__
    std: torch.Tensor
    red_mean: torch.Tensor
    red_matrix: torch.Tensor

    def __init__(self, det: Detector, scorer: nn.Module,
                 image_score: nn.Module | None = None) -> None:
        super().__init__()
        from anomalyqc.models.embedding import EmbeddingDetector

        assert isinstance(det, EmbeddingDetector)
        ext = det.extractor
        self.body = ext.body.to(memory_format=torch.contiguous_format)
        self.register_buffer("mean", ext.mean.clone())
        self.register_buffer("std", ext.std.clone())
        self.patch_size = ext.patch_size
        self.channel_pool = ext.channel_pool
        red = det.reduction()
        self.register_buffer("red_mean", red[0].float() if red else torch.empty(0))
        self.register_buffer("red_matrix", red[1].float() if red else torch.empty(0))
        self.grid = det.learnt(det.grid)
        self.scorer = scorer
        self.head = MapHead(det.input_size, det.config.blur_sigma)
        self.patch_max = det.config.image_score == "patch_max"
        self.image_score = image_score

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = images
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        x = (x - self.mean) / self.std
        mid, deep = self.body(x)
        emb = aggregate(mid, deep, self.patch_size)
        if self.channel_pool:
            emb = pool_channels(emb, self.channel_pool)
        b, d = emb.shape[0], emb.shape[1]
        h, w = self.grid
        e = emb.permute(0, 2, 3, 1).reshape(b, h * w, d)
        if self.red_matrix.numel():
            e = (e - self.red_mean) @ self.red_matrix
        patch = self.scorer(e)  # (B, P)
        m = self.head(patch.reshape(b, h, w))
        if self.image_score is not None:  # a detector's own rule on (embeddings, patch scores)
            score = self.image_score(e, patch)
        else:
            score = patch.amax(dim=1) if self.patch_max else m.flatten(1).amax(dim=1)
        return score, m


class ReweightedScore(nn.Module):
    """PatchCore's reweighted image score (models.patchcore.reweighted_scores), the same code
    on the bank as a buffer."""

    bank: torch.Tensor  # buffer, registered in __init__

    def __init__(self, bank: torch.Tensor, n_neighbors: int) -> None:
        super().__init__()
        self.register_buffer("bank", bank.float().contiguous())
        self.n_neighbors = n_neighbors

    def forward(self, e: torch.Tensor, patch: torch.Tensor) -> torch.Tensor:
        from anomalyqc.models.patchcore.model import reweighted_scores

        return reweighted_scores(e, patch, self.bank, self.n_neighbors)


class WhitenedDistance(nn.Module):
    """Distance of whitened embeddings to the nearest of K centres per location:
    PaDiM (K = 1, the mean: the Mahalanobis distance) and MhBC-PatchCore (K centroids in
    whitened coordinates). `inv_chol` is L^-1 (P or 1, D, D), or None for no whitening."""

    mu: torch.Tensor  # buffers, registered in __init__
    w: torch.Tensor
    centres: torch.Tensor

    def __init__(self, mean: torch.Tensor | None, inv_chol: torch.Tensor | None,
                 centres: torch.Tensor | None) -> None:
        super().__init__()
        self.register_buffer("mu", mean.float() if mean is not None else torch.empty(0))
        self.register_buffer("w", inv_chol.float() if inv_chol is not None else torch.empty(0))
        self.register_buffer("centres", centres.float() if centres is not None else torch.empty(0))

    def forward(self, e: torch.Tensor) -> torch.Tensor:  # (B, P, D) -> (B, P)
        z = e
        if self.w.numel() and self.w.shape[0] == 1:  # one factor shared by all locations
            z = (z - self.mu) @ self.w[0].T
        elif self.w.numel():
            z = torch.einsum("pij,bpj->bpi", self.w, z - self.mu)
        if not self.centres.numel():
            return z.norm(dim=-1)
        c = self.centres  # (P, K, D)
        d2 = (z * z).sum(-1, keepdim=True) - 2 * torch.einsum("bpd,pkd->bpk", z, c) \
            + (c * c).sum(-1).unsqueeze(0)
        return d2.clamp_min(0).amin(dim=-1).sqrt()


class BankDistance(nn.Module):
    """PatchCore: Euclidean distance of each patch to its nearest memory-bank entry, exact.

    min_n ||x - b_n||^2 = ||x||^2 + min_n (||b_n||^2 - 2 x.b_n): the bracket is one GEMM
    with the bank stored transposed and scaled by -2 (exact in float32) and the bank norms
    precomputed as its bias (ONNX Runtime fuses the two into one Gemm), reduced by a min
    before ||x||^2 is added, so a single elementwise pass touches the (patches x bank) matrix."""

    bank_t: torch.Tensor  # buffers, registered in __init__
    bank_sq: torch.Tensor

    def __init__(self, bank: torch.Tensor) -> None:
        super().__init__()
        b = bank.float()
        self.register_buffer("bank_t", (-2.0 * b).T.contiguous())  # (D, N)
        self.register_buffer("bank_sq", (b**2).sum(-1))

    def forward(self, e: torch.Tensor) -> torch.Tensor:
        b, p, d = e.shape
        q = e.reshape(b * p, d)
        d2 = (q * q).sum(-1) + (q @ self.bank_t + self.bank_sq).amin(dim=1)
        return d2.clamp_min(0).sqrt().reshape(b, p)


class ClusteredBankDistance(nn.Module):
    """PatchCore's exact clustered search (stats.knn.ClusteredBank) as static graph ops, with
    the same clusters predict searches, so both prune alike.

    The loop over clusters is unrolled at export: for cluster j, the queries that need it are
    picked with NonZero and searched against that cluster's slice of the bank (one Gemm
    each), first those whose nearest centre is j (an upper bound U per query), then those
    for which cluster j passes the triangle-inequality test against U. The graph's size is
    that of the bank plus a few nodes per cluster."""

    mean: torch.Tensor  # buffers, registered in __init__
    centres_t: torch.Tensor
    centres_sq: torch.Tensor
    radius: torch.Tensor

    def __init__(self, clusters: ClusteredBank) -> None:
        super().__init__()
        self.register_buffer("mean", clusters.mean.clone())
        self.register_buffer("centres_t", (-2.0 * clusters.centres).T.contiguous())
        self.register_buffer("centres_sq", clusters.centres_sq.clone())
        self.register_buffer("radius", clusters.radius.clone())
        b = clusters.bounds
        self.filled = [j for j in range(len(b) - 1) if b[j + 1] > b[j]]
        for j in self.filled:  # each cluster's slice as in BankDistance: -2 x^T and |x|^2
            self.register_buffer(f"bank_t{j}", (-2.0 * clusters.x[b[j]:b[j + 1]]).T.contiguous())
            self.register_buffer(f"bank_sq{j}", clusters.x_sq[b[j]:b[j + 1]].clone())

    def _cluster_min(self, q: torch.Tensor, rows: torch.Tensor, j: int) -> torch.Tensor:
        """min over cluster j of |x|^2 - 2 q.x for the queries `rows` (|q|^2 left out)."""
        bank_t, bank_sq = getattr(self, f"bank_t{j}"), getattr(self, f"bank_sq{j}")
        return (q.index_select(0, rows) @ bank_t + bank_sq).amin(dim=1)

    def forward(self, e: torch.Tensor) -> torch.Tensor:
        b, p, d = e.shape
        q = e.reshape(b * p, d) - self.mean
        q_sq = (q * q).sum(-1)
        to_centre_sq = (q @ self.centres_t + self.centres_sq) + q_sq[:, None]
        nearest = to_centre_sq.argmin(dim=1)
        # an empty nearest cluster leaves U infinite: every other cluster is then searched
        best = torch.full_like(q_sq, math.inf)
        for j in self.filled:
            rows = torch.nonzero(nearest == j).squeeze(1)
            best = best.index_put((rows,), self._cluster_min(q, rows, j))
        best = best + q_sq
        live = may_hold_closer(to_centre_sq.clamp_min(0).sqrt(), self.radius,
                               best.clamp_min(0).sqrt())
        live = live & (torch.arange(live.shape[1]) != nearest[:, None])
        for j in self.filled:
            rows = torch.nonzero(live[:, j]).squeeze(1)
            found = self._cluster_min(q, rows, j) + q_sq.index_select(0, rows)
            best = best.index_put((rows,), torch.minimum(best.index_select(0, rows), found))
        return best.clamp_min(0).sqrt().reshape(b, p)


def inverse_cholesky(chol: torch.Tensor) -> torch.Tensor:
    """L^-1 of lower factors (..., D, D), in float64 then rounded once to float32."""
    eye = torch.eye(chol.shape[-1], dtype=torch.float64).expand_as(chol)
    return torch.linalg.solve_triangular(chol.double(), eye, upper=False).float()


class TrainedGraph(nn.Module):
    """A trained detector's networks and its own `infer` (models.trained): the exported
    graph is the code predict runs. A model that scores inside per-image ROIs (GRD-Net
    trained with them) takes the ROI as a second input, as its predict does."""

    def __init__(self, det: Detector) -> None:
        super().__init__()
        from anomalyqc.models.trained import TrainedDetector

        assert isinstance(det, TrainedDetector)
        self.det = det
        self.nets = nn.ModuleDict(det.nets)

    def forward(self, images: torch.Tensor,
                roi: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        pred = self.det.infer(images) if roi is None else self.det.infer_roi(images, roi)
        return pred.score.float(), pred.anomaly_map.float()


def export_graph(det: Detector) -> nn.Module:
    """The module to export for a fitted detector, in eval mode on the CPU; ConfigError
    for a detector or setting that cannot be exported (and why)."""
    from anomalyqc.models.mhbc import Mhbc
    from anomalyqc.models.padim import Padim
    from anomalyqc.models.patchcore import Patchcore
    from anomalyqc.models.trained import TrainedDetector

    if not det.fitted:
        raise ConfigError(f"{det.name} is not fitted: nothing to export")
    graph: nn.Module
    if isinstance(det, Padim):
        scorer = WhitenedDistance(det.learnt(det.mean), inverse_cholesky(det.learnt(det.chol)), None)
        graph = EmbeddingGraph(det, scorer)
    elif isinstance(det, Mhbc):
        chol = det.chol
        scorer = WhitenedDistance(det.mean if chol is not None else None,
                                  inverse_cholesky(chol) if chol is not None else None,
                                  det.learnt(det.centroids))
        graph = EmbeddingGraph(det, scorer)
    elif isinstance(det, Patchcore):
        # the search predict runs: clustered where its index is, else brute force
        clusters = getattr(det.nn, "clusters", None)
        search = ClusteredBankDistance(clusters) if clusters is not None \
            else BankDistance(det.learnt(det.bank))
        reweighted = ReweightedScore(det.learnt(det.bank), det.config.n_neighbors) \
            if det.config.image_score == "reweighted" else None
        graph = EmbeddingGraph(det, search, reweighted)
    elif det.name == "classifier":
        from anomalyqc.export.classifier import classifier_graph

        # Grad-CAM's gradient, traced into forward ops (export.gradients); extra outputs:
        # the class index and probabilities (graph.output_names)
        graph = classifier_graph(det)
    elif isinstance(det, TrainedDetector):
        graph = TrainedGraph(det)
    else:
        raise ConfigError(f"{det.name} models cannot be exported to ONNX")
    return graph.eval().cpu()
