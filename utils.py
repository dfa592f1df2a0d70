# Copyright (c) the contributors of this project. Licensed under the Apache License 2.0.
# Names and signatures of the official helpers follow facebookresearch/dino's utils.py (Apache 2.0).
"""The official DINO helpers, under their official names, so that code written against the official
`utils.py` keeps working with `import utils`: schedules, gradients, the multi-crop wrapper and metric logging
here; distributed set-up, seeds and errors from `runtime`; checkpoints and weights from `checkpointing`.
"""
import datetime
import time
from collections import defaultdict, deque
from typing import Any, Dict, Iterable, List, Optional, Tuple

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn

from checkpointing import load_pretrained_weights, restart_from_checkpoint, save_on_master  # noqa: F401
from runtime import (  # noqa: F401
    TrainingInterrupted, UserError, add_distributed_args, bool_flag, fix_random_seeds, get_rank, get_sha,
    get_world_size, init_distributed_mode, is_dist_avail_and_initialized, is_main_process, print_all_ranks,
    setup_for_distributed)


def cosine_scheduler(base_value: float, final_value: float, epochs: int, niter_per_ep: int,
                     warmup_epochs: int = 0, start_warmup_value: float = 0) -> np.ndarray:
    """One value per iteration: linear warmup from `start_warmup_value`, then a cosine to `final_value`."""
    total = int(epochs * niter_per_ep)
    warmup_iters = min(int(warmup_epochs * niter_per_ep), total)
    warmup_schedule = np.array([])
    if warmup_iters > 0:
        warmup_schedule = np.linspace(start_warmup_value, base_value, warmup_iters)
    iters = np.arange(total - warmup_iters)
    schedule = final_value + 0.5 * (base_value - final_value) * (1 + np.cos(np.pi * iters / max(len(iters), 1)))
    schedule = np.concatenate((warmup_schedule, schedule))
    assert len(schedule) == total
    return schedule


@torch.no_grad()
def grad_norms(model: nn.Module) -> Tuple[List[torch.Tensor], Optional[torch.Tensor]]:
    """The gradients of `model`'s parameters and their norms, one per parameter, stacked on the device (no
    host-device synchronisation); ([], None) when no parameter has a gradient."""
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    if not grads:
        return grads, None
    return grads, torch.stack([n.to(grads[0].device) for n in torch._foreach_norm(grads, 2)])


@torch.no_grad()
def clip_gradients(model: nn.Module, clip: float) -> torch.Tensor:
    """Clip each parameter's gradient to norm `clip` (per parameter, as the official DINO code does).

    Returns the norms before clipping as a 1-D tensor (no host-device synchronisation).
    """
    grads, norms = grad_norms(model)
    if norms is None:
        return torch.zeros(0)
    clip_coefs = (clip / (norms + 1e-6)).clamp_(max=1.0)
    torch._foreach_mul_(grads, [c.to(g.dtype) for c, g in zip(clip_coefs.unbind(0), grads)])
    return norms


def cancel_gradients_last_layer(epoch: int, model: nn.Module, freeze_last_layer: int) -> None:
    """Drop the gradients of the head's last layer during the first `freeze_last_layer` epochs."""
    if epoch >= freeze_last_layer:
        return
    for n, p in model.named_parameters():
        if "last_layer" in n:
            p.grad = None


def cancel_gradients_backbone(epoch: int, model: nn.Module, freeze_backbone_epochs: int) -> None:
    """Drop the gradients of the backbone (`backbone.*`, inside DDP `module.backbone.*`) during the first
    `freeze_backbone_epochs` epochs: the optimizer then leaves its weights and their moments untouched."""
    if epoch >= freeze_backbone_epochs:
        return
    for n, p in model.named_parameters():
        if n.startswith(("backbone.", "module.backbone.")):
            p.grad = None


def get_params_groups(model: nn.Module) -> List[Dict[str, Any]]:
    """Two groups: weights (regularised) and biases/norm parameters (no weight decay)."""
    regularized, not_regularized = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        # we do not regularize biases nor Norm parameters
        if name.endswith(".bias") or len(param.shape) == 1:
            not_regularized.append(param)
        else:
            regularized.append(param)
    return [{'params': regularized}, {'params': not_regularized, 'weight_decay': 0.}]


def has_batchnorms(model: nn.Module) -> bool:
    bn_types = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)
    return any(isinstance(m, bn_types) for m in model.modules())


class MultiCropWrapper(nn.Module):
    """Backbone + head over a list of crops of several resolutions.

    The backbone runs once per run of consecutive crops of the same size (batched together), the head
    once on all the features. Output rows are crop-major: all images of crop 0, then crop 1, ...
    """

    def __init__(self, backbone: nn.Module, head: nn.Module):
        super().__init__()
        # Disable layers dedicated to ImageNet label classification.
        if hasattr(backbone, "reset_classifier"):  # timm: keeps its pooling, drops the classifier
            backbone.reset_classifier(0)
        else:
            backbone.fc, backbone.head = nn.Identity(), nn.Identity()
        self.backbone = backbone
        self.head = head

    def forward(self, x, **kwargs) -> torch.Tensor:
        if not isinstance(x, (list, tuple)):
            x = [x]
        outputs = []
        for start, end in resolution_runs(x):
            out = self.backbone(torch.cat(x[start:end]) if end - start > 1 else x[start], **kwargs)
            if isinstance(out, tuple):  # e.g. XCiT returns a tuple
                out = out[0]
            outputs.append(out)
        return self.head(torch.cat(outputs) if len(outputs) > 1 else outputs[0])


def resolution_runs(crops: List[torch.Tensor]) -> List[Tuple[int, int]]:
    """(start, end) of each run of consecutive crops with the same resolution: one backbone pass each."""
    runs, start = [], 0
    while start < len(crops):
        end = start + 1
        while end < len(crops) and crops[end].shape[-2:] == crops[start].shape[-2:]:
            end += 1
        runs.append((start, end))
        start = end
    return runs


class SmoothedValue:
    """Track a series of values; window median/average and global average.

    Accepts tensors without reading them: the host-device synchronisation happens only when a
    statistic is printed.
    """

    def __init__(self, window_size: int = 20, fmt: Optional[str] = None):
        self.deque = deque(maxlen=window_size)
        self.total = 0.0
        self.count = 0
        self.fmt = fmt or "{median:.6f} ({global_avg:.6f})"

    def update(self, value, n: int = 1) -> None:
        if isinstance(value, torch.Tensor):
            value = value.detach()
        self.deque.append(value)
        self.count += n
        self.total = self.total + value * n

    def synchronize_between_processes(self) -> None:
        """Sum count and total over ranks (the window stays local)."""
        if not is_dist_avail_and_initialized():
            return
        t = torch.tensor([self.count, float(self.total)], dtype=torch.float64,
                         device="cuda" if dist.get_backend() == "nccl" else "cpu")
        dist.all_reduce(t)
        self.count, self.total = int(t[0].item()), t[1].item()

    def _values(self) -> torch.Tensor:
        return torch.tensor([float(v) for v in self.deque], dtype=torch.float64)

    @property
    def median(self) -> float:
        return self._values().median().item()

    @property
    def avg(self) -> float:
        return self._values().mean().item()

    @property
    def global_avg(self) -> float:
        return float(self.total) / max(self.count, 1)

    @property
    def max(self) -> float:
        return max(float(v) for v in self.deque)

    @property
    def value(self) -> float:
        return float(self.deque[-1])

    def __str__(self) -> str:
        return self.fmt.format(median=self.median, avg=self.avg, global_avg=self.global_avg,
                               max=self.max, value=self.value)


class MetricLogger:
    def __init__(self, delimiter: str = "\t"):
        self.meters = defaultdict(SmoothedValue)
        self.delimiter = delimiter

    def update(self, **kwargs) -> None:
        for k, v in kwargs.items():
            if v is None:
                continue
            self.meters[k].update(v)

    def __getattr__(self, attr):
        if attr in self.meters:
            return self.meters[attr]
        if attr in self.__dict__:
            return self.__dict__[attr]
        raise AttributeError(f"'{type(self).__name__}' object has no attribute '{attr}'")

    def __str__(self) -> str:
        return self.delimiter.join(f"{name}: {meter}" for name, meter in self.meters.items())

    def synchronize_between_processes(self) -> None:
        for meter in self.meters.values():
            meter.synchronize_between_processes()

    def add_meter(self, name: str, meter: SmoothedValue) -> None:
        self.meters[name] = meter

    def state_dict(self) -> Dict[str, Dict[str, Any]]:
        """Running totals and counts (what the epoch averages need), for a mid-epoch checkpoint."""
        return {k: {"total": m.total.cpu() if isinstance(m.total, torch.Tensor) else m.total, "count": m.count}
                for k, m in self.meters.items()}

    def load_state_dict(self, state: Dict[str, Dict[str, Any]]) -> None:
        for k, v in state.items():
            self.meters[k].total, self.meters[k].count = v["total"], v["count"]

    def log_every(self, iterable: Iterable, print_freq: int, header: Optional[str] = None,
                  images_per_iter: Optional[int] = None, total: Optional[int] = None, start: int = 0):
        """Yield from `iterable`, printing progress, ETA, iteration/data time (and images/s) every
        `print_freq` iterations and at the last one. `start`: the index of the first item (an epoch
        resumed in its middle)."""
        i = start
        header = header or ''
        total = len(iterable) if total is None else total
        start_time = end = time.time()
        iter_time = SmoothedValue(fmt='{avg:.4f}')
        data_time = SmoothedValue(fmt='{avg:.4f}')
        space_fmt = ':' + str(len(str(total))) + 'd'
        for obj in iterable:
            data_time.update(time.time() - end)
            yield obj
            iter_time.update(time.time() - end)
            if i % print_freq == 0 or i == total - 1:
                eta_seconds = iter_time.global_avg * (total - i - 1)
                parts = [header, ('[{0' + space_fmt + '}/{1}]').format(i, total),
                         f"eta: {datetime.timedelta(seconds=int(eta_seconds))}", str(self),
                         f"time: {iter_time}", f"data: {data_time}"]
                if images_per_iter:
                    parts.append(f"img/s: {images_per_iter / max(iter_time.avg, 1e-9):.1f}")
                if torch.cuda.is_available():
                    parts.append(f"max mem: {torch.cuda.max_memory_allocated() / 2**20:.0f}MB")
                print(self.delimiter.join(p for p in parts if p), flush=True)
            i += 1
            end = time.time()
        total_time = time.time() - start_time
        print(f"{header} Total time: {datetime.timedelta(seconds=int(total_time))} "
              f"({total_time / max(total - start, 1):.4f} s / it)", flush=True)
