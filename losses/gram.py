# Copyright (c) the contributors of this project. Licensed under the Apache License 2.0.
# Re-implements the Gram anchoring loss of DINOv3 (Simeoni et al. 2025), facebookresearch/dinov3.
"""Gram anchoring (DINOv3): the student's patch-to-patch cosine similarities match the teacher's.

Self-contained (torch only): copy this file alone into other code.
"""
import contextlib

import torch
import torch.nn as nn
import torch.nn.functional as F


def _autocast_off(device: torch.device):
    """Autocast would run the Gram matmuls in bf16/fp16 (about 3 significant digits); use float32."""
    if device.type in ("cuda", "cpu"):
        return torch.autocast(device_type=device.type, enabled=False)
    return contextlib.nullcontext()


def _gram(x: torch.Tensor, normalize: bool, img_level: bool) -> torch.Tensor:
    if normalize:
        x = F.normalize(x, p=2, dim=-1)
    if not img_level:
        x = x.flatten(0, 1)  # [B*N, D]: also the similarities between patches of different images
    return x @ x.transpose(-1, -2)


def gram_loss(student_patches: torch.Tensor, teacher_patches: torch.Tensor, normalize: bool = True,
              img_level: bool = True, remove_neg: bool = False,
              remove_only_teacher_neg: bool = False) -> torch.Tensor:
    """mean over entries of (G_s - G_t)^2, G = F F^T with F the L2-normalised patch tokens.

    student_patches [B, N, Ds], teacher_patches [B, N, Dt]: the Gram matrices are N x N whatever the widths,
    so a narrow student can match a wide teacher. img_level=True: one Gram per image ([B, N, N], mean over
    B*N*N entries); False: one Gram over all B*N patches of the batch ([BN, BN], DINOv3's option).
    remove_neg: negative similarities of both are set to 0; remove_only_teacher_neg: the teacher's, and the
    student's where the teacher's are negative (DINOv3's options; both off = plain MSE). Float32 math,
    teacher detached; returns float32 (float64 for float64 inputs).
    """
    if (student_patches.dim() != 3 or teacher_patches.dim() != 3
            or student_patches.shape[:2] != teacher_patches.shape[:2]):
        raise ValueError(f"gram_loss: expects [B, N, Ds] and [B, N, Dt] with the same B and N, got "
                         f"{tuple(student_patches.shape)} and {tuple(teacher_patches.shape)}")
    with _autocast_off(student_patches.device):
        dtype = torch.promote_types(student_patches.dtype, torch.float32)
        with torch.no_grad():
            target = _gram(teacher_patches.detach().to(dtype), normalize, img_level)
        student = _gram(student_patches.to(dtype), normalize, img_level)
        if remove_neg:
            target = target.clamp(min=0)
            student = student.clamp(min=0)
        elif remove_only_teacher_neg:
            student = torch.where(target < 0, student.clamp(min=0), student)
            target = target.clamp(min=0)
        return F.mse_loss(student, target)


class GramLoss(nn.Module):
    """Module form of `gram_loss` (same arguments, fixed at construction)."""

    def __init__(self, normalize: bool = True, img_level: bool = True, remove_neg: bool = False,
                 remove_only_teacher_neg: bool = False):
        super().__init__()
        self.normalize = normalize
        self.img_level = img_level
        self.remove_neg = remove_neg
        self.remove_only_teacher_neg = remove_only_teacher_neg

    def forward(self, student_patches: torch.Tensor, teacher_patches: torch.Tensor) -> torch.Tensor:
        return gram_loss(student_patches, teacher_patches, self.normalize, self.img_level, self.remove_neg,
                         self.remove_only_teacher_neg)
