# Copyright (c) the contributors of this project. Licensed under the Apache License 2.0.
# Re-implements the Gram anchoring loss of DINOv3 (Simeoni et al. 2025), facebookresearch/dinov3.
"""Gram anchoring (DINOv3): the student's patch-to-patch cosine similarities match the teacher's.

Self-contained (torch only): copy this file alone into other code.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F


def _gram(x: torch.Tensor, normalize: bool, img_level: bool) -> torch.Tensor:
    if normalize:
        x = F.normalize(x, p=2, dim=-1)
    if not img_level:
        x = x.flatten(0, 1)  # [B*N, D]: also the similarities between patches of different images
    return x @ x.transpose(-1, -2)


def gram_loss(student_patches: torch.Tensor, teacher_patches: torch.Tensor, normalize: bool = True,
              img_level: bool = True, remove_neg: bool = False,
              remove_only_teacher_neg: bool = False) -> torch.Tensor:
    """MSE between the student's and the teacher's patch Gram matrices: mean over entries of (G_s - G_t)^2.

    student_patches [B, N, Ds], teacher_patches [B, N, Dt]: the Gram matrices are N x N whatever the widths,
    so a narrow student can match a wide teacher. Computes what DINOv3's `GramLoss` (dinov3/loss/gram_loss.py,
    `GramLoss(apply_norm=normalize, remove_neg=..., remove_only_teacher_neg=...)(s, t, img_level=img_level)`)
    computes:

    - normalize: G = F F^T with F the L2-normalised patch tokens (cosine similarities, DINOv3's `apply_norm`);
      False: F the raw tokens (dot products).
    - img_level=True: one Gram per image, [B, N, N], mean over B*N*N entries; False: one Gram over all B*N
      patches of the batch, [BN, BN] (also the similarities between patches of different images), mean over
      (BN)^2 entries.
    - remove_neg: loss = MSE(max(G_s, 0), max(G_t, 0)): negative similarities of both set to 0 (the student's
      then get no gradient).
    - remove_only_teacher_neg: loss = MSE(G_s, max(G_t, 0)): only the teacher's negative similarities set to 0;
      the student's Gram is left as it is, negatives included. (DINOv3's code clamps the teacher before building
      its mask of "student < 0 where teacher < 0", so that mask is always empty and this is what it computes.)
    - both off (the default, as in DINOv3's training config; its `GramLoss` class alone defaults to
      remove_neg=True): plain MSE(G_s, G_t). Both on: ValueError (DINOv3 asserts that they are not both set).

    Float32 math (autocast off; float64 for float64 inputs), teacher detached; returns a 0-dim float32 tensor
    (float64 for float64 inputs).
    """
    if (student_patches.dim() != 3 or teacher_patches.dim() != 3
            or student_patches.shape[:2] != teacher_patches.shape[:2]):
        raise ValueError(f"gram_loss: expects [B, N, Ds] and [B, N, Dt] with the same B and N, got "
                         f"{tuple(student_patches.shape)} and {tuple(teacher_patches.shape)}")
    if remove_neg and remove_only_teacher_neg:
        raise ValueError("gram_loss: remove_neg and remove_only_teacher_neg are exclusive (set at most one)")
    # autocast off: bf16/fp16 keeps about 3 significant digits; the Grams need float32
    with torch.autocast(student_patches.device.type, enabled=False):
        dtype = torch.promote_types(student_patches.dtype, torch.float32)
        with torch.no_grad():
            target = _gram(teacher_patches.detach().to(dtype), normalize, img_level)
        student = _gram(student_patches.to(dtype), normalize, img_level)
        if remove_neg or remove_only_teacher_neg:
            target = target.clamp(min=0)
        if remove_neg:
            student = student.clamp(min=0)
        return F.mse_loss(student, target)


class GramLoss(nn.Module):
    """Module form of `gram_loss` (same arguments, fixed at construction; see `gram_loss` for each option)."""

    def __init__(self, normalize: bool = True, img_level: bool = True, remove_neg: bool = False,
                 remove_only_teacher_neg: bool = False):
        super().__init__()
        if remove_neg and remove_only_teacher_neg:
            raise ValueError("GramLoss: remove_neg and remove_only_teacher_neg are exclusive (set at most one)")
        self.normalize = normalize
        self.img_level = img_level
        self.remove_neg = remove_neg
        self.remove_only_teacher_neg = remove_only_teacher_neg

    def forward(self, student_patches: torch.Tensor, teacher_patches: torch.Tensor) -> torch.Tensor:
        return gram_loss(student_patches, teacher_patches, self.normalize, self.img_level, self.remove_neg,
                         self.remove_only_teacher_neg)
