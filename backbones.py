# Copyright (c) the contributors of this project. Licensed under the Apache License 2.0.
# LinearClassifier and the ViT features under it follow facebookresearch/dino's eval_linear.py (Apache 2.0).
"""Backbones by name, and the frozen models and linear classifiers of evaluation.

- `build_backbone(arch)`: our ViTs (vision_transformer.py, official `deit_*` aliases), any torchvision
  classification model, or any timm model, without classifier, and its feature width. Never downloads.
- `build_eval_model(...)`: a backbone with loaded weights, frozen, in eval mode (eval_knn.py, eval_linear.py).
- `extract_features(...)`: the features of a whole dataset, in dataset order, on every rank.
- `patch_features(...)`: the feature maps of the last layers (visualize_features.py, eval_segmentation.py);
  `patch_grid`, `has_patch_tokens`: the patch grid of a ViT and whether a backbone has patch tokens.
- `linear_features(...)`, `LinearClassifier`, `LinearHeads` and `load_linear_weights`: the official
  linear-probe features, classifier and weight files (eval_linear.py and the `_lc` entry points of hubconf.py).

torchvision and timm are imported inside the functions that need them.
"""
import difflib
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
import torch.nn as nn

import checkpointing
import runtime
import utils
import vision_transformer as vits
from utils import UserError

VIT_ARCHS = ("vit_nano", "vit_tiny", "vit_small", "vit_base", "vit_large", "vit_giant2")
# The backbones of Meta's released DINOv2 files (vision_transformer.dinov2_vit): /14 patches whatever --patch_size.
DINOV2_ARCHS = tuple(f"dinov2_vit{size}14{reg}" for reg in ("", "_reg4") for size in "sblg")
DINOV2_PATCH_SIZE = 14
OUR_VITS = ", ".join(VIT_ARCHS) + ", dinov2_vit{s,b,l,g}14[_reg4]"  # for messages


DEIT_ALIASES = {"deit_tiny": "vit_tiny", "deit_small": "vit_small", "deit_base": "vit_base"}


def torchvision_archs() -> List[str]:
    import torchvision
    return sorted(torchvision.models.list_models(module=torchvision.models))


def _strip_torchvision_classifier(model: nn.Module) -> int:
    """Replace the last Linear of a torchvision classifier by Identity; return its input width."""
    for attr in ("fc", "classifier", "heads", "head"):
        head = getattr(model, attr, None)
        if head is None:
            continue
        if isinstance(head, nn.Linear):
            setattr(model, attr, nn.Identity())
            return head.in_features
        if isinstance(head, nn.Sequential):
            linears = [i for i, m in enumerate(head) if isinstance(m, nn.Linear)]
            if linears:
                in_features = head[linears[-1]].in_features
                head[linears[-1]] = nn.Identity()
                return in_features
    raise UserError(f"cannot find the classifier of torchvision model {type(model).__name__} to replace")


def add_model_args(parser, *, arch: Optional[str] = "vit_small", patch_size: Optional[int] = 16,
                   weights: bool = True, images: bool = True, batch_size: int = 128, num_workers: int = 10) -> None:
    """The model flags of every script that builds a network and loads weights, defined here once: --arch,
    --patch_size, --pretrained_weights (unless `weights` is False) and --checkpoint_key; with `images`, also how
    evaluation feeds it (--batch_size_per_gpu, --resize_size, --crop_size, --num_workers). The defaults are the
    script's: visualize_attention.py's --patch_size 8 (official), export_backbone.py's None (from the checkpoint)."""
    saved = " Default: the one the checkpoint records."
    parser.add_argument('--arch', default=arch, type=str, help="""Architecture: vit_nano/tiny/small/base/large
        (deit_* aliases), a torchvision classification model (e.g. resnet50) or any timm model name (e.g.
        vit_small_patch16_dinov3). Weights are never downloaded.""" + ("" if arch else saved))
    parser.add_argument('--patch_size', default=patch_size, type=int,
                        help="Patch resolution of the model (our ViTs)." + ("" if patch_size else saved))
    if weights:
        parser.add_argument('--pretrained_weights', default='', type=str, help="""Weights to start from or to
            evaluate: a checkpoint of main_dino.py or main_distill.py, an official DINO file, a backbone-only file
            of export_backbone.py, a torchvision or timm state_dict, Meta's DINOv2 or DINOv3 files (an http(s) URL
            is downloaded once). Empty: random weights.""")
    parser.add_argument("--checkpoint_key", default="teacher", type=str,
                        help='Key to use in the checkpoint (example: "teacher")')
    if images:
        parser.add_argument('--batch_size_per_gpu', default=batch_size, type=int, help='Per-GPU batch-size')
        parser.add_argument('--resize_size', default=256, type=int, help="""Short side after the bicubic resize
            (256 for ImageNet-size images; e.g. 32 for CIFAR at 32 px).""")
        parser.add_argument('--crop_size', default=224, type=int,
                            help='Side of the center crop (and of the train crops of eval_linear.py).')
        parser.add_argument('--num_workers', default=num_workers, type=int,
                            help='Number of data loading workers per GPU.')


def build_backbone(arch: str, patch_size: int = 16, drop_path_rate: float = 0.,
                   **vit_kwargs) -> Tuple[nn.Module, int]:
    """Backbone without classifier, and its feature width, for `--arch`.

    Our ViTs (vit_nano/tiny/small/base/large/giant2, the official deit_* aliases, and dinov2_vit{s,b,l,g}14[_reg4],
    the backbones of Meta's DINOv2 files, whose patch size is 14 whatever `patch_size`), any torchvision
    classification model, or any timm model name. Never downloads weights.
    """
    arch = DEIT_ALIASES.get(arch, arch)
    if arch in DINOV2_ARCHS:
        model = getattr(vits, arch)(drop_path_rate=drop_path_rate, **vit_kwargs)
        return model, model.embed_dim
    if arch in VIT_ARCHS:
        model = getattr(vits, arch)(patch_size=patch_size, drop_path_rate=drop_path_rate, **vit_kwargs)
        return model, model.embed_dim
    tv_archs = torchvision_archs()
    if arch in tv_archs:
        import torchvision
        model = torchvision.models.get_model(arch, weights=None)
        return model, _strip_torchvision_classifier(model)
    import timm
    if timm.is_model(arch):
        # dynamic_img_size lets timm ViTs take the local crops; drop_path_rate where the model has one.
        # Meta's DINOv3 models output the normalised CLS token; timm's ports default to average pooling.
        pool = {"global_pool": "token"} if "dinov3" in arch else {}
        for extra in ({"drop_path_rate": drop_path_rate, "dynamic_img_size": True},
                      {"drop_path_rate": drop_path_rate}, {}):
            try:
                model = timm.create_model(arch, pretrained=False, num_classes=0, **pool, **extra)
                break
            except TypeError:
                continue
        return model, model.num_features
    candidates = list(VIT_ARCHS) + list(DINOV2_ARCHS) + list(DEIT_ALIASES) + tv_archs
    close = difflib.get_close_matches(arch, candidates + timm.list_models(), n=3)
    hint = f" Did you mean {', '.join(close)}?" if close else ""
    raise UserError(f"unknown --arch {arch!r}: use one of {OUR_VITS}, a torchvision classification "
                    f"model (e.g. resnet50) or a timm model name (timm.list_models()).{hint}")


def check_input_sizes(model: nn.Module, sizes: Dict[str, int], arch: str) -> None:
    """One forward of a single image at each crop size (`sizes`: flag -> pixels) before training, so that a
    backbone that cannot take a size (a convnet whose downsampling leaves nothing of a small local crop) stops
    here with the flag to change and the smallest size that works, not in the first step."""
    for flag, size in sizes.items():
        if _strided_conv_inputs(model, size) is None:
            hint = _larger_size_hint(flag, size, lambda s: _strided_conv_inputs(model, s) is not None)
            raise UserError(f"{arch} cannot take {flag} {size} (the image is too small for its downsampling): {hint}")


def check_cpu_bf16_convolutions(model: nn.Module, sizes: Dict[str, int], arch: str) -> None:
    """For a run in bf16 on a CPU: stop before training when a crop size gives a strided convolution a 1x1 input,
    whose oneDNN backward returns NaN weight gradients (docs/performance.md)."""
    def on_1x1(size: int) -> List[str]:
        return [name for name, hw in _strided_conv_inputs(model, size) or [] if hw == (1, 1)]

    for flag, size in sizes.items():
        hits = on_1x1(size)
        if hits:
            hint = _larger_size_hint(flag, size, lambda s: _strided_conv_inputs(model, s) is not None and not on_1x1(s))
            raise UserError(f"{arch} at {flag} {size} gives a 1x1 map to a strided convolution ({hits[0]}), whose "
                            f"bf16 backward on CPU returns NaN gradients in this PyTorch (docs/performance.md): "
                            f"train in fp32 (drop --amp_dtype bf16) or {hint}")


def _strided_conv_inputs(model: nn.Module, size: int) -> Optional[List[Tuple[str, Tuple[int, int]]]]:
    """(name, input height and width) of every strided convolution in one forward of a `size` x `size` image, in
    eval mode (batch norms of one image use their running statistics); None when the model cannot take it."""
    seen, hooks = [], []
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d) and max(m.stride) > 1:
            hooks.append(m.register_forward_hook(
                lambda mod, inp, out, name=name: seen.append((name, tuple(inp[0].shape[-2:])))))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(torch.zeros(1, 3, size, size, device=next(model.parameters()).device))
    except (RuntimeError, ValueError, AssertionError):
        return None
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    return seen


def _larger_size_hint(flag: str, size: int, works: Callable[[int], bool]) -> str:
    larger = next((s for s in (16, 24, 32, 48, 64, 96, 128, 160, 192, 224, 256, 320) if s > size and works(s)), None)
    return f"use {flag} {larger} or more" if larger else "use a larger size"


def is_vit(arch: str) -> bool:
    """Our ViTs get the official CLS-token features; anything else (timm ViTs included) gives model(images)."""
    return DEIT_ALIASES.get(arch, arch) in VIT_ARCHS + DINOV2_ARCHS


def patch_size_of(arch: str, patch_size: int) -> int:
    """The patch size `--arch` builds with: a DINOv2 name's own (14), else `--patch_size`."""
    return DINOV2_PATCH_SIZE if arch in DINOV2_ARCHS else patch_size


def build_eval_model(arch: str, patch_size: int, pretrained_weights: str, checkpoint_key: Optional[str],
                     device: torch.device) -> nn.Module:
    """The frozen backbone to evaluate, in eval mode on `device`."""
    model, _ = build_backbone(arch, patch_size)
    patch_size = patch_size_of(arch, patch_size)
    checkpointing.load_pretrained_weights(model, pretrained_weights, checkpoint_key, arch, patch_size)
    model.eval().requires_grad_(False)
    print(f"Model {arch} {patch_size}x{patch_size} built.")
    return model.to(device)


def has_patch_tokens(model: nn.Module) -> bool:
    """Whether `model` gives patch tokens (our ViTs, timm ViTs: a patch embedding and `forward_features` giving
    [B, tokens, D], as ssl_meta_arch.tokens_and_grid reads them); convnets have a feature map instead."""
    return hasattr(model, "patch_embed") and hasattr(model, "forward_features") and hasattr(
        getattr(model, "patch_embed"), "patch_size")


def patch_grid(model: nn.Module, images: torch.Tensor) -> Tuple[int, int]:
    """The (rows, columns) of patches of `images` in a ViT with `model.patch_embed.patch_size`."""
    patch = model.patch_embed.patch_size
    ph, pw = (patch, patch) if isinstance(patch, int) else tuple(patch)
    return images.shape[-2] // ph, images.shape[-1] // pw


@torch.no_grad()
def patch_features(model: nn.Module, images: torch.Tensor, arch: str, n_last_blocks: int = 1) -> List[torch.Tensor]:
    """The features at every position of the last `n_last_blocks` layers, each [B, h, w, D] (oldest first). Our
    ViTs: the normalised patch tokens of each block (get_intermediate_layers, registers and CLS dropped), as
    DINOv2's dense evaluations take them; timm models: the same for timm ViTs, else forward_features; torchvision
    convnets: the feature map before global pooling (one layer only)."""
    B = images.shape[0]
    if is_vit(arch):
        layers = (model.get_intermediate_layers(images, n_last_blocks) if n_last_blocks > 1
                  else [model.forward_features(images)])  # forward_features: one norm pass, fused paths
        return [x[:, model.num_prefix_tokens:].reshape(B, *patch_grid(model, images), -1) for x in layers]
    if type(model).__module__.startswith("timm."):
        if n_last_blocks > 1 and hasattr(model, "get_intermediate_layers"):  # timm ViTs: [B, D, h, w] each
            return [x.permute(0, 2, 3, 1) for x in
                    model.get_intermediate_layers(images, n_last_blocks, reshape=True, norm=True)]
        _one_layer(arch, n_last_blocks)
        out = model.forward_features(images)
        if out.ndim == 3:  # a ViT: [B, prefix + h * w, D]
            return [out[:, getattr(model, "num_prefix_tokens", 1):].reshape(B, *patch_grid(model, images), -1)]
        if out.ndim != 4:
            raise UserError(f"--arch {arch} gives no feature map (forward_features has shape {tuple(out.shape)}): "
                            f"use a model with a patch grid, e.g. one of our ViTs ({OUR_VITS}) or a ResNet")
        return [out if getattr(model, "output_fmt", "NCHW") == "NHWC" else out.permute(0, 2, 3, 1)]
    _one_layer(arch, n_last_blocks)
    if hasattr(model, "layer4"):  # torchvision ResNets: everything before the global average pooling
        trunk = nn.Sequential(model.conv1, model.bn1, model.relu, model.maxpool,
                              model.layer1, model.layer2, model.layer3, model.layer4)
        return [trunk(images).permute(0, 2, 3, 1)]
    if isinstance(getattr(model, "features", None), nn.Module):  # VGG, DenseNet, MobileNet, EfficientNet...
        return [model.features(images).permute(0, 2, 3, 1)]
    raise UserError(f"--arch {arch}: cannot find the last feature map (a patch grid) of this model; use one of our "
                    f"ViTs ({OUR_VITS}), a timm model or a torchvision ResNet")


def _one_layer(arch: str, n_last_blocks: int) -> None:
    if n_last_blocks > 1:
        raise UserError(f"--arch {arch} gives the features of its last layer only: the last {n_last_blocks} layers "
                        "need a ViT (ours or timm's); use --n_last_blocks 1")


def gather_in_order(local: torch.Tensor, num_samples: int, chunk_rows: int = 4096) -> torch.Tensor:
    """Rows of all ranks in dataset order, on the CPU. Rank r holds rows r, r + W, ... of the evenly padded
    order of a non-shuffling DistributedSampler; the padding (repeated first samples) is dropped. Gathered in
    chunks into one CPU buffer, so that no GPU ever holds more than W chunks (ImageNet on a 16 GB GPU)."""
    if not utils.is_dist_avail_and_initialized() or dist.get_world_size() == 1:
        return local[:num_samples].cpu()
    world = dist.get_world_size()
    comm_device = local.device if dist.get_backend() == "nccl" else torch.device("cpu")
    out = torch.empty(local.shape[0] * world, *local.shape[1:], dtype=local.dtype)
    for start in range(0, local.shape[0], chunk_rows):
        part = local[start:start + chunk_rows].to(comm_device).contiguous()
        parts = [torch.empty_like(part) for _ in range(world)]
        dist.all_gather(parts, part)
        out[start * world:(start + part.shape[0]) * world] = torch.stack(parts, dim=1).flatten(0, 1).cpu()
    return out[:num_samples]


@torch.no_grad()
def extract_features(model: nn.Module, data_loader, device: torch.device, use_cuda: bool = True,
                     header: str = "Features", print_freq: int = 10,
                     forward: Optional[Callable[[torch.Tensor], torch.Tensor]] = None
                     ) -> Tuple[torch.Tensor, List[str]]:
    """Features (`forward(images)`, by default `model(images)`) of every image of `data_loader.dataset`,
    in dataset order, on every rank.

    Returns `(features [N, D] float32, errors)`; `errors` names the images that could not be read (their
    rows are zero; see `readable_mask`). Features end on `device` when `use_cuda`, else on the CPU.
    """
    metric_logger = utils.MetricLogger(delimiter="  ")
    local, errors = [], []
    for samples, _, bad in metric_logger.log_every(data_loader, print_freq, header):
        samples = samples.to(device, non_blocking=True)
        feats = (forward or model)(samples).float()
        local.append(feats if use_cuda else feats.cpu())
        errors += [b for b in bad if b]
    features = gather_in_order(torch.cat(local), len(data_loader.dataset))
    return features.to(device if use_cuda else "cpu"), runtime.union_over_ranks(errors)


def readable_mask(samples: Sequence[Tuple[str, int]], errors: Sequence[str]) -> torch.Tensor:
    """[N] bool, in the order of `samples` ((path, label) pairs): False for the images named in `errors`
    ("path: reason" lines)."""
    bad_paths = {e.split(": ", 1)[0] for e in errors}
    return torch.tensor([path not in bad_paths for path, _ in samples], dtype=torch.bool)


def linear_features(model: nn.Module, images: torch.Tensor, n_last_blocks: int, avgpool: bool,
                    vit: bool) -> torch.Tensor:
    """What a frozen backbone gives linear classifiers: for a ViT, the CLS tokens of the last `n_last_blocks`
    blocks concatenated (the official feature), then, with `avgpool`, the mean patch token of the last block;
    for other models, model(images). See `interleave_avgpool` for the layout a classifier sees."""
    if not vit:
        return model(images)
    intermediate_output = model.get_intermediate_layers(images, n_last_blocks)
    parts = [x[:, 0] for x in intermediate_output]
    if avgpool:  # the patch tokens, after the CLS token and any registers
        parts.append(torch.mean(intermediate_output[-1][:, model.num_prefix_tokens:], dim=1))
    return torch.cat(parts, dim=-1)


def interleave_avgpool(features: torch.Tensor, n_last_blocks: int) -> torch.Tensor:
    """`linear_features(..., avgpool=True)` in the layout of the official classifiers.

    The official line, torch.cat((output.unsqueeze(-1), mean.unsqueeze(-1)), dim=-1).reshape(B, -1),
    interleaves CLS and mean channel by channel (and only runs for n_last_blocks=1, as used with ViT-B).
    Interleaving the n CLS tokens and the mean the same way is exactly that layout for n=1, so that the
    official linear weights load, and defines one for n > 1."""
    batch, width = features.shape[0], features.shape[1] // (n_last_blocks + 1)
    return features.view(batch, n_last_blocks + 1, width).transpose(1, 2).reshape(batch, -1)


class LinearClassifier(nn.Module):
    """Linear layer to train on top of frozen features (the official module: keys linear.weight/bias)."""

    def __init__(self, dim: int, num_labels: int = 1000):
        super().__init__()
        self.num_labels = num_labels
        self.linear = nn.Linear(dim, num_labels)
        self.linear.weight.data.normal_(mean=0.0, std=0.01)
        self.linear.bias.data.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # flatten
        x = x.view(x.size(0), -1)
        # linear layer
        return self.linear(x)


class LinearHeads(nn.Module):
    """One LinearClassifier per entry of `avgpools`, all fed from the same `backbones.linear_features` output
    (with the mean patch token when any head uses it). Each head sees the official layout of its feature."""

    def __init__(self, avgpools: Sequence[bool], num_labels: int, feature_dim: int, n_last_blocks: int, vit: bool):
        super().__init__()
        self.avgpools, self.n_last_blocks, self.vit = list(avgpools), n_last_blocks, vit
        # for a ViT, feature_dim is the backbone's embed_dim; else the width of model(images)
        self.feature_dim = feature_dim
        self.heads = nn.ModuleList(LinearClassifier(self.input_dim(a), num_labels) for a in self.avgpools)

    def input_dim(self, avgpool: bool) -> int:
        return self.feature_dim * (self.n_last_blocks + int(avgpool)) if self.vit else self.feature_dim

    def head_input(self, features: torch.Tensor, avgpool: bool) -> torch.Tensor:
        if not self.vit:
            return features
        if not avgpool:
            return features[:, :self.n_last_blocks * self.feature_dim]
        return interleave_avgpool(features, self.n_last_blocks)

    def forward(self, features: torch.Tensor) -> List[torch.Tensor]:
        inputs = {a: self.head_input(features, a) for a in set(self.avgpools)}
        return [head(inputs[a]) for head, a in zip(self.heads, self.avgpools)]

def official_state_dict(head: LinearClassifier) -> Dict[str, torch.Tensor]:
    """A head's weights as the official script saves its DDP-wrapped classifier (module.linear.*), copied."""
    return {f"module.{k}": v.detach().cpu().clone() for k, v in head.state_dict().items()}

def load_linear_weights(path: str) -> Tuple[Dict[str, torch.Tensor], Optional[Dict]]:
    """(linear.weight/linear.bias, metadata or None) of an official *_linearweights.pth, a checkpoint.pth.tar of
    this script (its best head, with the feature settings it was trained on) or a bare state_dict."""
    checkpoint = checkpointing.load_checkpoint(path)
    if isinstance(checkpoint, dict) and "run_config" in checkpoint and checkpoint.get("state_dict") is None:
        # written inside the first epoch (a signal, --saveckp_every_iters): no head has been validated yet
        raise UserError(f"{path} was written in the middle of epoch {checkpoint.get('epoch')}, before any head "
                              "was validated: finish the training first (the same command without --evaluate)")
    state_dict = checkpoint.get("state_dict", checkpoint) if isinstance(checkpoint, dict) else None
    if isinstance(state_dict, dict):
        state_dict = checkpointing.strip_prefix(state_dict, "module.")
    if not isinstance(state_dict, dict) or set(state_dict) != {"linear.weight", "linear.bias"}:
        keys = sorted(state_dict)[:6] if isinstance(state_dict, dict) else type(checkpoint).__name__
        raise UserError(f"{path} holds no linear classifier (expected 'state_dict' with linear.weight and "
                              f"linear.bias, found {keys}): give a checkpoint.pth.tar of eval_linear.py or an "
                              "official *_linearweights.pth")
    return state_dict, checkpoint.get("best_head")
