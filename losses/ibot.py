# Copyright (c) the contributors of this project. Licensed under the Apache License 2.0.
# Follows iBOTPatchLoss of facebookresearch/dinov2 (Apache 2.0).
"""iBOT masked-patch loss: the student predicts, at the patches masked in its input, the teacher's
distribution over prototypes for the same (unmasked) patches.

Self-contained (torch and numpy only): copy this file alone into other code.
"""
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F


class iBOTPatchLoss(nn.Module):
    """Cross-entropy between teacher and student patch distributions, at the masked patches only.

    With p_t = softmax((t - center) / teacher_temp(epoch)) and log p_s = log_softmax(s / student_temp):

        loss = -(1 / B) * sum_i (1 / max(n_i, 1)) * sum_{j masked in image i} sum_k p_t[i,j,k] log p_s[i,j,k]

    n_i = number of masked patches of image i: each image weighs the same whatever its mask ratio, and
    an image without any masked patch adds 0 but still counts in B (DINOv2: `-loss.sum() / masks.shape[0]`;
    it keeps the loss scale independent of how many images happen to be masked, as with a per-image mean).

    The center (buffer [1, 1, K]) is an EMA of the mean teacher logits over the masked patches (DINOv2;
    iBOT used all patches): these are the targets being centred. Over ranks the sums of logits and the
    counts are all-reduced, so the mean is over every masked patch of the global batch (DINOv2 averages
    the per-rank means instead, the same when every rank masks as many patches). A step with no masked
    patch anywhere leaves the center as it is. The center used by a step is the one before its update.

    `teacher_probs` (e.g. from `sinkhorn_knopp` over the masked teacher logits, DINOv2's alternative to
    centring) replaces the centred softmax; the center is then neither used nor updated.
    """

    def __init__(self, patch_out_dim: int, warmup_teacher_temp: float = 0.04, teacher_temp: float = 0.07,
                 warmup_teacher_temp_epochs: int = 30, nepochs: int = 100, student_temp: float = 0.1,
                 center_momentum: float = 0.9):
        super().__init__()
        self.student_temp = student_temp
        self.center_momentum = center_momentum
        self.register_buffer("center", torch.zeros(1, 1, patch_out_dim))
        self.warmup_teacher_temp, self.final_teacher_temp = warmup_teacher_temp, teacher_temp
        self.warmup_teacher_temp_epochs, self.nepochs = warmup_teacher_temp_epochs, nepochs

    def teacher_temp(self, epoch: int) -> float:
        """DINOLoss's schedule: a linear warm-up over warmup_teacher_temp_epochs (a sharp teacher early is
        unstable), then teacher_temp; past nepochs, its last value."""
        epoch = min(epoch, self.nepochs - 1)
        if epoch < self.warmup_teacher_temp_epochs:
            return float(np.linspace(self.warmup_teacher_temp, self.final_teacher_temp,
                                     self.warmup_teacher_temp_epochs)[epoch])
        return float(self.final_teacher_temp)

    def forward(self, student_patch_logits: torch.Tensor, teacher_patch_logits: Optional[torch.Tensor],
                masks: torch.Tensor, epoch: int, teacher_probs: Optional[torch.Tensor] = None,
                mask_index: Optional[torch.Tensor] = None, teacher_temp: Optional[float] = None) -> torch.Tensor:
        """student_patch_logits, teacher_patch_logits: [B, N, K], or [M, K] = only the M masked rows in
        `tensor[masks]` order (cheaper: the heads then run on the masked tokens only); masks: [B, N] bool
        (True = masked in the student's input). teacher_probs: [B, N, K] or [M, K] (e.g. what
        `sinkhorn_knopp(teacher_masked_logits, temp)` returns); with it the teacher logits may be None.
        mask_index (optional, with [M, K] inputs): the flat indices of the True entries of `masks`
        (`masks.reshape(-1).nonzero().squeeze(1)`, made on the CPU): no host synchronisation on a GPU, where
        boolean indexing must first read M. teacher_temp (optional): replaces the per-epoch schedule. Returns a float32 scalar; no gradient reaches the teacher."""
        if masks.dim() != 2 or student_patch_logits.dim() not in (2, 3) or (
                student_patch_logits.dim() == 3 and student_patch_logits.shape[:2] != masks.shape):
            raise ValueError(f"iBOTPatchLoss: student logits {tuple(student_patch_logits.shape)} must be [B, N, K] "
                             f"with masks {tuple(masks.shape)} = [B, N], or [M, K] for the M masked patches")
        masks = masks.bool()
        n_images = masks.shape[0]
        # autocast off: the loss and the centre are computed in float32
        with torch.autocast(student_patch_logits.device.type, enabled=False):
            # Only the masked rows: log_softmax over all B*N*K logits would be wasted work and memory.
            student_masked = student_patch_logits[masks] if student_patch_logits.dim() == 3 else student_patch_logits
            student_logp = F.log_softmax(student_masked.float() / self.student_temp, dim=-1)
            if teacher_probs is None:
                if teacher_patch_logits is None or teacher_patch_logits.dim() != student_patch_logits.dim():
                    raise ValueError("iBOTPatchLoss: teacher_patch_logits must have the student's layout ([B, N, K] "
                                     "or [M, K]) when teacher_probs is not given")
                teacher = teacher_patch_logits.detach()
                teacher = (teacher[masks] if teacher.dim() == 3 else teacher).float()
                temp = self.teacher_temp(epoch) if teacher_temp is None else teacher_temp
                probs = F.softmax((teacher - self.center.view(1, -1)) / temp, dim=-1)
            else:
                probs = teacher_probs.detach()
                if probs.dim() == 3:
                    probs = probs[masks]
                if probs.shape != student_logp.shape:
                    raise ValueError(f"iBOTPatchLoss: teacher_probs give {tuple(probs.shape)} masked rows, the "
                                     f"student {tuple(student_logp.shape)}")
                probs = probs.float()
            per_patch = torch.sum(probs * student_logp, dim=-1)  # [M]
            # weight 1 / n_i of every masked patch of image i, in the same (row-major) order as tensor[masks]
            n_masked = masks.sum(dim=1, keepdim=True).clamp(min=1).float()  # [B, 1]
            weights = (1.0 / n_masked).expand(masks.shape)
            weights = weights[masks] if mask_index is None else weights.reshape(-1).index_select(0, mask_index)  # [M]
            loss = -torch.sum(per_patch * weights) / n_images
        if teacher_probs is None:
            self.update_center(teacher_patch_logits, masks)
        return loss

    @torch.no_grad()
    def update_center(self, teacher_patch_logits: torch.Tensor, masks: torch.Tensor) -> None:
        """center <- m * center + (1 - m) * mean of the teacher logits over the masked patches of all ranks.
        `teacher_patch_logits`: [B, N, K], or [M, K] for the masked rows only.

        Every rank must call it (one all-reduce), also a rank with no masked patch."""
        with torch.autocast(teacher_patch_logits.device.type, enabled=False):
            masked = teacher_patch_logits.detach()
            masked = (masked[masks.bool()] if masked.dim() == 3 else masked).float()  # [M, K]
            # sums and count in one tensor: a single all-reduce, and the exact mean over unequal ranks
            stats = torch.cat([masked.sum(dim=0), masked.new_full((1,), float(masked.shape[0]))])
            if dist.is_available() and dist.is_initialized():
                dist.all_reduce(stats)
            count = stats[-1]
            batch_center = (stats[:-1] / count.clamp(min=1)).view_as(self.center)
            updated = self.center * self.center_momentum + batch_center * (1 - self.center_momentum)
            # no masked patch anywhere: keep the center (torch.where, no host sync on GPU)
            self.center.copy_(torch.where(count > 0, updated, self.center))
