# Copyright (c) the contributors of this project. Licensed under the Apache License 2.0.
"""CLS-token feature distillation: the student's CLS embedding, linearly projected to the teacher's
width, is pulled towards the direction of the frozen teacher's CLS embedding.

Self-contained (torch only): copy this file alone into other code.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F


class CLSTokenLoss(nn.Module):
    """loss = (1/B) sum_i (1 - cos(W s_i + b, t_i)),  W: [teacher_dim, student_dim] learnable.

    The projection bridges the widths (e.g. ViT-S 384 -> ViT-L 1024) and is trained with the student
    (its parameters must be in the optimizer, and synchronised across ranks like the student's, e.g. by
    living inside the DDP-wrapped module). Cosine, not MSE: only the direction of the teacher embedding
    is matched, so the teacher's feature scale needs no calibration. The teacher input is detached.
    """

    def __init__(self, student_dim: int, teacher_dim: int):
        super().__init__()
        self.proj = nn.Linear(student_dim, teacher_dim)

    def forward(self, student_cls: torch.Tensor, teacher_cls: torch.Tensor) -> torch.Tensor:
        """student_cls: [B, student_dim]; teacher_cls: [B, teacher_dim]. Returns a float32 (or float64) scalar."""
        if student_cls.dim() != 2 or teacher_cls.dim() != 2 or student_cls.shape[0] != teacher_cls.shape[0]:
            raise ValueError(f"CLSTokenLoss: expects [B, Ds] and [B, Dt], got {tuple(student_cls.shape)} "
                             f"and {tuple(teacher_cls.shape)}")
        # autocast off: the cosine is computed in float32
        with torch.autocast(student_cls.device.type, enabled=False):
            dtype = torch.promote_types(student_cls.dtype, torch.float32)
            projected = self.proj(student_cls.to(self.proj.weight.dtype)).to(dtype)
            cos = F.cosine_similarity(projected, teacher_cls.detach().to(dtype), dim=-1, eps=1e-8)
            return (1 - cos).mean()
