"""Merges of a weight matrix's task vectors by their singular value decompositions.

- Iso-C (Marczak et al. 2025, "No Task Left Behind: Isotropic Model Merging with Common and
  Task-Specific Subspaces", arXiv:2502.04959): the summed task vector keeps its singular
  vectors, and every singular value becomes their mean, so the directions of a weakly
  fine-tuned expert count as much as those of a hard-trained one.
- TSV-Merge (Gargiulo et al. 2025, "Task Singular Vectors: Reducing Task Interference in Model
  Merging", arXiv:2412.00081): each task vector is cut to its top 1/N singular directions (N
  experts), and the N sets of left and of right singular vectors are each replaced by the
  nearest matrix with orthonormal columns, so no two tasks write along the same direction; the
  singular values stay each task's own.
Both work in float64 and return the input's dtype."""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch


def isotropic(matrix: torch.Tensor) -> torch.Tensor:
    """`matrix` (out, in) = U diag(s) V^T  ->  mean(s) * U V^T (a zero matrix stays 0)."""
    u, s, vh = torch.linalg.svd(matrix.double(), full_matrices=False)
    return (s.mean() * (u @ vh)).to(matrix.dtype)


def flat_spectrum(deltas: Iterable[torch.Tensor]) -> torch.Tensor:
    """Iso-C on (weighted) task vectors of one weight matrix: their sum (one at a time),
    spectrum flattened."""
    total = None
    for delta in deltas:
        total = delta.clone() if total is None else total.add_(delta)
    return isotropic(total)


def task_singular(deltas: Iterable[torch.Tensor]) -> torch.Tensor:
    """TSV-Merge on (weighted) task vectors of one weight matrix (out, in): with each
    tau_i ~ U_i diag(s_i) V_i^T cut to its top k = max(1, min(out, in) // N) directions,
    [U_1 .. U_N] and [V_1 .. V_N] are orthogonalised (polar factor: P Q^T of their SVD P S Q^T)
    and the merge is U_perp diag(s_1 .. s_N) V_perp^T. Directions with a singular value at
    rounding level (a task vector of rank under k, an expert that left the matrix alone) carry
    nothing and are left out: their singular vectors are arbitrary and would only bend the
    others'. So task vectors with mutually orthogonal row and column spaces come back as their
    sum. Holds the N task vectors at once (a few tens of MB at base size)."""
    deltas = list(deltas)
    keep = max(1, min(deltas[0].shape) // len(deltas))
    parts = [_top_directions(delta.double(), keep) for delta in deltas]
    largest = max(float(s[0]) for _, s, _ in parts)
    # the Gram matrix's rounding, sqrt(size * eps) of the largest singular value
    floor = largest * math.sqrt(max(deltas[0].shape) * torch.finfo(torch.float64).eps)
    us, ss, vhs = [], [], []
    for u, s, vh in parts:
        kept = int((s > floor).sum())
        us.append(u[:, :kept])
        ss.append(s[:kept])
        vhs.append(vh[:kept])
    if not any(len(s) for s in ss):
        return torch.zeros_like(deltas[0])
    u_perp = _orthonormal(torch.cat(us, dim=1))
    v_perp = _orthonormal(torch.cat(vhs, dim=0).T)
    return ((u_perp * torch.cat(ss)) @ v_perp.T).to(deltas[0].dtype)


def _top_directions(matrix: torch.Tensor, keep: int
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The top `keep` singular triplets (U, s, V^T) of `matrix`, largest first, from the
    eigendecomposition of its smaller Gram matrix (4x faster than an SVD of a 768 x 3072 task
    vector; the squared condition number costs only the directions far below the top, which
    `task_singular` leaves out)."""
    wide = matrix.shape[0] <= matrix.shape[1]
    gram = matrix @ matrix.T if wide else matrix.T @ matrix
    values, vectors = torch.linalg.eigh(gram)
    top = vectors[:, -keep:].flip(1)
    s = values[-keep:].flip(0).clamp_min(0).sqrt()
    other = (top.T @ matrix if wide else (matrix @ top).T) / s.clamp_min(
        torch.finfo(s.dtype).tiny)[:, None]
    return (top, s, other) if wide else (other.T, s, top.T)


def _orthonormal(matrix: torch.Tensor) -> torch.Tensor:
    """The nearest matrix to `matrix` with orthonormal columns (rows, if it is wider than
    tall): P Q^T of its SVD P S Q^T."""
    p, _, qh = torch.linalg.svd(matrix, full_matrices=False)
    return p @ qh
