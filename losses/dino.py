# Copyright (c) the contributors of this project. Licensed under the Apache License 2.0.
# Signature and numerics follow DINOLoss of facebookresearch/dino (Apache 2.0).
"""DINO self-distillation loss: centred, sharpened teacher targets against every other student view.

Self-contained (torch and numpy only): copy this file alone into other code.
"""
import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F


class DINOLoss(nn.Module):
    """Cross-entropy between teacher and student distributions over `out_dim` prototypes.

    `student_output` holds `ncrops` chunks of B rows (crop-major: all images of crop 0, then crop 1, ...),
    `teacher_output` the 2 global crops. Every (teacher view, student view) pair with different views
    contributes; the loss is their mean. The teacher is centred with an EMA of its batch mean (all-reduced
    over ranks when a process group is initialised) and sharpened by a temperature warmed up per epoch.
    """

    def __init__(self, out_dim: int, ncrops: int, warmup_teacher_temp: float, teacher_temp: float,
                 warmup_teacher_temp_epochs: int, nepochs: int, student_temp: float = 0.1,
                 center_momentum: float = 0.9):
        super().__init__()
        self.student_temp = student_temp
        self.center_momentum = center_momentum
        self.ncrops = ncrops
        self.register_buffer("center", torch.zeros(1, out_dim))
        # A too high temperature makes training unstable at the beginning: warm it up linearly.
        warmup = min(warmup_teacher_temp_epochs, nepochs)
        self.teacher_temp_schedule = np.concatenate((
            np.linspace(warmup_teacher_temp, teacher_temp, warmup_teacher_temp_epochs)[:warmup],
            np.ones(nepochs - warmup) * teacher_temp,
        ))

    def teacher_temp(self, epoch: int) -> float:
        return float(self.teacher_temp_schedule[min(epoch, len(self.teacher_temp_schedule) - 1)])

    def forward(self, student_output: torch.Tensor, teacher_output: torch.Tensor, epoch: int) -> torch.Tensor:
        n_teacher = 2
        if student_output.shape[0] % self.ncrops or teacher_output.shape[0] % n_teacher:
            raise ValueError(f"DINOLoss: {student_output.shape[0]} student rows are not {self.ncrops} crops, "
                             f"or {teacher_output.shape[0]} teacher rows are not 2 crops")
        # log-softmax once per student view (the official code recomputes it for every pair).
        student_logp = F.log_softmax(student_output.float() / self.student_temp, dim=-1)
        student_logp = student_logp.chunk(self.ncrops)

        # Teacher centring and sharpening.
        temp = self.teacher_temp(epoch)
        teacher_probs = F.softmax((teacher_output.float() - self.center) / temp, dim=-1).detach()
        teacher_probs = teacher_probs.chunk(n_teacher)

        # sum over pairs (iq, v), v != iq, of <q_iq, log p_v>, grouped by student view: a view v that is
        # also a teacher view meets the other teacher views only, any other view meets all of them.
        q_sum = sum(teacher_probs)
        local_logp = sum(student_logp[n_teacher:]) if self.ncrops > n_teacher else None
        total = 0.
        for v in range(min(n_teacher, self.ncrops)):
            total = total + torch.sum((q_sum - teacher_probs[v]) * student_logp[v], dim=-1).mean()
        if local_logp is not None:
            total = total + torch.sum(q_sum * local_logp, dim=-1).mean()
        n_loss_terms = n_teacher * self.ncrops - min(n_teacher, self.ncrops)
        loss = -total / n_loss_terms
        self.update_center(teacher_output)
        return loss

    @torch.no_grad()
    def update_center(self, teacher_output: torch.Tensor) -> None:
        """EMA of the teacher's batch mean; the batch mean is taken over all ranks."""
        batch_center = torch.sum(teacher_output.float(), dim=0, keepdim=True)
        world_size = 1
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(batch_center)
            world_size = dist.get_world_size()
        batch_center = batch_center / (len(teacher_output) * world_size)
        self.center.mul_(self.center_momentum).add_(batch_center * (1 - self.center_momentum))
