# Copyright (c) the contributors of this project. Licensed under the Apache License 2.0.
"""Training health without labels: the signals of the DINO paper's collapse study (section 5.3, figure 7),
the effective rank of the embeddings, and a collapse detector.

Per step (device tensors, read lazily by the MetricLogger and the Tracker: no host synchronisation):
- `teacher_entropy`: the mean per-sample entropy of the centred, sharpened teacher distribution (nats), and
  `teacher_entropy_frac`, the same as a fraction of ln K (K prototypes): 1 is the uniform distribution;
- `prototypes_in_use`: exp of the entropy of the batch-mean teacher distribution (1: every sample on one
  prototype; K: all prototypes used evenly);
- `kl`: the mean KL(teacher || student) over the loss's view pairs. DINO's cross-entropy is the teacher
  entropy plus this KL, so `kl` is the loss minus `teacher_entropy` (same probabilities, pairs, temperatures);
- `feature_spread`: the standard deviation across the batch of the l2-normalised backbone CLS features, times
  sqrt(dim) (the root of their total variance): about 1 when they spread, 0 when they collapse to a point;
- with DINOv2's objective, `ibot_teacher_entropy`, `ibot_teacher_entropy_frac`, `ibot_prototypes_in_use` and
  `ibot_kl`: the same of the iBOT targets at the masked patches (the KL per masked image).

Per epoch: `rankme`, RankMe (Garrido et al., ICML 2023), exp of the entropy of the normalised singular values
of the backbone embeddings of a fixed probe set (the same up to 1,024 training images, eval transform).

`CollapseDetector`: uniform collapse (teacher entropy near ln K and KL near 0) or single-prototype collapse
(about one prototype in use, or feature spread near 0), of the DINO head or of the iBOT targets ("iBOT uniform",
"iBOT single-prototype"), held for a window after a warm-up prints one
`WARNING: collapse` line; with --stop_on_collapse the run stops (all ranks), the last checkpoint untouched.
"""
import argparse
import math
import time
from typing import Callable, Dict, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

import runtime
import utils

SIGNALS = ("teacher_entropy", "teacher_entropy_frac", "prototypes_in_use", "kl", "feature_spread")
IBOT = "ibot_"  # the prefix of the same signals of the iBOT head's targets (masked patches; DINOv2 objective)
ALL_SIGNALS = SIGNALS + tuple(IBOT + name for name in SIGNALS[:4])


def add_health_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("training health (no labels needed)")
    group.add_argument('--health_probe_size', default=1024, type=int, help="""RankMe of the backbone
        embeddings after every epoch on this many training images (a fixed set, eval transform), logged as
        rankme in log.txt. 0: none.""")
    group.add_argument('--collapse_warmup', default=None, type=int, help="""Collapse detector: iterations
        before it watches (default: the first epoch).""")
    group.add_argument('--collapse_window', default=None, type=int, help="""Collapse detector: iterations a
        collapse must hold before the warning (default: half an epoch, at least 1, at most 200).""")
    group.add_argument('--stop_on_collapse', default=False, type=utils.bool_flag, help="""Stop the run when a
        collapse is detected (the last checkpoint, from before, is kept).""")


def check_args(args: argparse.Namespace) -> None:
    for name in ("health_probe_size", "collapse_warmup", "collapse_window"):
        value = getattr(args, name)
        if value is not None and value < 0:
            raise utils.UserError(f"--{name} must not be negative, got {value}")


# ----------------------------------------------------------------------------------------------------
# Per-step signals
# ----------------------------------------------------------------------------------------------------
@torch.no_grad()
def teacher_log_probs(teacher_output: torch.Tensor, center: torch.Tensor, teacher_temp: float) -> torch.Tensor:
    """log of DINOLoss's teacher probabilities: softmax((t - center) / temp), float32. Take `center` before
    the loss updates it."""
    with torch.autocast(teacher_output.device.type, enabled=False):
        return F.log_softmax((teacher_output.detach().float() - center) / teacher_temp, dim=-1)


@torch.no_grad()
def feature_spread(features: torch.Tensor) -> torch.Tensor:
    """Std across the batch of the l2-normalised features, times sqrt(dim): sqrt of their total variance, in
    [0, 1] (1 - |mean|^2 under the root)."""
    x = F.normalize(features.detach().float(), dim=-1)
    return x.var(dim=0, correction=0).sum().sqrt()


@torch.no_grad()
def dino_signals(teacher_logp: torch.Tensor, loss: torch.Tensor, features: Optional[torch.Tensor] = None,
                 prefix: str = "", loss_weights: Optional[torch.Tensor] = None) -> Dict[str, torch.Tensor]:
    """The per-step signals (0-d device tensors) from the teacher's log-probabilities [2B, K] (as the loss
    used them: `teacher_log_probs`, or the log of Sinkhorn-Knopp's), the DINO loss, and backbone CLS features.

    The loss pairs every teacher view with every other view, each teacher view with the same number of student
    views, so the mean entropy over the pairs is the mean over the teacher rows, and the mean KL over the same
    pairs is the loss minus it (cross-entropy = entropy + KL).

    With `prefix` "ibot_": the same signals of the iBOT targets, `teacher_logp` holding one row per masked patch,
    `loss` the iBOT loss and `loss_weights` the weight of each row in it (iBOT: 1 / (masked patches of its image x
    images)); `kl` is then the loss minus the same weighted entropy, divided by the weights' sum: the mean KL per
    masked image, on the scale of DINO's."""
    if teacher_logp.shape[0] == 0:  # no masked patch in this batch: nothing to say
        return {}
    logq = teacher_logp.float()
    q = logq.exp()
    entropies = -(q * logq).sum(dim=-1)
    entropy = entropies.mean()
    mean_q = q.mean(dim=0)
    batch_entropy = -(mean_q * torch.log(mean_q.clamp_min(1e-30))).sum()
    if loss_weights is None:
        kl = loss.detach().float() - entropy
    else:
        weights = loss_weights.float()
        kl = (loss.detach().float() - (entropies * weights).sum()) / weights.sum()
    out = {prefix + "teacher_entropy": entropy, prefix + "teacher_entropy_frac": entropy / math.log(logq.shape[-1]),
           prefix + "prototypes_in_use": batch_entropy.exp(), prefix + "kl": kl}
    if features is not None:
        out["feature_spread"] = feature_spread(features)
    return out


class InputCatcher:
    """Keeps the input of `module` at its last forward (a MultiCropWrapper's head: the backbone CLS features),
    detached, for `feature_spread`."""

    def __init__(self, module: nn.Module):
        self.value: Optional[torch.Tensor] = None
        module.register_forward_pre_hook(self._hook)

    def _hook(self, module, inputs):
        self.value = inputs[0].detach()

    def pop(self) -> Optional[torch.Tensor]:
        value, self.value = self.value, None
        return value


# ----------------------------------------------------------------------------------------------------
# Per-epoch RankMe
# ----------------------------------------------------------------------------------------------------
@torch.no_grad()
def rankme(embeddings: torch.Tensor, eps: float = 1e-7) -> float:
    """RankMe: exp(-sum p_k log p_k), p_k = sigma_k / ||sigma||_1 + eps, sigma the singular values of the
    [N, D] embedding matrix (Garrido et al. 2023). Between 1 and min(N, D)."""
    if not bool(torch.isfinite(embeddings).all()):
        return float("nan")  # a broken network has no rank to measure (the training loop stops it, saying why)
    s = torch.linalg.svdvals(embeddings.detach().double())
    p = s / s.sum().clamp_min(1e-30) + eps
    return float(torch.exp(-(p * torch.log(p)).sum()))


def build_probe(base, size: int, crop: int):
    """The fixed probe set: up to `size` (--health_probe_size) images of the training collection `base` (the
    training dataset's, so that its folders are not walked twice), evenly spaced, with the eval transform at the
    global crop size `crop`; None when `size` is 0."""
    if not size:
        return None
    import data
    n = min(size, len(base.samples))
    dataset = data.LabeledDataset(base, data.eval_transform(int(round(crop * 256 / 224)), crop))
    indices = torch.linspace(0, len(base.samples) - 1, n).round().long().unique().tolist()
    return torch.utils.data.Subset(dataset, indices)


def probe_rankme(backbone: nn.Module, probe, batch_size: int, device: torch.device, autocast) -> Dict[str, float]:
    """RankMe of `backbone` on the probe set (every rank takes part; all get the same figure)."""
    import backbones
    import data
    start = time.time()
    # no loader workers: workers forked every epoch beside the training loader's and the process group's threads
    # can hang a multi-process CPU run, and 1,024 images decode in seconds
    loader = data.build_eval_loader(probe, batch_size, 0, runtime.get_rank(), runtime.get_world_size())
    was_training = backbone.training
    backbone.eval()
    with torch.no_grad(), autocast():
        features, errors = backbones.extract_features(backbone, loader, device, header="RankMe probe",
                                                      print_freq=10 ** 9)
    backbone.train(was_training)
    if errors:
        features = features[backbones.readable_mask([probe.dataset.base.samples[i] for i in probe.indices],
                                                    errors).to(features.device)]
    value = rankme(features.float())
    print(f"RankMe of the backbone on {len(features)} probe images: {value:.2f} of at most "
          f"{min(features.shape)} ({time.time() - start:.1f} s)")
    return {"rankme": value}


def epoch_callback(args: argparse.Namespace, base, backbone: nn.Module, autocast,
                   evaluate: Optional[Callable[[int], Dict]] = None) -> Optional[Callable[[int], Dict]]:
    """`evaluate(epoch)` for engine.fit: `evaluate`'s figures (the online k-NN) and RankMe on a probe set of
    the training collection `base` (--health_probe_size images)."""
    probe = build_probe(base, args.health_probe_size, args.global_crops_size)
    if probe is None:
        return evaluate

    def both(epoch: int) -> Dict:
        figures = dict(evaluate(epoch)) if evaluate is not None else {}
        figures.update(probe_rankme(backbone, probe, args.batch_size_per_gpu, args.device, autocast))
        return figures
    return both


# ----------------------------------------------------------------------------------------------------
# Collapse detector
# ----------------------------------------------------------------------------------------------------
ADVICE = {
    "uniform": "the teacher outputs a near-uniform distribution that the student already matches: sharpen the "
               "teacher (lower --teacher_temp / --warmup_teacher_temp, e.g. 0.04, well below the student's 0.1), "
               "lower --lr, or raise --momentum_teacher",
    "single-prototype": "every image goes to about one prototype / the same feature: keep centring on "
                        "(--center_momentum 0.9), raise --teacher_temp slightly or lengthen "
                        "--warmup_teacher_temp_epochs, lower --lr, or raise --momentum_teacher",
}


class CollapseDetector:
    """Watches the per-step signals. `observe(it, metrics)` takes the global iteration and the step's metrics
    (`dino_signals`' names; tensors or numbers) and returns the one warning line when a collapse has held for
    `window` iterations after `warmup` iterations (then `self.collapsed` names the kind), else None. `watch`,
    the training loop's call, observes every `every`-th step (reading the metrics waits for the device), prints
    the warning and, with `stop` (--stop_on_collapse), stops every rank together, naming `checkpoint_path`.

    Uniform: teacher_entropy_frac >= `uniform_entropy` and kl <= `uniform_kl` nats. Single-prototype:
    prototypes_in_use <= `single_prototypes` or feature_spread <= `single_spread`."""

    def __init__(self, warmup: int, window: int, uniform_entropy: float = 0.9, uniform_kl: float = 0.05,
                 single_prototypes: float = 1.5, single_spread: float = 0.05, every: int = 1, stop: bool = False,
                 checkpoint_path: str = "checkpoint.pth"):
        self.warmup, self.window = warmup, max(window, 0)
        self.uniform_entropy, self.uniform_kl = uniform_entropy, uniform_kl
        self.single_prototypes, self.single_spread = single_prototypes, single_spread
        self.every, self.stop, self.checkpoint_path = max(every, 1), stop, checkpoint_path
        self.since: Dict[str, int] = {}
        self.collapsed: Optional[str] = None

    def kinds(self, v: Dict[str, float]) -> Dict[str, bool]:
        uniform = v.get("teacher_entropy_frac", 0.) >= self.uniform_entropy and v.get("kl", 1e9) <= self.uniform_kl
        single = (v.get("prototypes_in_use", 1e9) <= self.single_prototypes
                  or v.get("feature_spread", 1e9) <= self.single_spread)
        kinds = {"uniform": uniform, "single-prototype": single}
        if any(k.startswith(IBOT) for k in v):  # the iBOT head's targets (DINOv2 objective)
            kinds["iBOT uniform"] = (v.get(IBOT + "teacher_entropy_frac", 0.) >= self.uniform_entropy
                                     and v.get(IBOT + "kl", 1e9) <= self.uniform_kl)
            kinds["iBOT single-prototype"] = v.get(IBOT + "prototypes_in_use", 1e9) <= self.single_prototypes
        return kinds

    def observe(self, it: int, metrics: Dict) -> Optional[str]:
        if self.collapsed is not None or it < self.warmup:
            return None
        values = {k: float(metrics[k]) for k in ALL_SIGNALS if k in metrics}  # the host reads the device here
        if not values:
            return None
        for kind, now in self.kinds(values).items():
            if not now:
                self.since.pop(kind, None)
                continue
            start = self.since.setdefault(kind, it)
            if it - start >= self.window:
                self.collapsed = kind
                measured = ", ".join(f"{k} {values[k]:.4g}" for k in ALL_SIGNALS if k in values)
                return (f"WARNING: collapse ({kind}) at iteration {it}, held since iteration {start}: {measured}. "
                        f"What to change: {ADVICE[kind.replace('iBOT ', '')]}.")
        return None

    def watch(self, it: int, metrics: Dict) -> None:
        """After optimizer step `it` (every rank at the same steps): observe, warn, and stop if asked to."""
        if it % self.every:
            return
        warning = self.observe(it, metrics)
        if warning:
            print(warning)
        if self.stop:
            runtime.raise_together(None if not warning else (
                f"{warning} Stopping (--stop_on_collapse): the last checkpoint ({self.checkpoint_path}, if any) is "
                "kept, from before this iteration."))


def build_detector(niter_per_ep: int, warmup: Optional[int] = None, window: Optional[int] = None,
                   **options) -> CollapseDetector:
    """The detector of a run of `niter_per_ep` steps per epoch: --collapse_warmup (default: the first epoch) and
    --collapse_window (default: half an epoch, at least 1, at most 200); `options` as CollapseDetector takes them."""
    warmup = warmup if warmup is not None else niter_per_ep
    window = window if window is not None else min(200, max(1, niter_per_ep // 2))
    return CollapseDetector(warmup, window, **options)
