# Copyright (c) the contributors of this project. Licensed under the Apache License 2.0.
# Signature and numerics follow DINOLoss of facebookresearch/dino (Apache 2.0).
"""DINO self-distillation loss: centred, sharpened teacher targets against every other student view.

Also `sinkhorn_knopp`, DINOv2's alternative to centring (teacher targets from a few Sinkhorn-Knopp
iterations), usable alone, e.g. for the iBOT patch targets of the masked tokens.

Self-contained (torch and numpy only): copy this file alone into other code.
"""
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F


def _dist_on() -> bool:
    return dist.is_available() and dist.is_initialized()


def _logsumexp_over_samples(logq: torch.Tensor) -> torch.Tensor:
    """log sum_b exp(logq[b, k]) for every prototype k, the sum running over the samples of all ranks.

    Stable: the global (all-reduced MAX) per-prototype maximum is taken out before exp. Every rank must
    call this (collectives), also one with no sample at all.
    """
    k = logq.shape[1]
    if logq.shape[0] > 0:
        m = logq.amax(dim=0)
    else:  # a rank without samples (e.g. no masked patch) still takes part in the all-reduces
        m = logq.new_full((k,), float("-inf"))
    if _dist_on():
        dist.all_reduce(m, op=dist.ReduceOp.MAX)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))  # only when there is no sample anywhere
    s = torch.exp(logq - m).sum(dim=0)
    if _dist_on():
        dist.all_reduce(s)
    return m + torch.log(s)


@torch.no_grad()
def sinkhorn_knopp(teacher_logits: torch.Tensor, teacher_temp: float, n_iterations: int = 3) -> torch.Tensor:
    """Teacher probabilities [B, K] by Sinkhorn-Knopp (SwAV / DINOv2 `sinkhorn_knopp_teacher`); rows sum to 1.

    DINOv2: Q = exp(logits / temp).T  [K, B_total]; Q /= Q.sum(); then n_iterations times
    { each prototype row  /= its sum, /= K   (every prototype gets mass 1/K)
      each sample column  /= its sum, /= B   (every sample gets mass 1/B) };  return (B * Q).T.
    B is the global number of samples and the sums over samples are all-reduced when a process group
    is initialised, so the result on each rank is its rows of Sinkhorn-Knopp on the concatenated batch
    (ranks may hold different numbers of rows, e.g. masked patch tokens; every rank must call it).

    Computed in the log domain, which is the same function to float rounding: exp(logits / temp) overflows
    float32 once logits / temp > 88 (e.g. |logit| > 3.5 at temp 0.04) and a whole sample underflows to 0
    (then 0/0) when it sits far below the rest. The uniform 1/K, 1/B factors and the initial division by
    the total are constants that the next normalisation removes, so only the per-prototype and per-sample
    log-sum-exps remain, and the last sample normalisation times B is a softmax over prototypes.
    The rows sum to 1 exactly; each prototype's mass over the samples approaches B_total/K as the
    iterations go (3 iterations, as in DINOv2, get close, not exactly there). Float32, detached, no grad.
    """
    if teacher_logits.dim() != 2:
        raise ValueError("sinkhorn_knopp: teacher_logits must be [samples, prototypes], "
                         f"got {tuple(teacher_logits.shape)}")
    if n_iterations < 1:
        raise ValueError(f"sinkhorn_knopp: n_iterations must be >= 1, got {n_iterations}")
    # autocast off: the teacher targets need float32
    with torch.autocast(teacher_logits.device.type, enabled=False):
        logq = teacher_logits.detach().float() / teacher_temp  # log of Q.T, [B_local, K]
        for it in range(n_iterations):
            logq -= _logsumexp_over_samples(logq)  # prototypes: equal mass (the 1/K is a constant)
            if it < n_iterations - 1:
                logq -= torch.logsumexp(logq, dim=1, keepdim=True)  # samples: equal mass (1/B, constant)
        # the last sample normalisation, times B: every row becomes a distribution over prototypes
        return torch.softmax(logq, dim=1)


class DINOLoss(nn.Module):
    """Cross-entropy between teacher and student distributions over `out_dim` prototypes.

    `student_output` holds `ncrops` chunks of B rows (crop-major: all images of crop 0, then crop 1, ...),
    `teacher_output` the 2 global crops. Every (teacher view, student view) pair with different views
    contributes; the loss is their mean. The teacher is centred with an EMA of its batch mean (all-reduced
    over ranks when a process group is initialised) and sharpened by a temperature warmed up per epoch.

    `centering="sinkhorn_knopp"` (DINOv2) replaces the centring: the teacher probabilities of both global
    crops together (2B rows, all ranks) come from `sinkhorn_knopp(teacher_output, temp)`, and the center
    buffer is neither used nor updated (it stays in the state_dict, so checkpoints keep their keys).
    """

    CENTERINGS = ("centering", "sinkhorn_knopp")

    def __init__(self, out_dim: int, ncrops: int, warmup_teacher_temp: float, teacher_temp: float,
                 warmup_teacher_temp_epochs: int, nepochs: int, student_temp: float = 0.1,
                 center_momentum: float = 0.9, centering: str = "centering"):
        super().__init__()
        if centering not in self.CENTERINGS:
            raise ValueError(f"DINOLoss: centering must be one of {self.CENTERINGS}, got {centering!r}")
        self.centering = centering
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

    def forward(self, student_output: torch.Tensor, teacher_output: torch.Tensor, epoch: int,
                teacher_temp: Optional[float] = None) -> torch.Tensor:
        """`teacher_temp`, when given, replaces the per-epoch schedule (DINOv2 warms it up per iteration)."""
        n_teacher = 2
        if student_output.shape[0] % self.ncrops or teacher_output.shape[0] % n_teacher:
            raise ValueError(f"DINOLoss: {student_output.shape[0]} student rows are not {self.ncrops} crops, "
                             f"or {teacher_output.shape[0]} teacher rows are not 2 crops")
        # log-softmax once per student view (the official code recomputes it for every pair).
        student_logp = F.log_softmax(student_output.float() / self.student_temp, dim=-1)
        student_logp = student_logp.chunk(self.ncrops)

        # Teacher centring and sharpening (or Sinkhorn-Knopp over both global crops, as DINOv2).
        temp = self.teacher_temp(epoch) if teacher_temp is None else teacher_temp
        if self.centering == "sinkhorn_knopp":
            teacher_probs = sinkhorn_knopp(teacher_output, temp)
        else:
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
        if self.centering == "centering":
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
