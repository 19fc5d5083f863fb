"""Kernels, landmark statistics and k-means for :mod:`featkd.methods.kda.distiller` (and ``featkd kernel``).

Everything here is a pure function of tensors: no model, no data loader, no distributed state.
Shapes: ``n`` examples, ``m`` landmarks, ``d`` feature width (each network has its own ``d``).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

KernelName = Literal["linear", "cosine", "rbf"]

#: guards divisions by a norm or a count that can be exactly zero (all-zero features, an empty cluster)
EPS = 1e-12


def pool_to_vector(x: Tensor) -> Tensor:
    """A captured tensor as one vector per example: (B, C, *spatial) -> (B, C) by global average pooling;
    (B, C) is returned unchanged."""
    if x.ndim == 2:
        return x
    if x.ndim < 2:
        raise ValueError(f"expected a batch of features (B, C, ...), got shape {tuple(x.shape)}")
    return x.flatten(2).mean(dim=2)


def squared_distances(a: Tensor, b: Tensor) -> Tensor:
    """(n, d), (m, d) -> (n, m) squared Euclidean distances, clamped at 0 against rounding."""
    return (a.pow(2).sum(1, keepdim=True) + b.pow(2).sum(1).unsqueeze(0) - 2.0 * a @ b.T).clamp_min(0.0)


def rbf_gamma(a: Tensor, landmarks: Tensor) -> Tensor:
    """Bandwidth of the RBF kernel for one network (ours): ``1 / mean ||a_i - c_j||^2`` over the batch and
    the landmarks, detached. Each network gets its own, so the two kernels have comparable ranges although
    the feature scales differ."""
    return 1.0 / squared_distances(a.detach(), landmarks.detach()).mean().clamp_min(EPS)


def kernel(a: Tensor, b: Tensor, kind: KernelName = "linear", gamma: Tensor | float | None = None) -> Tensor:
    """Kernel matrix (n, m) between rows of ``a`` (n, d) and ``b`` (m, d).

    ``linear``: ``a @ b.T`` (the official code's); ``cosine``: the same on L2-normalised rows;
    ``rbf``: ``exp(-gamma ||a_i - b_j||^2)``, ``gamma`` required (see :func:`rbf_gamma`).
    """
    if kind == "linear":
        return a @ b.T
    if kind == "cosine":
        return F.normalize(a, dim=1, eps=EPS) @ F.normalize(b, dim=1, eps=EPS).T
    if kind == "rbf":
        if gamma is None:
            raise ValueError("the rbf kernel needs gamma")
        return torch.exp(-gamma * squared_distances(a, b))
    raise ValueError(f"unknown kernel {kind!r}")


def accumulate(sums: Tensor, counts: Tensor, features: Tensor, labels: Tensor) -> None:
    """Add ``features`` (n, d) into per-landmark ``sums`` (m, d) and ``counts`` (m,) by ``labels`` (n,), in
    place, in the dtype of ``sums`` (float64 keeps the sums independent of the summation order)."""
    sums.index_add_(0, labels, features.detach().to(sums.dtype))
    counts.index_add_(0, labels, torch.ones_like(labels, dtype=counts.dtype))


def update_centres(centres: Tensor, has_centre: Tensor, sums: Tensor, counts: Tensor) -> Tensor:
    """``centres[j] = sums[j] / counts[j]`` for every landmark with ``counts[j] > 0``, in place; the others
    keep their previous centre. Returns the boolean mask (m,) of landmarks that got no example."""
    seen = counts > 0
    centres[seen] = (sums[seen] / counts[seen].unsqueeze(1)).to(centres.dtype)
    has_centre |= seen
    return ~seen


def nearest(x: Tensor, centroids: Tensor) -> Tensor:
    """Index (n,) of the nearest centroid (k, d) of every row of ``x`` (n, d)."""
    return squared_distances(x.to(centroids.dtype), centroids).argmin(dim=1)


def kmeans(x: Tensor, k: int, iters: int, seed: int) -> Tensor:
    """Lloyd's k-means with k-means++ seeding (Arthur & Vassilvitskii 2007): (n, d) -> centroids (k, d).

    Deterministic for a given ``seed`` (its own CPU generator), so every DDP rank that clusters the same
    features gets the same centroids. A cluster that loses all its points keeps its previous centroid.
    """
    n = x.shape[0]
    if not 1 <= k <= n:
        raise ValueError(f"k-means: need 1 <= k <= n, got k={k}, n={n}")
    x = x.double()
    g = torch.Generator().manual_seed(seed)
    chosen = [int(torch.randint(n, (1,), generator=g))]
    d2 = squared_distances(x, x[chosen[0]].unsqueeze(0)).squeeze(1)
    for _ in range(1, k):
        total = d2.sum()
        if total <= 0:  # fewer distinct points than k: take unused ones in order
            probs = torch.ones(n, dtype=torch.float64)
            probs[chosen] = 0
        else:
            probs = (d2 / total).cpu()
        nxt = int(torch.multinomial(probs, 1, generator=g))
        chosen.append(nxt)
        d2 = torch.minimum(d2, squared_distances(x, x[nxt].unsqueeze(0)).squeeze(1))
    centroids = x[chosen].clone()
    for _ in range(iters):
        labels = nearest(x, centroids)
        sums = torch.zeros_like(centroids).index_add_(0, labels, x)
        counts = torch.bincount(labels, minlength=k).to(x.dtype)
        new = centroids.clone()
        seen = counts > 0
        new[seen] = sums[seen] / counts[seen].unsqueeze(1)
        if torch.equal(new, centroids):
            break
        centroids = new
    return centroids.float()


def nystrom(k_nm: Tensor, k_mm: Tensor) -> Tensor:
    """The Nyström approximation ``K_nm K_mm^+ K_nm^T`` (n, n) of a kernel matrix from its n x m part and
    the m x m landmark kernel (pseudo-inverse, so rank-deficient landmark sets are fine)."""
    return k_nm @ torch.linalg.pinv(k_mm, hermitian=True) @ k_nm.T


def kernel_diagnostics(f_t: Tensor, f_s: Tensor, c_t: Tensor, c_s: Tensor, kind: KernelName = "linear") -> dict:
    """The numbers that make KDA's claim checkable on real features (float64 throughout).

    ``f_t`` (N, d_t), ``f_s`` (N, d_s): features of the same N examples; ``c_t`` (m, d_t), ``c_s`` (m, d_s): the
    corresponding landmarks. Returns Frobenius norms of: the full-kernel difference ``K_t - K_s`` (N x N); each
    network's Nyström error ``K - K_nm K_mm^+ K_nm^T``; the partial difference ``K_nm^t - K_nm^s`` (N x m);
    the difference of the two Nyström approximations; each also relative to the teacher's matrix, and the
    scale-free differences of matrices divided by their own norms. By the triangle inequality
    ``full_diff <= nystrom_error_teacher + nystrom_diff + nystrom_error_student`` (``triangle_bound``).
    """
    f_t, f_s, c_t, c_s = (a.double() for a in (f_t, f_s, c_t, c_s))
    g_t = rbf_gamma(f_t, c_t) if kind == "rbf" else None
    g_s = rbf_gamma(f_s, c_s) if kind == "rbf" else None
    k_t, k_s = kernel(f_t, f_t, kind, g_t), kernel(f_s, f_s, kind, g_s)
    knm_t, knm_s = kernel(f_t, c_t, kind, g_t), kernel(f_s, c_s, kind, g_s)
    ny_t, ny_s = nystrom(knm_t, kernel(c_t, c_t, kind, g_t)), nystrom(knm_s, kernel(c_s, c_s, kind, g_s))

    def norm(x: Tensor) -> float:
        return float(torch.linalg.matrix_norm(x))

    def scale_free(a: Tensor, b: Tensor) -> float:
        return norm(a / max(norm(a), EPS) - b / max(norm(b), EPS))

    out = {
        "full_diff": norm(k_t - k_s), "full_norm_teacher": norm(k_t), "full_norm_student": norm(k_s),
        "nystrom_error_teacher": norm(k_t - ny_t), "nystrom_error_student": norm(k_s - ny_s),
        "partial_diff": norm(knm_t - knm_s), "partial_norm_teacher": norm(knm_t),
        "partial_norm_student": norm(knm_s), "nystrom_diff": norm(ny_t - ny_s),
        "full_diff_scale_free": scale_free(k_t, k_s), "partial_diff_scale_free": scale_free(knm_t, knm_s),
    }
    full_t, part_t = max(out["full_norm_teacher"], EPS), max(out["partial_norm_teacher"], EPS)
    out["full_diff_rel"] = out["full_diff"] / full_t
    out["nystrom_error_teacher_rel"] = out["nystrom_error_teacher"] / full_t
    out["nystrom_error_student_rel"] = out["nystrom_error_student"] / max(out["full_norm_student"], EPS)
    out["partial_diff_rel"] = out["partial_diff"] / part_t
    out["triangle_bound"] = out["nystrom_error_teacher"] + out["nystrom_diff"] + out["nystrom_error_student"]
    return out
