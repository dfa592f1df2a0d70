# Copyright (c) the contributors of this project. Licensed under the Apache License 2.0.
# Entry-point names, architectures and weight URLs follow facebookresearch/dino's hubconf.py, and the
# linear classifiers its eval_linear.py (Apache 2.0).
"""torch.hub entry points, with the official DINO names:

    model = torch.hub.load('/path/to/this/repo', 'dino_vits16', source='local', weights='checkpoint.pth')

Backbones `dino_vits16`, `dino_vits8`, `dino_vitb16`, `dino_vitb8` (our ViTs, official state_dict keys)
and `dino_resnet50` (torchvision, `fc` = Identity); the projection head `dino_head`; linear classifiers
`dino_vits16_lc`, ... `dino_resnet50_lc` (backbone + the official eval_linear.py classifier, logits); and
DINOv2's backbones under Meta's hub names, `dinov2_vits14`, ..., `dinov2_vitg14_reg` (our ViT built as DINOv2
builds it: Meta's files load as they are).

Every entry point takes `pretrained=True, weights=None, **kwargs`. Nothing is downloaded implicitly:
- `weights` a local file: loaded (our main_dino.py checkpoints, official full or backbone-only files;
  `checkpoint_key`, default "teacher", picks the network in a full checkpoint);
- `weights` an http(s) URL: downloaded into torch.hub's cache, then loaded (the only download);
- `pretrained=True` and no `weights`: an error that shows the official URL to pass explicitly;
- `pretrained=False` and no `weights`: random weights.
The `_lc` entry points take the classifier the same way, as `linear_weights` (an eval_linear.py checkpoint).
Other keyword arguments go to the model's constructor, as in the official file.
"""
import importlib.util
import os
import sys
import types

import torch
import torch.nn as nn

dependencies = ["torch", "torchvision"]

_HERE = os.path.dirname(os.path.abspath(__file__))


def _import_local(name: str, public: bool) -> types.ModuleType:
    """This repository's module `name`, whatever else the caller's process has imported.

    torch.hub imports this file into the caller's process, where another module called `utils` or
    `vision_transformer` (common names) may be imported already, or be imported later. Ours is reused
    when it is the one imported (our scripts and tests). Otherwise a `public` module is imported under
    its own name when that is free, so that the models' classes pickle as the official ones
    (`vision_transformer.VisionTransformer`); in every other case our file is loaded under a private
    name, so that we neither pick up the caller's module nor shadow it. While it runs, its own imports of
    the modules loaded before it (`import runtime` in checkpointing.py) are pointed at ours.
    """
    path = os.path.join(_HERE, name + ".py")
    loaded = sys.modules.get(name)
    if loaded is not None and os.path.abspath(getattr(loaded, "__file__", "") or "") == path:
        _ours[name] = loaded
        return loaded
    module_name = name if public and loaded is None else f"_dino_hub_{name}"
    if module_name not in sys.modules:
        spec = importlib.util.spec_from_file_location(module_name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module  # registered, so that its classes pickle
        visible = {dep: sys.modules.get(dep) for dep in _LOCAL if dep != name}
        try:
            sys.modules.update({dep: mod for dep, mod in _ours.items() if dep != name})
            spec.loader.exec_module(module)
        except BaseException:
            del sys.modules[module_name]  # as importlib does: no half-initialised module left behind
            raise
        finally:
            for dep, mod in visible.items():
                if mod is None:
                    sys.modules.pop(dep, None)
                else:
                    sys.modules[dep] = mod
    _ours[name] = sys.modules[module_name]
    return sys.modules[module_name]


# Ours, loaded in this order (each imports only those before it): name -> the module loaded for it.
_LOCAL = ("runtime", "checkpointing", "utils", "vision_transformer", "backbones")
_ours: dict[str, types.ModuleType] = {}
runtime = _import_local("runtime", public=False)
checkpointing = _import_local("checkpointing", public=False)
utils = _import_local("utils", public=False)
vits = _import_local("vision_transformer", public=True)
backbones = _import_local("backbones", public=False)

OFFICIAL_URL = "https://dl.fbaipublicfiles.com/dino/"
# Official backbone-only weights, and the linear classifiers trained on them by eval_linear.py.
BACKBONE_URLS = {
    "dino_vits16": OFFICIAL_URL + "dino_deitsmall16_pretrain/dino_deitsmall16_pretrain.pth",
    "dino_vits8": OFFICIAL_URL + "dino_deitsmall8_pretrain/dino_deitsmall8_pretrain.pth",
    "dino_vitb16": OFFICIAL_URL + "dino_vitbase16_pretrain/dino_vitbase16_pretrain.pth",
    "dino_vitb8": OFFICIAL_URL + "dino_vitbase8_pretrain/dino_vitbase8_pretrain.pth",
    "dino_resnet50": OFFICIAL_URL + "dino_resnet50_pretrain/dino_resnet50_pretrain.pth",
}
LINEAR_URLS = {
    "dino_vits16": OFFICIAL_URL + "dino_deitsmall16_pretrain/dino_deitsmall16_linearweights.pth",
    "dino_vits8": OFFICIAL_URL + "dino_deitsmall8_pretrain/dino_deitsmall8_linearweights.pth",
    "dino_vitb16": OFFICIAL_URL + "dino_vitbase16_pretrain/dino_vitbase16_linearweights.pth",
    "dino_vitb8": OFFICIAL_URL + "dino_vitbase8_pretrain/dino_vitbase8_linearweights.pth",
    "dino_resnet50": OFFICIAL_URL + "dino_resnet50_pretrain/dino_resnet50_linearweights.pth",
}
# The projection head is only in the full training checkpoints (teacher and student).
HEAD_URL = OFFICIAL_URL + "dino_deitsmall16_pretrain/dino_deitsmall16_pretrain_full_checkpoint.pth"

# Features under the official linear classifiers, as in eval_linear.py's documented settings: the CLS
# tokens of the last 4 blocks for ViT-S, the last block's CLS token and averaged patch tokens for ViT-B.
LINEAR_LAYOUTS = {
    "dino_vits16": dict(n_last_blocks=4, avgpool_patchtokens=False),
    "dino_vits8": dict(n_last_blocks=4, avgpool_patchtokens=False),
    "dino_vitb16": dict(n_last_blocks=1, avgpool_patchtokens=True),
    "dino_vitb8": dict(n_last_blocks=1, avgpool_patchtokens=True),
}


# ----------------------------------------------------------------------------------------------------
# Weights
# ----------------------------------------------------------------------------------------------------
def _require_weights(name: str, pretrained: bool, **given: tuple[str | None, str]) -> None:
    """`given` maps an argument name to (its value, the official URL): with pretrained=True each needs a value."""
    missing = {arg: url for arg, (value, url) in given.items() if not value}
    if pretrained and missing:
        explicit = ", ".join(f"{arg}='{url}'" for arg, url in missing.items())
        raise utils.UserError(
            f"{name}(pretrained=True) needs {' and '.join(f'`{a}`' for a in missing)}: this repository never "
            f"downloads implicitly. Pass local files, or the official DINO weights explicitly: "
            f"torch.hub.load(..., '{name}', {explicit}); or pretrained=False for random weights")


def _load_backbone(model: nn.Module, weights: str | None, checkpoint_key: str, arch: str,
                   patch_size: int | None = None) -> None:
    if weights:
        checkpointing.load_pretrained_weights(model, checkpointing.local_weights_path(weights), checkpoint_key, arch, patch_size)


# ----------------------------------------------------------------------------------------------------
# Backbones
# ----------------------------------------------------------------------------------------------------
def _vit(name: str, arch: str, patch_size: int, pretrained: bool, weights: str | None, checkpoint_key: str,
         **kwargs) -> nn.Module:
    _require_weights(name, pretrained, weights=(weights, BACKBONE_URLS[name]))
    model = getattr(vits, arch)(patch_size=patch_size, num_classes=0, **kwargs)
    _load_backbone(model, weights, checkpoint_key, arch, patch_size)
    return model


def dino_vits16(pretrained: bool = True, weights: str | None = None, checkpoint_key: str = "teacher",
                **kwargs) -> nn.Module:
    """ViT-Small/16x16 pre-trained with DINO (official: 74.5% k-NN, 77.0% linear top-1 on ImageNet)."""
    return _vit("dino_vits16", "vit_small", 16, pretrained, weights, checkpoint_key, **kwargs)


def dino_vits8(pretrained: bool = True, weights: str | None = None, checkpoint_key: str = "teacher",
               **kwargs) -> nn.Module:
    """ViT-Small/8x8 pre-trained with DINO (official: 78.3% k-NN, 79.7% linear top-1 on ImageNet)."""
    return _vit("dino_vits8", "vit_small", 8, pretrained, weights, checkpoint_key, **kwargs)


def dino_vitb16(pretrained: bool = True, weights: str | None = None, checkpoint_key: str = "teacher",
                **kwargs) -> nn.Module:
    """ViT-Base/16x16 pre-trained with DINO (official: 76.1% k-NN, 78.2% linear top-1 on ImageNet)."""
    return _vit("dino_vitb16", "vit_base", 16, pretrained, weights, checkpoint_key, **kwargs)


def dino_vitb8(pretrained: bool = True, weights: str | None = None, checkpoint_key: str = "teacher",
               **kwargs) -> nn.Module:
    """ViT-Base/8x8 pre-trained with DINO (official: 77.4% k-NN, 80.1% linear top-1 on ImageNet)."""
    return _vit("dino_vitb8", "vit_base", 8, pretrained, weights, checkpoint_key, **kwargs)


def dino_resnet50(pretrained: bool = True, weights: str | None = None, checkpoint_key: str = "teacher",
                  **kwargs) -> nn.Module:
    """ResNet-50 pre-trained with DINO, `fc` replaced by Identity: 2048-d features (official: 67.5% k-NN,
    75.3% linear top-1 on ImageNet)."""
    _require_weights("dino_resnet50", pretrained, weights=(weights, BACKBONE_URLS["dino_resnet50"]))
    from torchvision.models.resnet import resnet50  # lazily: importing this file stays light
    model = resnet50(weights=None, **kwargs)
    model.fc = nn.Identity()
    _load_backbone(model, weights, checkpoint_key, "resnet50")
    return model


# ----------------------------------------------------------------------------------------------------
# DINOv2 backbones (Meta's hub names and files)
# ----------------------------------------------------------------------------------------------------
DINOV2_URL = "https://dl.fbaipublicfiles.com/dinov2/"


def _dinov2(name: str, pretrained: bool, weights: str | None, checkpoint_key: str, **kwargs) -> nn.Module:
    """`name` is Meta's hub name (dinov2_vits14, ..., dinov2_vitg14_reg); the backbone is our ViT built as DINOv2
    builds it (vision_transformer.dinov2_vit), so that Meta's file loads as it is."""
    arch = name.replace("_reg", "_reg4")
    base = name.replace("_reg", "")
    _require_weights(name, pretrained, weights=(weights, f"{DINOV2_URL}{base}/{arch}_pretrain.pth"))
    model = getattr(vits, arch)(**kwargs)
    _load_backbone(model, weights, checkpoint_key, arch, 14)
    return model


def _dinov2_entry(name: str, what: str):
    """The entry point `name` (Meta's hub name) of the DINOv2 backbone `what`."""
    def entry(pretrained: bool = True, weights: str | None = None, checkpoint_key: str = "teacher",
              **kwargs) -> nn.Module:
        return _dinov2(name, pretrained, weights, checkpoint_key, **kwargs)
    entry.__name__ = entry.__qualname__ = name
    entry.__doc__ = (f"DINOv2 {what} (Meta's {name.replace('_reg', '_reg4')}_pretrain.pth loads as it is). "
                     "Arguments as dino_vits16.")
    return entry


dinov2_vits14 = _dinov2_entry("dinov2_vits14", "ViT-S/14")
dinov2_vitb14 = _dinov2_entry("dinov2_vitb14", "ViT-B/14")
dinov2_vitl14 = _dinov2_entry("dinov2_vitl14", "ViT-L/14")
dinov2_vitg14 = _dinov2_entry("dinov2_vitg14", "ViT-g/14 (SwiGLU feed-forward)")
dinov2_vits14_reg = _dinov2_entry("dinov2_vits14_reg", "ViT-S/14 with 4 registers")
dinov2_vitb14_reg = _dinov2_entry("dinov2_vitb14_reg", "ViT-B/14 with 4 registers")
dinov2_vitl14_reg = _dinov2_entry("dinov2_vitl14_reg", "ViT-L/14 with 4 registers")
dinov2_vitg14_reg = _dinov2_entry("dinov2_vitg14_reg", "ViT-g/14 (SwiGLU feed-forward) with 4 registers")


# ----------------------------------------------------------------------------------------------------
# Projection head
# ----------------------------------------------------------------------------------------------------
def dino_head(pretrained: bool = True, weights: str | None = None, checkpoint_key: str = "teacher",
              in_dim: int = 384, out_dim: int = 65536, **kwargs) -> nn.Module:
    """The DINO projection head (vision_transformer.DINOHead; official defaults: 3 layers, hidden 2048,
    bottleneck 256, weight-normalised last layer; `in_dim` 384 is ViT-S, `out_dim` 65536 main_dino.py's
    default). `weights`: a full training checkpoint (ours or official), whose `checkpoint_key` network
    holds `head.*`; the constructor arguments must match the run that wrote it."""
    _require_weights("dino_head", pretrained, weights=(weights, HEAD_URL))
    head = vits.DINOHead(in_dim, out_dim, **kwargs)
    if not weights:
        return head
    path = checkpointing.local_weights_path(weights)
    state_dict = checkpointing.select_state_dict(checkpointing.load_checkpoint(path), checkpoint_key, path)
    state_dict = checkpointing.strip_prefix(state_dict, "module.")
    head_state = {k[len("head."):]: v for k, v in state_dict.items() if k.startswith("head.")}
    if not head_state:
        raise utils.UserError(f"{path} holds no projection head (no head.* weights under '{checkpoint_key}'): "
                              "backbone-only files such as the official *_pretrain.pth have none; use a full "
                              "training checkpoint")
    try:
        head.load_state_dict(head_state, strict=True)
    except RuntimeError as e:
        raise utils.UserError(f"the head in {path} does not fit DINOHead({in_dim}, {out_dim}, {kwargs}): pass the "
                              f"in_dim, out_dim, nlayers, hidden_dim, bottleneck_dim, use_bn of the run that "
                              f"wrote it. {' '.join(str(e).split())}") from None
    print(f"DINO head weights loaded from {path} ('{checkpoint_key}')")
    return head


# ----------------------------------------------------------------------------------------------------
# Linear classifiers
# ----------------------------------------------------------------------------------------------------
# Underscored like the helpers: torch.hub treats every public callable of this file as an entry point.
class _DINOLinearClassifier(backbones.LinearClassifier):
    """A backbone and, on its features, the linear layer of the official eval_linear.py: logits.

    ViT features (official `eval_linear.py` forward): the CLS tokens of the last `n_last_blocks` blocks,
    concatenated; with `avgpool_patchtokens` (only with n_last_blocks=1, as officially), the mean of the
    last block's patch tokens interleaved with them ([cls_0, avg_0, cls_1, avg_1, ...]: the official
    `cat(..., dim=-1).reshape` order, which the published ViT-B linear weights expect). Other backbones:
    their output. State_dict keys: `backbone.*`, and `linear.weight`/`linear.bias` as in eval_linear.py.
    """

    def __init__(self, backbone: nn.Module, feature_dim: int, num_labels: int = 1000, n_last_blocks: int = 1,
                 avgpool_patchtokens: bool = False):
        is_vit = hasattr(backbone, "get_intermediate_layers")
        if avgpool_patchtokens and n_last_blocks != 1:
            raise utils.UserError("avgpool_patchtokens=True works with n_last_blocks=1 only (as in eval_linear.py)")
        super().__init__(feature_dim * (n_last_blocks + int(avgpool_patchtokens)) if is_vit else feature_dim,
                         num_labels)
        self.backbone, self.is_vit = backbone, is_vit
        self.n_last_blocks, self.avgpool_patchtokens = n_last_blocks, avgpool_patchtokens

    def features(self, x: torch.Tensor) -> torch.Tensor:
        avgpool = self.avgpool_patchtokens and self.is_vit
        output = backbones.linear_features(self.backbone, x, self.n_last_blocks, avgpool, self.is_vit)
        return backbones.interleave_avgpool(output, self.n_last_blocks) if avgpool else output

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(self.features(x))


def _read_linear_weights(linear_weights: str) -> dict[str, torch.Tensor]:
    """`weight` and `bias` of an eval_linear.py checkpoint or an official *_linearweights.pth."""
    state_dict, _ = backbones.load_linear_weights(checkpointing.local_weights_path(linear_weights))
    return {"weight": state_dict["linear.weight"], "bias": state_dict["linear.bias"]}


def _linear_classifier(name: str, backbone: nn.Module, feature_dim: int, linear_weights: str | None,
                       state: dict[str, torch.Tensor] | None, num_labels: int | None, n_last_blocks: int,
                       avgpool_patchtokens: bool) -> nn.Module:
    """The classifier on `backbone`, with the linear layer `state` read from `linear_weights` if any."""
    if num_labels is None:
        num_labels = state["weight"].shape[0] if state else 1000
    model = _DINOLinearClassifier(backbone, feature_dim, num_labels, n_last_blocks, avgpool_patchtokens)
    if state:
        expected = tuple(model.linear.weight.shape)
        if tuple(state["weight"].shape) != expected:
            raise utils.UserError(
                f"{name}: the classifier in {linear_weights} has weight {tuple(state['weight'].shape)} "
                f"(num_labels, features), this model {expected} (num_labels={num_labels}, "
                f"n_last_blocks={n_last_blocks}, avgpool_patchtokens={avgpool_patchtokens}): pass the settings of "
                "the eval_linear.py run that wrote it")
        model.linear.load_state_dict(state, strict=True)
        print(f"Linear classifier ({num_labels} labels) loaded from {linear_weights}")
    return model


def _vit_lc(name: str, arch: str, patch_size: int, pretrained: bool, weights: str | None,
            linear_weights: str | None, num_labels: int | None, n_last_blocks: int | None,
            avgpool_patchtokens: bool | None, checkpoint_key: str, **kwargs) -> nn.Module:
    _require_weights(name + "_lc", pretrained, weights=(weights, BACKBONE_URLS[name]),
                     linear_weights=(linear_weights, LINEAR_URLS[name]))
    layout = LINEAR_LAYOUTS[name]
    n_last_blocks = layout["n_last_blocks"] if n_last_blocks is None else n_last_blocks
    avgpool_patchtokens = layout["avgpool_patchtokens"] if avgpool_patchtokens is None else avgpool_patchtokens
    state = _read_linear_weights(linear_weights) if linear_weights else None  # a wrong file fails before the build
    backbone = _vit(name, arch, patch_size, False, weights, checkpoint_key, **kwargs)
    return _linear_classifier(name + "_lc", backbone, backbone.embed_dim, linear_weights, state, num_labels,
                              n_last_blocks, avgpool_patchtokens)


def dino_vits16_lc(pretrained: bool = True, weights: str | None = None, linear_weights: str | None = None,
                   num_labels: int | None = None, n_last_blocks: int | None = None,
                   avgpool_patchtokens: bool | None = None, checkpoint_key: str = "teacher",
                   **kwargs) -> nn.Module:
    """ViT-S/16 DINO backbone + linear classifier on the CLS tokens of its last 4 blocks (1536 features).

    `weights`: the backbone; `linear_weights`: an eval_linear.py checkpoint. `num_labels` defaults to the
    classifier's in `linear_weights`, else 1000; `n_last_blocks`/`avgpool_patchtokens` override the layout.
    """
    return _vit_lc("dino_vits16", "vit_small", 16, pretrained, weights, linear_weights, num_labels, n_last_blocks,
                   avgpool_patchtokens, checkpoint_key, **kwargs)


def dino_vits8_lc(pretrained: bool = True, weights: str | None = None, linear_weights: str | None = None,
                  num_labels: int | None = None, n_last_blocks: int | None = None,
                  avgpool_patchtokens: bool | None = None, checkpoint_key: str = "teacher",
                  **kwargs) -> nn.Module:
    """ViT-S/8 DINO backbone + linear classifier on the CLS tokens of its last 4 blocks (1536 features).
    Arguments as dino_vits16_lc."""
    return _vit_lc("dino_vits8", "vit_small", 8, pretrained, weights, linear_weights, num_labels, n_last_blocks,
                   avgpool_patchtokens, checkpoint_key, **kwargs)


def dino_vitb16_lc(pretrained: bool = True, weights: str | None = None, linear_weights: str | None = None,
                   num_labels: int | None = None, n_last_blocks: int | None = None,
                   avgpool_patchtokens: bool | None = None, checkpoint_key: str = "teacher",
                   **kwargs) -> nn.Module:
    """ViT-B/16 DINO backbone + linear classifier on the last block's CLS token and averaged patch tokens
    (1536 features). Arguments as dino_vits16_lc."""
    return _vit_lc("dino_vitb16", "vit_base", 16, pretrained, weights, linear_weights, num_labels, n_last_blocks,
                   avgpool_patchtokens, checkpoint_key, **kwargs)


def dino_vitb8_lc(pretrained: bool = True, weights: str | None = None, linear_weights: str | None = None,
                  num_labels: int | None = None, n_last_blocks: int | None = None,
                  avgpool_patchtokens: bool | None = None, checkpoint_key: str = "teacher",
                  **kwargs) -> nn.Module:
    """ViT-B/8 DINO backbone + linear classifier on the last block's CLS token and averaged patch tokens
    (1536 features). Arguments as dino_vits16_lc."""
    return _vit_lc("dino_vitb8", "vit_base", 8, pretrained, weights, linear_weights, num_labels, n_last_blocks,
                   avgpool_patchtokens, checkpoint_key, **kwargs)


def dino_resnet50_lc(pretrained: bool = True, weights: str | None = None, linear_weights: str | None = None,
                     num_labels: int | None = None, checkpoint_key: str = "teacher", **kwargs) -> nn.Module:
    """ResNet-50 DINO backbone + linear classifier on its 2048 pooled features.
    Arguments as dino_vits16_lc."""
    _require_weights("dino_resnet50_lc", pretrained, weights=(weights, BACKBONE_URLS["dino_resnet50"]),
                     linear_weights=(linear_weights, LINEAR_URLS["dino_resnet50"]))
    state = _read_linear_weights(linear_weights) if linear_weights else None  # a wrong file fails before the build
    backbone = dino_resnet50(pretrained=False, weights=weights, checkpoint_key=checkpoint_key, **kwargs)
    feature_dim = backbone.layer4[-1].conv3.out_channels  # what `fc` took: 2048
    return _linear_classifier("dino_resnet50_lc", backbone, feature_dim, linear_weights, state, num_labels, 1, False)
