"""Iso-C's spectrum flattening (Marczak et al. 2025, "No Task Left Behind: Isotropic Model
Merging with Common and Task-Specific Subspaces", arXiv:2502.04959): the summed task vector of a
weight matrix keeps its singular vectors, and every singular value becomes their mean, so the
directions of a weakly fine-tuned expert count as much as those of a hard-trained one."""

from __future__ import annotations

import torch


def isotropic(matrix: torch.Tensor) -> torch.Tensor:
    """`matrix` (out, in) = U diag(s) V^T  ->  mean(s) * U V^T (float32; a zero matrix stays 0)."""
    u, s, vh = torch.linalg.svd(matrix.double(), full_matrices=False)
    return (s.mean() * (u @ vh)).to(matrix.dtype)
