# Copyright (c) the contributors of this project. Licensed under the Apache License 2.0.
"""SPD loss: the patch-token geometry of the student matches the teacher's on the manifold of symmetric
positive definite matrices (squared Log-Euclidean distance between the patch Gram matrices).

Self-contained (torch only): copy this file alone into other code.
"""
import contextlib

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

# The library of the CUDA eigendecompositions: "auto" (MAGMA for batches of matrices larger than 32, else
# PyTorch's choice), "magma", or "default" (PyTorch's choice: cuSOLVER). Past n = 32, PyTorch's cuSOLVER path
# solves a batch one matrix after the other (syevd in a loop: 128 x 2 float64 196 x 196 matrices per step under
# the distillation defaults), where MAGMA's batched solver runs them together; benchmarks/gpu_check.py times
# both on the GPU at hand. A process-wide setting in PyTorch, so it is set around the call and restored.
CUDA_EIGH_LIBRARY = "auto"


def _eigh_library(g: torch.Tensor) -> str:
    if g.device.type != "cuda" or CUDA_EIGH_LIBRARY == "default":
        return "default"
    if CUDA_EIGH_LIBRARY == "magma" or (g.dim() > 2 and g.shape[0] > 1 and g.shape[-1] > 32):
        return "magma" if getattr(torch.cuda, "has_magma", False) else "default"  # some builds lack MAGMA
    return "default"


@contextlib.contextmanager
def _linalg_library(name: str):
    if name == "default":
        yield
        return
    previous = torch.backends.cuda.preferred_linalg_library()
    torch.backends.cuda.preferred_linalg_library(name)
    try:
        yield
    finally:
        torch.backends.cuda.preferred_linalg_library(previous)


def batched_eigh(g: torch.Tensor):
    """torch.linalg.eigh of symmetric matrices [..., n, n], on CUDA through the library `CUDA_EIGH_LIBRARY`
    picks (see above)."""
    with _linalg_library(_eigh_library(g)):
        return torch.linalg.eigh(g)


def _log_divided_differences(lam: torch.Tensor) -> torch.Tensor:
    """K[..., i, j] = (log l_i - log l_j) / (l_i - l_j), and 1 / l_i where l_i = l_j (its limit). lam > 0.

    Written with lo = min(l_i, l_j), hi = max, d = (hi - lo) / lo >= 0 as K = log1p(d) / (lo * d): the
    direct quotient loses all its digits to cancellation when l_i ~ l_j (and is 0/0 when they are equal,
    which is common: a rank-deficient Gram matrix has many eigenvalues equal to eps). log1p(d) / d is
    accurate for every d > 0 and replaced by its series 1 - d/2 + d^2/3 (error < d^3/4) for d < 1e-6.
    K is exactly symmetric.
    """
    li, lj = lam.unsqueeze(-1), lam.unsqueeze(-2)
    lo, hi = torch.minimum(li, lj), torch.maximum(li, lj)
    d = (hi - lo) / lo
    small = d < 1e-6
    d_safe = torch.where(small, torch.ones_like(d), d)  # no 0/0 in the branch that torch.where discards
    ratio = torch.where(small, 1 - d / 2 + d * d / 3, torch.log1p(d_safe) / d_safe)  # log1p(d) / d
    return ratio / lo


class _SymmetricMatrixLog(torch.autograd.Function):
    """log(G) = V diag(log l) V^T for symmetric positive definite G = V diag(l) V^T (G symmetrised first).

    Backward (Daleckii-Krein): dL = V (K o (V^T dG V)) V^T, so grad_G = V (K o (V^T sym(grad_L) V)) V^T with
    K the divided differences of log above. torch.linalg.eigh's own backward goes through the eigenvector
    derivative, 1 / (l_i - l_j), which is inf/NaN for repeated eigenvalues even though log(G) itself is
    perfectly smooth there; the divided differences of the scalar function have a finite limit instead.
    """

    @staticmethod
    def forward(ctx, g: torch.Tensor) -> torch.Tensor:
        g = (g + g.transpose(-1, -2)) / 2
        lam, v = batched_eigh(g)
        # G is SPD by construction (eps * I added); the floor only guards log() against rounding below 0.
        lam = lam.clamp(min=torch.finfo(lam.dtype).tiny)
        ctx.save_for_backward(lam, v)
        out = (v * torch.log(lam).unsqueeze(-2)) @ v.transpose(-1, -2)
        return (out + out.transpose(-1, -2)) / 2

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: torch.Tensor) -> torch.Tensor:
        lam, v = ctx.saved_tensors
        vt = v.transpose(-1, -2)
        grad_sym = (grad_out + grad_out.transpose(-1, -2)) / 2  # the output is symmetric
        grad = v @ (_log_divided_differences(lam) * (vt @ grad_sym @ v)) @ vt
        return (grad + grad.transpose(-1, -2)) / 2  # the forward used sym(G)


def sym_logm(g: torch.Tensor) -> torch.Tensor:
    """Matrix logarithm of symmetric positive definite matrices [..., n, n] (use float64), with a gradient
    that stays finite and exact for repeated eigenvalues."""
    return _SymmetricMatrixLog.apply(g)


def _log_gram(patches: torch.Tensor, eps: float) -> torch.Tensor:
    """log(F F^T / N + eps I), F = row-normalised patches [B, N, D], in float64."""
    n = patches.shape[1]
    f = F.normalize(patches.to(torch.float64), p=2, dim=-1)
    # Unit rows: F F^T / N has trace 1 (eigenvalues in [0, 1], summing to 1) for any N and width D;
    # eps * I makes it positive definite when D < N (rank <= D), with the same floor for both models.
    gram = f @ f.transpose(-1, -2) / n + eps * torch.eye(n, dtype=torch.float64, device=patches.device)
    return sym_logm(gram)


def spd_loss(student_patches: torch.Tensor, teacher_patches: torch.Tensor, eps: float = 1e-4) -> torch.Tensor:
    """(1/B) sum_b (1/N) || log(G_s,b) - log(G_t,b) ||_F^2,  G = F F^T / N + eps I,  F = L2-normalised tokens.

    student_patches [B, N, Ds], teacher_patches [B, N, Dt]: the N x N Gram matrices compare models of any
    widths, and are invariant to rotations of the feature space (token geometry only: G is the same for
    F and F Q with Q orthogonal, even when Q pads to a wider space), so identical geometries give 0.

    Normalisation: the squared Frobenius norm of the N x N log-difference is the sum of N squared
    log-eigenvalue ratios (exactly so when the matrices commute), so it grows like N; dividing by N makes it
    the mean over eigen-directions, comparable between crop sizes. (A mean over the N^2 entries would
    shrink it like 1/N instead.) Images are averaged.

    float64 inside (eigh in float32 is too inexact for eigenvalues eps apart), returned as float32 (float64
    for float64 inputs). Gradients flow into the student only; the teacher side is computed without graph.
    Cost: one batched N x N float64 eigh per side (on CUDA through MAGMA by default: see CUDA_EIGH_LIBRARY).
    """
    if (student_patches.dim() != 3 or teacher_patches.dim() != 3
            or student_patches.shape[:2] != teacher_patches.shape[:2]):
        raise ValueError(f"spd_loss: expects [B, N, Ds] and [B, N, Dt] with the same B and N, got "
                         f"{tuple(student_patches.shape)} and {tuple(teacher_patches.shape)}")
    if not eps > 0:
        raise ValueError(f"spd_loss: eps must be > 0 (the Gram matrix of fewer dims than patches is singular), "
                         f"got {eps}")
    n = student_patches.shape[1]
    # autocast off: bf16/fp16 Gram matmuls; everything here is float64
    with torch.autocast(student_patches.device.type, enabled=False):
        with torch.no_grad():
            log_t = _log_gram(teacher_patches.detach(), eps)
        log_s = _log_gram(student_patches, eps)
        loss = ((log_s - log_t) ** 2).sum(dim=(-2, -1)).mean() / n
    return loss.to(torch.promote_types(student_patches.dtype, torch.float32))


class SPDLoss(nn.Module):
    """Module form of `spd_loss`."""

    def __init__(self, eps: float = 1e-4):
        super().__init__()
        self.eps = eps

    def forward(self, student_patches: torch.Tensor, teacher_patches: torch.Tensor) -> torch.Tensor:
        return spd_loss(student_patches, teacher_patches, self.eps)
