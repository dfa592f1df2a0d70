# Copyright (c) the contributors of this project. Licensed under the Apache License 2.0.
# Interface, parameter names and numerics follow facebookresearch/dino (Apache 2.0), itself based on
# timm and DeiT, so that the official checkpoints load with strict=True and give the same outputs.
"""Vision Transformer backbones and the DINO projection head.

Self-contained: imports only torch and the standard library, so this file can be copied alone.
Differences from the official file, none of which changes a state_dict key or an output:
- attention runs through `F.scaled_dot_product_attention` (fused kernels on GPU, flash/memory-efficient
  on CPU); the explicit softmax is computed only when the attention weights are asked for;
- `DINOHead.last_layer` is a small weight-normalised linear layer with the official parameter names
  (`weight_g`, `weight_v`) instead of the deprecated `torch.nn.utils.weight_norm` hook;
- an optional learnable `mask_token` (iBOT-style masked image modelling) exists only when asked for;
- optional activation checkpointing (`set_grad_checkpointing()`, as in timm).

What DINOv2's ViT adds, off by default (then keys and outputs are the official DINO ones): register tokens
(`num_register_tokens`), LayerScale (`init_values`, keys `ls1.gamma`/`ls2.gamma`), a SwiGLU feed-forward
(`ffn_layer="swiglu"`, ViT-g), and DINOv2's position-embedding interpolation options (`interpolate_antialias`,
`interpolate_offset`), and the same drop-path rate in every block (`drop_path_uniform`). `dinov2_vits14`, ..., `dinov2_vitg14_reg4` build the backbones of Meta's released DINOv2
files, which load into them with strict=True and give DINOv2's features; `forward_tokens` returns DINOv2's
`forward_features` dict (normalised CLS, registers and patch tokens by name).
"""
import math
from functools import partial
from typing import Dict, List, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint


def drop_path(x: torch.Tensor, drop_prob: float = 0., training: bool = False) -> torch.Tensor:
    """Stochastic depth per sample: zero the residual branch of whole samples, rescale the rest."""
    if drop_prob == 0. or not training:
        return x
    keep_prob = 1 - drop_prob
    shape = (x.shape[0],) + (1,) * (x.ndim - 1)  # works with tensors of any rank, not just 2D ConvNets
    random_tensor = keep_prob + torch.rand(shape, dtype=x.dtype, device=x.device)
    random_tensor.floor_()  # binarize
    return x.div(keep_prob) * random_tensor


class DropPath(nn.Module):
    """Drop paths (stochastic depth) per sample, applied in the main path of residual blocks."""

    def __init__(self, drop_prob: Optional[float] = None):
        super().__init__()
        self.drop_prob = drop_prob or 0.

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return drop_path(x, self.drop_prob, self.training)

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob}"


class Mlp(nn.Module):
    def __init__(self, in_features, hidden_features=None, out_features=None, act_layer=nn.GELU, drop=0.):
        super().__init__()
        out_features = out_features or in_features
        hidden_features = hidden_features or in_features
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = act_layer()
        self.fc2 = nn.Linear(hidden_features, out_features)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.drop(self.act(self.fc1(x)))
        return self.drop(self.fc2(x))


class SwiGLUFFN(nn.Module):
    """DINOv2's SwiGLU feed-forward (its ViT-g/14): w12 -> silu(x1) * x2 -> w3, the hidden width 2/3 of the
    MLP's rounded up to a multiple of 8 (DINOv2's `SwiGLUFFNFused`), keys `w12` and `w3`."""

    def __init__(self, in_features, hidden_features=None, out_features=None, act_layer=None, drop=0.):
        super().__init__()
        out_features = out_features or in_features
        hidden_features = (int((hidden_features or in_features) * 2 / 3) + 7) // 8 * 8
        self.w12 = nn.Linear(in_features, 2 * hidden_features)
        self.w3 = nn.Linear(hidden_features, out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x1, x2 = self.w12(x).chunk(2, dim=-1)
        return self.w3(F.silu(x1) * x2)


class LayerScale(nn.Module):
    """A learned per-channel scale of a residual branch (CaiT; DINOv2's `ls1`/`ls2`, parameter `gamma`)."""

    def __init__(self, dim: int, init_values: float = 1e-5):
        super().__init__()
        self.gamma = nn.Parameter(init_values * torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class Attention(nn.Module):
    def __init__(self, dim, num_heads=8, qkv_bias=False, qk_scale=None, attn_drop=0., proj_drop=0.):
        super().__init__()
        self.num_heads = num_heads
        head_dim = dim // num_heads
        self.scale = qk_scale or head_dim ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor, return_attention: bool = False):
        """Returns `(output, attention)`; `attention` is None unless `return_attention` is True."""
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        # Explicit path: when the weights themselves are wanted (attention maps, visualisation), and for bf16 on
        # CPU, where torch's fused kernel is slower in bf16 than in fp32 while two bf16 matrix products are faster
        # (measurements in BENCHMARKS.md).
        if return_attention or (q.is_cpu and q.dtype == torch.bfloat16):
            attn = (q @ k.transpose(-2, -1)) * self.scale
            attn = attn.softmax(dim=-1)
            x = self.attn_drop(attn) @ v
            attn = attn if return_attention else None
        else:
            attn = None
            x = F.scaled_dot_product_attention(
                q, k, v, dropout_p=self.attn_drop.p if self.training else 0., scale=self.scale)
        x = x.transpose(1, 2).reshape(B, N, C)
        x = self.proj_drop(self.proj(x))
        return x, attn


class Block(nn.Module):
    def __init__(self, dim, num_heads, mlp_ratio=4., qkv_bias=False, qk_scale=None, drop=0., attn_drop=0.,
                 drop_path=0., act_layer=nn.GELU, norm_layer=nn.LayerNorm, init_values: Optional[float] = None,
                 ffn_layer: str = "mlp"):
        super().__init__()
        self.norm1 = norm_layer(dim)
        self.attn = Attention(dim, num_heads=num_heads, qkv_bias=qkv_bias, qk_scale=qk_scale,
                              attn_drop=attn_drop, proj_drop=drop)
        self.drop_path = DropPath(drop_path) if drop_path > 0. else nn.Identity()
        self.norm2 = norm_layer(dim)
        ffn = {"mlp": Mlp, "swiglu": SwiGLUFFN}[ffn_layer]
        self.mlp = ffn(in_features=dim, hidden_features=int(dim * mlp_ratio), act_layer=act_layer, drop=drop)
        # LayerScale only when asked for: no `ls1`/`ls2` keys in the official DINO models
        self.ls1 = LayerScale(dim, init_values) if init_values else nn.Identity()
        self.ls2 = LayerScale(dim, init_values) if init_values else nn.Identity()

    def forward(self, x: torch.Tensor, return_attention: bool = False) -> torch.Tensor:
        y, attn = self.attn(self.norm1(x), return_attention=return_attention)
        if return_attention:
            return attn
        x = x + self.drop_path(self.ls1(y))
        x = x + self.drop_path(self.ls2(self.mlp(self.norm2(x))))
        return x


class PatchEmbed(nn.Module):
    """Image to patch embedding."""

    def __init__(self, img_size=224, patch_size=16, in_chans=3, embed_dim=768):
        super().__init__()
        num_patches = (img_size // patch_size) * (img_size // patch_size)
        self.img_size = img_size
        self.patch_size = patch_size
        self.num_patches = num_patches
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class VisionTransformer(nn.Module):
    """Vision Transformer with the official DINO interface.

    `forward(x)` returns the normalised CLS token. Inputs of any size work: position embeddings are
    interpolated (bicubic) from the grid they were trained at. `masked_im_modeling=True` adds a
    learnable `mask_token` and lets `forward`/`prepare_tokens` take a boolean `masks` tensor
    [B, H/p, W/p] (or [B, num_patches]) whose True patches are replaced by it before position embeddings are
    added. Tokens are ordered [CLS, registers, patches]; `num_prefix_tokens` (timm's name) counts CLS and
    registers. DINOv2's options (module docstring) are off by default.
    """

    def __init__(self, img_size=[224], patch_size=16, in_chans=3, num_classes=0, embed_dim=768, depth=12,
                 num_heads=12, mlp_ratio=4., qkv_bias=False, qk_scale=None, drop_rate=0., attn_drop_rate=0.,
                 drop_path_rate=0., norm_layer=nn.LayerNorm, masked_im_modeling: bool = False,
                 num_register_tokens: int = 0, init_values: Optional[float] = None, ffn_layer: str = "mlp",
                 interpolate_antialias: bool = False, interpolate_offset: float = 0.1,
                 drop_path_uniform: bool = False, **kwargs):
        super().__init__()
        if kwargs:
            raise TypeError(f"VisionTransformer got unexpected keyword arguments: {sorted(kwargs)}")
        if isinstance(img_size, (list, tuple)):
            img_size = img_size[0]
        self.num_features = self.embed_dim = embed_dim
        self.patch_embed = PatchEmbed(img_size=img_size, patch_size=patch_size, in_chans=in_chans,
                                      embed_dim=embed_dim)
        num_patches = self.patch_embed.num_patches
        self.num_register_tokens, self.num_prefix_tokens = num_register_tokens, 1 + num_register_tokens
        self.interpolate_antialias, self.interpolate_offset = interpolate_antialias, interpolate_offset

        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, embed_dim))
        if num_register_tokens:  # no key in the official models
            self.register_tokens = nn.Parameter(torch.zeros(1, num_register_tokens, embed_dim))
        self.pos_drop = nn.Dropout(p=drop_rate)

        if drop_path_uniform:  # DINOv2's option: the same rate in every block
            dpr = [drop_path_rate] * depth
        else:  # stochastic depth decay rule
            dpr = [x.item() for x in torch.linspace(0, drop_path_rate, depth, device="cpu")]
        self.blocks = nn.ModuleList([
            Block(dim=embed_dim, num_heads=num_heads, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, qk_scale=qk_scale,
                  drop=drop_rate, attn_drop=attn_drop_rate, drop_path=dpr[i], norm_layer=norm_layer,
                  init_values=init_values, ffn_layer=ffn_layer)
            for i in range(depth)])
        self.norm = norm_layer(embed_dim)

        # Classifier head (unused by DINO, kept for the official interface; no parameters when 0).
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()

        nn.init.trunc_normal_(self.pos_embed, std=.02)
        nn.init.trunc_normal_(self.cls_token, std=.02)
        if num_register_tokens:
            nn.init.normal_(self.register_tokens, std=1e-6)  # DINOv2's
        self.apply(self._init_weights)
        if masked_im_modeling:
            self.mask_token = nn.Parameter(torch.zeros(1, embed_dim))
        self.grad_checkpointing = False

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block's activations in the backward pass instead of storing them (timm's name):
        less memory for large models and batches, about one more forward pass of compute."""
        self.grad_checkpointing = enable

    def _init_weights(self, m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=.02)
            if m.bias is not None:
                nn.init.constant_(m.bias, 0)
        elif isinstance(m, nn.LayerNorm):
            nn.init.constant_(m.bias, 0)
            nn.init.constant_(m.weight, 1.0)

    def interpolate_pos_encoding(self, x: torch.Tensor, w: int, h: int) -> torch.Tensor:
        # As in the official code, `w` is the input height and `h` its width (NCHW order).
        npatch = x.shape[1] - 1
        N = self.pos_embed.shape[1] - 1
        if npatch == N and w == h:
            return self.pos_embed
        class_pos_embed = self.pos_embed[:, 0]
        patch_pos_embed = self.pos_embed[:, 1:]
        dim = x.shape[-1]
        w0 = w // self.patch_embed.patch_size
        h0 = h // self.patch_embed.patch_size
        side = int(math.sqrt(N))
        if self.interpolate_offset:
            # The official code (and DINOv2 by default) pass a scale factor with an offset of 0.1 (to dodge a
            # floating point floor in the output size); the scale factor also sets the sampling grid, so it
            # stays, to reproduce their outputs. DINOv2's register models give the output size instead.
            sizes = {"scale_factor": ((w0 + self.interpolate_offset) / side, (h0 + self.interpolate_offset) / side)}
        else:
            sizes = {"size": (w0, h0)}
        patch_pos_embed = F.interpolate(patch_pos_embed.reshape(1, side, side, dim).permute(0, 3, 1, 2),
                                        mode='bicubic', antialias=self.interpolate_antialias, **sizes)
        assert (w0, h0) == tuple(patch_pos_embed.shape[-2:])
        patch_pos_embed = patch_pos_embed.permute(0, 2, 3, 1).reshape(1, -1, dim)
        return torch.cat((class_pos_embed.unsqueeze(0), patch_pos_embed.to(class_pos_embed.dtype)), dim=1)

    def prepare_tokens(self, x: torch.Tensor, masks: Optional[torch.Tensor] = None) -> torch.Tensor:
        B, nc, w, h = x.shape
        x = self.patch_embed(x)  # patch linear embedding
        if masks is not None:
            if not hasattr(self, "mask_token"):
                raise ValueError("masks given but the model was built without masked_im_modeling=True")
            x = torch.where(masks.flatten(1).unsqueeze(-1), self.mask_token.to(x.dtype), x)
        cls_tokens = self.cls_token.expand(B, -1, -1)
        x = torch.cat((cls_tokens, x), dim=1)
        x = x + self.interpolate_pos_encoding(x, w, h)
        if self.num_register_tokens:  # after the position embedding, which they have none of (DINOv2's order)
            x = torch.cat((x[:, :1], self.register_tokens.expand(B, -1, -1).to(x.dtype), x[:, 1:]), dim=1)
        return self.pos_drop(x)

    def _blocks(self, x: torch.Tensor) -> torch.Tensor:
        for blk in self.blocks:
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                x = torch.utils.checkpoint.checkpoint(blk, x, use_reentrant=False)
            else:
                x = blk(x)
        return x

    def forward_features(self, x: torch.Tensor, masks: Optional[torch.Tensor] = None) -> torch.Tensor:
        """All normalised tokens [B, num_prefix_tokens + num_patches, D]: CLS, registers, patches."""
        return self.norm(self._blocks(self.prepare_tokens(x, masks)))

    def forward_tokens(self, x: torch.Tensor, masks: Optional[torch.Tensor] = None) -> Dict[str, torch.Tensor]:
        """The tokens by name, as DINOv2's `forward_features` returns them: `x_norm_clstoken` [B, D],
        `x_norm_regtokens` [B, R, D], `x_norm_patchtokens` [B, N, D], `x_prenorm` and `masks`."""
        x_prenorm = self._blocks(self.prepare_tokens(x, masks))
        x_norm = self.norm(x_prenorm)
        return {"x_norm_clstoken": x_norm[:, 0], "x_norm_regtokens": x_norm[:, 1:self.num_prefix_tokens],
                "x_norm_patchtokens": x_norm[:, self.num_prefix_tokens:], "x_prenorm": x_prenorm, "masks": masks}

    def forward(self, x: torch.Tensor, masks: Optional[torch.Tensor] = None) -> torch.Tensor:
        return self.forward_features(x, masks)[:, 0]

    def get_last_selfattention(self, x: torch.Tensor) -> torch.Tensor:
        """Attention weights of the last block: [B, heads, N, N] over CLS, registers and patches."""
        x = self.prepare_tokens(x)
        for blk in self.blocks[:-1]:
            x = blk(x)
        return self.blocks[-1](x, return_attention=True)

    def get_intermediate_layers(self, x: torch.Tensor, n: int = 1) -> List[torch.Tensor]:
        """Normalised tokens (CLS, registers, patches) of the last `n` blocks."""
        x = self.prepare_tokens(x)
        output = []
        for i, blk in enumerate(self.blocks):
            x = blk(x)
            if len(self.blocks) - i <= n:
                output.append(self.norm(x))
        return output


def _vit(patch_size: int, embed_dim: int, depth: int, num_heads: int, **kwargs) -> VisionTransformer:
    kwargs.setdefault("norm_layer", partial(nn.LayerNorm, eps=1e-6))
    return VisionTransformer(patch_size=patch_size, embed_dim=embed_dim, depth=depth, num_heads=num_heads,
                             mlp_ratio=4, qkv_bias=True, **kwargs)


def vit_nano(patch_size: int = 16, **kwargs) -> VisionTransformer:
    # Not in the official repo: a 2.4M-parameter student for distillation and CPU experiments
    # (head dimension 64 like the others).
    return _vit(patch_size, 128, 12, 2, **kwargs)


def vit_tiny(patch_size: int = 16, **kwargs) -> VisionTransformer:
    return _vit(patch_size, 192, 12, 3, **kwargs)


def vit_small(patch_size: int = 16, **kwargs) -> VisionTransformer:
    return _vit(patch_size, 384, 12, 6, **kwargs)


def vit_base(patch_size: int = 16, **kwargs) -> VisionTransformer:
    return _vit(patch_size, 768, 12, 12, **kwargs)


def vit_large(patch_size: int = 16, **kwargs) -> VisionTransformer:
    return _vit(patch_size, 1024, 24, 16, **kwargs)


def vit_giant2(patch_size: int = 16, **kwargs) -> VisionTransformer:
    """DINOv2's ViT-g: embed_dim 1536 and 24 heads (head dimension 64)."""
    return _vit(patch_size, 1536, 40, 24, **kwargs)


def dinov2_vit(arch: str = "vit_small", num_register_tokens: int = 0, **kwargs) -> VisionTransformer:
    """The backbone of Meta's released DINOv2 files, built as DINOv2's `hub/backbones.py` builds it: /14
    patches, a 518 px position grid, LayerScale (init 1.0), SwiGLU for ViT-g; with registers, antialiased
    interpolation without offset. `kwargs` override (e.g. `masked_im_modeling`, `drop_path_rate`)."""
    options = dict(patch_size=14, img_size=518, init_values=1.0, num_register_tokens=num_register_tokens)
    if num_register_tokens:
        options.update(interpolate_antialias=True, interpolate_offset=0.0)
    if arch == "vit_giant2":
        options["ffn_layer"] = "swiglu"
    return globals()[arch](**{**options, **kwargs})


def dinov2_vits14(**kwargs) -> VisionTransformer:
    return dinov2_vit("vit_small", **kwargs)


def dinov2_vitb14(**kwargs) -> VisionTransformer:
    return dinov2_vit("vit_base", **kwargs)


def dinov2_vitl14(**kwargs) -> VisionTransformer:
    return dinov2_vit("vit_large", **kwargs)


def dinov2_vitg14(**kwargs) -> VisionTransformer:
    return dinov2_vit("vit_giant2", **kwargs)


def dinov2_vits14_reg4(**kwargs) -> VisionTransformer:
    return dinov2_vit("vit_small", 4, **kwargs)


def dinov2_vitb14_reg4(**kwargs) -> VisionTransformer:
    return dinov2_vit("vit_base", 4, **kwargs)


def dinov2_vitl14_reg4(**kwargs) -> VisionTransformer:
    return dinov2_vit("vit_large", 4, **kwargs)


def dinov2_vitg14_reg4(**kwargs) -> VisionTransformer:
    return dinov2_vit("vit_giant2", 4, **kwargs)


class WeightNormLinear(nn.Module):
    """Bias-free linear layer with weight = weight_g * weight_v / ||weight_v|| (row-wise).

    Same parameters, keys and numerics as `nn.utils.weight_norm(nn.Linear(in, out, bias=False))`
    (dim=0), without the deprecated hook.
    """

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        linear = nn.Linear(in_features, out_features, bias=False)  # default (Kaiming-uniform) init
        self.in_features, self.out_features = in_features, out_features
        self.weight_g = nn.Parameter(linear.weight.detach().norm(dim=1, keepdim=True))
        self.weight_v = nn.Parameter(linear.weight.detach().clone())

    @property
    def weight(self) -> torch.Tensor:
        return torch._weight_norm(self.weight_v, self.weight_g, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}"


class DINOHead(nn.Module):
    """MLP -> L2-normalised bottleneck -> weight-normalised linear layer to `out_dim` prototypes."""

    def __init__(self, in_dim: int, out_dim: int, use_bn: bool = False, norm_last_layer: bool = True,
                 nlayers: int = 3, hidden_dim: int = 2048, bottleneck_dim: int = 256):
        super().__init__()
        nlayers = max(nlayers, 1)
        if nlayers == 1:
            self.mlp = nn.Linear(in_dim, bottleneck_dim)
        else:
            layers = [nn.Linear(in_dim, hidden_dim)]
            if use_bn:
                layers.append(nn.BatchNorm1d(hidden_dim))
            layers.append(nn.GELU())
            for _ in range(nlayers - 2):
                layers.append(nn.Linear(hidden_dim, hidden_dim))
                if use_bn:
                    layers.append(nn.BatchNorm1d(hidden_dim))
                layers.append(nn.GELU())
            layers.append(nn.Linear(hidden_dim, bottleneck_dim))
            self.mlp = nn.Sequential(*layers)
        self.apply(self._init_weights)
        self.last_layer = WeightNormLinear(bottleneck_dim, out_dim)
        self.last_layer.weight_g.data.fill_(1)
        if norm_last_layer:
            self.last_layer.weight_g.requires_grad = False

    def _init_weights(self, m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=.02)
            if m.bias is not None:
                nn.init.constant_(m.bias, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.mlp(x)
        x = F.normalize(x, dim=-1, p=2)
        return self.last_layer(x)
