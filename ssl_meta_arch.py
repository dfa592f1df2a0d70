# Copyright (c) the contributors of this project. Licensed under the Apache License 2.0.
# Follows dinov2/train/ssl_meta_arch.py, dinov2/utils/param_groups.py and dinov2/train/train.py of
# facebookresearch/dinov2 (Apache 2.0).
"""The pieces of DINOv2's objective that are not losses: a backbone with a DINO head and an iBOT head run on
masked global crops, DINOv2's optimizer parameter groups, its per-module gradient clipping and its per-iteration
teacher-temperature schedule. main_dino.py (with --ibot_loss_weight / --koleo_loss_weight) and main_distill.py
use them; the losses are in losses/.

- `SSLModel(backbone, head, ibot_head)`: the student (or the EMA teacher) of DINOv2's `SSLMetaArch`.
- `dinov2_step`: the loss of one step (`SSLMetaArch.forward_backward` without the backward) for engine.py's loop;
  `teacher_log_probs`: the teacher probabilities a DINOLoss uses, for the health signals.
- `tokens_and_grid`, `masked_rows`: CLS and patch tokens of any ViT; the masked rows of a token tensor;
  `compile_forward_features`: --compile of the masked forward.
- `params_groups_with_decay`: layer-wise learning-rate decay, the patch-embedding multiplier, no weight decay on
  biases, norms and LayerScale, the heads' last layers marked (DINOv2's `get_params_groups_with_decay`, fused).
- `clip_gradients_per_module`: DINOv2 clips the total gradient norm of each of backbone, DINO head and iBOT head.
- `teacher_temp_schedule`: a linear warm-up per iteration, then constant (DINOv2's teacher-temperature scheduler).
- `dinov2_step(..., gram=...)` also adds DINOv3's Gram loss to a gram_anchoring.GramTeacher.
"""
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn as nn

import backbones
import health
import utils
from losses import DINOLoss, sinkhorn_knopp


def tokens_and_grid(model: nn.Module, images: torch.Tensor, masks: Optional[torch.Tensor] = None
                    ) -> Tuple[torch.Tensor, torch.Tensor, Tuple[int, int]]:
    """(normalised CLS token [B, D], patch tokens [B, N, D], patch grid (h, w)) of a ViT, ours or timm's;
    register/storage tokens are left out."""
    tokens = model.forward_features(images, masks) if masks is not None else model.forward_features(images)
    n_prefix = getattr(model, "num_prefix_tokens", 1)
    return tokens[:, 0], tokens[:, n_prefix:], backbones.patch_grid(model, images)


def features_and_patches(model: nn.Module, images: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """(`model(images)`, the patch tokens [B, N, D]) from one pass: a timm model's pooled feature through its own
    `forward_head` (CLS or mean, whichever its `global_pool`), our ViTs' normalised CLS token."""
    tokens = model.forward_features(images)
    patches = tokens[:, getattr(model, "num_prefix_tokens", 1):]
    if hasattr(model, "forward_head"):
        return model.forward_head(tokens, pre_logits=True), patches
    return tokens[:, 0], patches


def masked_rows(tokens: torch.Tensor, masks: torch.Tensor, mask_index: Optional[torch.Tensor]) -> torch.Tensor:
    """`tokens[masks]` ([B, N, D] -> [M, D]). With the precomputed flat indices of the mask (the loader's
    masking.collate_masked_crops), a gather whose size the host already knows: boolean indexing would copy M
    to the host first, a GPU synchronisation every step."""
    if mask_index is None:
        return tokens[masks]
    return tokens.flatten(0, 1).index_select(0, mask_index)


class SSLModel(nn.Module):
    """A backbone with a DINO head (`head`, the key of MultiCropWrapper checkpoints) and, for iBOT, either a
    separate `ibot_head` or the DINO head again (`ibot_head=None`, DINOv2's default). Both the student and the
    EMA teacher of the DINOv2 objective are one of these, with the same keys, so that the EMA runs over their
    parameters in the same order and eval_knn.py reads `backbone.*` as from any checkpoint of ours.

    `forward(crops, masks, mask_index, apply_masks=True, ibot=True, patches=False)`:
    - crops: [global1, global2, local1, ...] of [B, 3, H, W] (locals may be absent: the teacher's input);
    - masks: [2B, N] bool over the global crops' patches, crop-major like torch.cat(crops[:2]); applied to the
      backbone's input (mask token) when `apply_masks` (the student), only used to select the iBOT rows
      otherwise (the teacher sees the crops whole);
    - returns (DINO logits of every crop's CLS [(2+L)B, K], crop-major; iBOT logits of the masked patches [M, K]
      in `masked_rows` order, None without iBOT; the global crops' backbone CLS tokens [2B, D]), and with
      `patches` a fourth item: every patch token of the global crops [2B, N, D] (masked input where masked), for
      Gram anchoring.
    With a shared head, the CLS tokens and the masked patch tokens go through it in one call, as in DINOv2 (two
    calls when the head has batch norms)."""

    def __init__(self, backbone: nn.Module, head: nn.Module, ibot_head: Optional[nn.Module] = None):
        super().__init__()
        self.backbone, self.head, self.ibot_head = backbone, head, ibot_head
        self.head_has_batchnorm = utils.has_batchnorms(head)

    def forward(self, crops: Sequence[torch.Tensor], masks: Optional[torch.Tensor] = None,
                mask_index: Optional[torch.Tensor] = None, apply_masks: bool = True, ibot: bool = True,
                patches: bool = False):
        global_crops = torch.cat(list(crops[:2]))
        g_patch = None
        if ibot:
            g_cls, g_patch, _ = tokens_and_grid(self.backbone, global_crops, masks if apply_masks else None)
            masked = masked_rows(g_patch, masks, mask_index)
        elif patches:  # KoLeo with Gram anchoring: the pooled feature and the patch tokens of one pass
            (g_cls, g_patch), masked = features_and_patches(self.backbone, global_crops), None
        else:  # KoLeo without iBOT: any backbone that gives a CLS / pooled feature
            g_cls, masked = self.backbone(global_crops), None
        local = list(crops[2:])
        cls = torch.cat([g_cls] + [self.backbone(torch.cat(local[a:b])) for a, b in utils.resolution_runs(local)])
        extra = (g_patch,) if patches else ()
        if masked is None:
            return (self.head(cls), None, g_cls) + extra
        if self.ibot_head is not None or self.head_has_batchnorm:
            # a BatchNorm head (--use_bn_in_head; DINOv2's have none) normalises CLS and patch tokens apart: in one
            # batch, the teacher's CLS rows would be normalised with statistics mostly of patch tokens
            return (self.head(cls), (self.ibot_head or self.head)(masked), g_cls) + extra
        logits = self.head(torch.cat([cls, masked]))  # one call of the shared head, as DINOv2's
        return (logits[:len(cls)], logits[len(cls):], g_cls) + extra


def compile_forward_features(*models: nn.Module) -> None:
    """--compile where the masked global crops (and a distillation teacher's patch tokens) go through
    `forward_features`, which `Module.compile` (main_dino.speed_setup) does not reach, since it compiles what
    `module(x)` runs. The bound methods are compiled in place (one graph per input shape), as instance
    attributes: the modules' state_dict keys do not change."""
    for model in models:
        if not getattr(model.forward_features, "_dino_compiled", False):
            compiled = torch.compile(model.forward_features, dynamic=False)
            compiled._dino_compiled = True
            model.forward_features = compiled


# ----------------------------------------------------------------------------------------------------
# The training step
# ----------------------------------------------------------------------------------------------------
def teacher_log_probs(dino_loss: DINOLoss, teacher_output: torch.Tensor, temp: float) -> torch.Tensor:
    """The log of the teacher probabilities that `dino_loss` uses (centred softmax with the centre before its
    update, or Sinkhorn-Knopp's), for the health signals."""
    if dino_loss.centering == "sinkhorn_knopp":
        return torch.log(sinkhorn_knopp(teacher_output, temp).clamp_min(1e-30))
    return health.teacher_log_probs(teacher_output, dino_loss.center, temp)


def dinov2_step(student: nn.Module, teacher: nn.Module, losses: dict, weights: dict, teacher_temp_schedule,
                gram: Optional[nn.Module] = None):
    """DINOv2's part of the shared loop (its SSLMetaArch.forward_backward, without the backward): the teacher on
    the 2 unmasked global crops, the student on all crops with the global ones masked, then

        loss = w_dino * DINO(every CLS vs the other global crops' CLS)
             + w_ibot * iBOT(the masked patches, each image weighted by 1 / its masked count)
             + w_koleo * (KoLeo(CLS of global crop 1) + KoLeo(CLS of global crop 2)),

    DINO's mean over view pairs being DINOv2's local + global terms, and its iBOT term its masked loss with its
    two scales (2 x 1/2). The teacher temperature of both heads comes from `teacher_temp_schedule[it]`. Health
    signals of both heads' targets and of the teacher's backbone CLS.

    With `gram` (and `losses["gram"]`, a losses.GramLoss), DINOv3's Gram anchoring is added:
    `+ w_gram * Gram(the student's patch tokens of both global crops, masked input included, as DINOv3's
    tokens_used "all"; the Gram teacher's on the same crops unmasked, or on the batch's two last crops, the
    larger copies of the global ones, when `gram.crops_size` is set)`."""
    dino_loss, ibot_loss, koleo_loss = losses["dino"], losses.get("ibot"), losses.get("koleo")

    def step(batch, epoch: int, it: int):
        if ibot_loss is not None:
            crops, masks, mask_index = batch  # masking.collate_masked_crops
            masks = masks.transpose(0, 1).flatten(0, 1)  # [B, 2, N] -> [2B, N], crop-major like the crops
        else:
            crops, masks, mask_index = batch, None, None
        gram_crops = None
        if gram is not None:
            crops, gram_crops = (crops[:-2], crops[-2:]) if gram.crops_size else (crops, crops[:2])
        temp = float(teacher_temp_schedule[min(it, len(teacher_temp_schedule) - 1)])
        ibot = ibot_loss is not None
        with torch.no_grad():
            t_dino, t_ibot, t_cls = teacher(crops[:2], masks, mask_index, apply_masks=False, ibot=ibot)
        s_dino, s_ibot, s_cls, *s_patch = student(crops, masks, mask_index, ibot=ibot, patches=gram is not None)
        teacher_logp = teacher_log_probs(dino_loss, t_dino, temp)
        terms = {"dino_loss": dino_loss(s_dino, t_dino, epoch, teacher_temp=temp)}
        if gram is not None:
            grid = backbones.patch_grid(gram.backbone, crops[0])  # the student's grid: the Gram teacher is its architecture
            terms["gram_loss"] = losses["gram"](s_patch[0], gram.patch_targets(torch.cat(list(gram_crops)), grid))
        signals = health.dino_signals(teacher_logp, terms["dino_loss"], t_cls)
        if ibot:
            if dino_loss.centering == "sinkhorn_knopp":
                probs = sinkhorn_knopp(t_ibot, temp)
                ibot_logp = torch.log(probs.clamp_min(1e-30))
                terms["ibot_loss"] = ibot_loss(s_ibot, None, masks, epoch, teacher_probs=probs, mask_index=mask_index)
            else:
                ibot_logp = health.teacher_log_probs(t_ibot, ibot_loss.center.view(1, -1), temp)
                terms["ibot_loss"] = ibot_loss(s_ibot, t_ibot, masks, epoch, mask_index=mask_index, teacher_temp=temp)
            # each masked patch's weight in the iBOT loss: 1 / (its image's masked patches x images)
            patch_weights = (1.0 / masks.sum(dim=1, keepdim=True).clamp(min=1)).expand(masks.shape) / masks.shape[0]
            patch_weights = masked_rows(patch_weights, masks, mask_index)
            signals.update(health.dino_signals(ibot_logp, terms["ibot_loss"], prefix=health.IBOT,
                                               loss_weights=patch_weights))
        if koleo_loss is not None:  # each global crop's CLS on its own, as DINOv2 (not two views of one image)
            terms["koleo_loss"] = sum(koleo_loss(cls) for cls in s_cls.chunk(2))
        total = sum(weights[name] * value for name, value in terms.items())
        return total, {**{k: v.detach() for k, v in terms.items()}, "teacher_temp": temp, **signals}

    return step


# ----------------------------------------------------------------------------------------------------
# Optimizer: DINOv2's parameter groups and clipping
# ----------------------------------------------------------------------------------------------------
_LAYER_ZERO = ("pos_embed", "patch_embed", "mask_token", "cls_token", "register_tokens")


def vit_lr_decay_rate(name: str, lr_decay_rate: float, num_layers: int, is_backbone: bool) -> float:
    """DINOv2's `get_vit_lr_decay_rate` for a parameter name relative to its submodule: tokens and patch
    embedding at layer 0, block i at layer i + 1, everything else (final norm, heads) at num_layers + 1."""
    layer_id = num_layers + 1
    if is_backbone:
        if any(key in name for key in _LAYER_ZERO):
            layer_id = 0
        elif "blocks." in name and "residual." not in name:
            layer_id = int(name[name.find("blocks."):].split(".")[1]) + 1
    return lr_decay_rate ** (num_layers + 1 - layer_id)


def params_groups_with_decay(model: nn.Module, layerwise_decay: float = 1.0, patch_embed_lr_mult: float = 1.0,
                             backbone_lr_scale: float = 1.0) -> List[Dict]:
    """DINOv2's optimizer groups for an `SSLModel`-like module (submodules `backbone`, `head`, `ibot_head`),
    fused by (lr_scale, wd_scale, last_layer): the training loop sets lr = schedule x lr_scale (0 for a
    `last_layer` group while the last layer is frozen) and weight decay = schedule x wd_scale.

    - lr_scale: layerwise_decay ** (depth + 1 - layer) in the backbone (needs `backbone.blocks`), times
      patch_embed_lr_mult for the patch embedding, times backbone_lr_scale for the backbone;
    - wd_scale 0 for biases, norms and LayerScale (`gamma`), as DINOv2, and for any other 1-d parameter
      (BatchNorm weights of a --use_bn_in_head head, which DINOv2's heads do not have);
    - last_layer: the heads' `last_layer` weights.
    The first group holds scale-1 parameters (a head's), so that group 0's lr is the schedule's, as logged."""
    fused: Dict[Tuple[float, float, bool], List[nn.Parameter]] = {}
    for sub_name, sub in model.named_children():
        is_backbone = sub_name == "backbone"
        num_layers = len(sub.blocks) if is_backbone and hasattr(sub, "blocks") else 0
        for name, param in sub.named_parameters():
            if not param.requires_grad:
                continue
            lr_scale = vit_lr_decay_rate(name, layerwise_decay, num_layers, num_layers > 0)
            if "patch_embed" in name:
                lr_scale *= patch_embed_lr_mult
            if is_backbone:
                lr_scale *= backbone_lr_scale
            no_decay = name.endswith(".bias") or "norm" in name or "gamma" in name or param.ndim == 1
            key = (lr_scale, 0.0 if no_decay else 1.0, "last_layer" in name)
            fused.setdefault(key, []).append(param)
    order = sorted(fused, key=lambda k: k != (1.0, 1.0, False))  # stable: the scale-1 group first
    return [{"params": fused[k], "lr_scale": k[0], "wd_scale": k[1], "last_layer": k[2]} for k in order]


@torch.no_grad()
def clip_gradients_per_module(model: nn.Module, clip: float) -> torch.Tensor:
    """DINOv2's clipping: the total gradient norm of each child module (backbone, DINO head, iBOT head) is
    clipped to `clip` on its own, as torch.nn.utils.clip_grad_norm_ does it (coefficient clip / (norm + 1e-6), at
    most 1), from one pass of per-parameter norms. Returns those norms before clipping (as utils.clip_gradients),
    in the order of model.parameters()."""
    model = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
    all_norms = []
    for sub in model.children():
        grads, norms = utils.grad_norms(sub)
        if norms is None:
            continue
        coef = (clip / (norms.norm() + 1e-6)).clamp_(max=1.0)
        torch._foreach_mul_(grads, coef)
        all_norms.append(norms)
    return torch.cat(all_norms) if all_norms else torch.zeros(0)


def teacher_temp_schedule(warmup_teacher_temp: float, teacher_temp: float, warmup_iters: int,
                          total_iters: int) -> np.ndarray:
    """DINOv2's teacher temperature per iteration: linear from warmup_teacher_temp to teacher_temp over
    `warmup_iters` iterations (np.linspace, as its CosineScheduler), then teacher_temp; `total_iters` values
    (a warm-up longer than the run is cut, not compressed)."""
    warmup = np.linspace(warmup_teacher_temp, teacher_temp, max(warmup_iters, 0))
    return np.concatenate((warmup, np.full(max(total_iters - len(warmup), 0), teacher_temp)))[:total_iters]
