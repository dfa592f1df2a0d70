"""An independent re-implementation of the INFERENCE path of Meta's DINOv3 `DinoVisionTransformer`.

Reference for tests only: Meta's code (github.com/facebookresearch/dinov3) is not installable here, so this
file re-creates, from Meta's sources, what its released backbones compute, with Meta's module names so that
`state_dict()` has exactly the keys of Meta's files (e.g. `dinov3_vits16_pretrain_lvd1689m-08c60483.pth`):

    cls_token [1, 1, D]                 storage_tokens [1, n_storage, D]       mask_token [1, D]
    patch_embed.proj.{weight,bias}      rope_embed.periods [D_head // 4]
    blocks.{i}.norm1.{weight,bias}      blocks.{i}.attn.qkv.{weight,bias,bias_mask}
    blocks.{i}.attn.proj.{weight,bias}  blocks.{i}.ls1.gamma
    blocks.{i}.norm2.{weight,bias}      blocks.{i}.mlp.fc1.{weight,bias}   blocks.{i}.mlp.fc2.{weight,bias}
    blocks.{i}.ls2.gamma                norm.{weight,bias}

It was written WITHOUT looking at timm's port (timm/models/eva.py), so that comparing the two checks
timm's key conversion and model rather than repeating them. Where the upstream file is:

- dinov3/layers/patch_embed.py       `PatchEmbed` (Conv2d, output [B, H, W, D] with flatten_embedding=False)
- dinov3/layers/rope_position_encoding.py  `RopePositionEmbedding`: coordinates of the patch centres,
  normalised to [-1, 1] ("separate": rows by H, columns by W), periods `base ** (2 i / (D_head / 2))`,
  i < D_head / 4, angles `2 pi coord / period` laid out [y-angles, x-angles] and tiled twice over the head
  dimension; returns `(sin, cos)`, each [H*W, D_head]. Shift/jitter/rescale augmentations are training-only
  (the hub sets `rescale_coords=2`, which does nothing in eval mode) and are left out.
- dinov3/layers/attention.py         `rope_rotate_half`, `rope_apply`, `LinearKMaskedBias` (the qkv Linear
  whose bias is multiplied by a `bias_mask` buffer that is 0 on the K third: the K bias is never used),
  `SelfAttention` (RoPE applied to q and k of the patch tokens only, i.e. after the CLS + storage prefix;
  then `F.scaled_dot_product_attention` with its default 1/sqrt(D_head) scale)
- dinov3/layers/layer_scale.py       `LayerScale` (parameter `gamma`)
- dinov3/layers/ffn_layers.py        `Mlp` (fc1, exact GELU, fc2)
- dinov3/layers/block.py             `SelfAttentionBlock`: x + ls1(attn(norm1(x))), then + ls2(mlp(norm2(x)))
- dinov3/models/vision_transformer.py  `DinoVisionTransformer`: [CLS (+ 0 * mask_token), storage tokens,
  patches], the blocks, one final `norm` over all tokens (untie_cls_and_patch_norms=False for the ViT-S/B/L),
  `forward_features` -> {x_norm_clstoken, x_storage_tokens, x_norm_patchtokens, x_prenorm, masks},
  `forward(x, is_training=False)` -> head(x_norm_clstoken) with head = Identity.
- dinov3/hub/backbones.py            `dinov3_vits16`: embed_dim 384, depth 12, heads 6, ffn_ratio 4, patch 16,
  n_storage_tokens 4, layerscale_init 1e-5, qkv_bias=True with mask_k_bias=True, rope base 100,
  normalize_coords "separate", rope dtype fp32, ffn "mlp", norm_layer "layernormbf16", which Meta's
  `norm_layer_dict` maps to `nn.LayerNorm(eps=1e-5)` ("layernorm" would be eps=1e-6).

torch only; no timm import.
"""
import math
from functools import partial
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

# dinov3/models/vision_transformer.py: norm_layer_dict
NORM_LAYERS = {
    "layernorm": partial(nn.LayerNorm, eps=1e-6),
    "layernormbf16": partial(nn.LayerNorm, eps=1e-5),
}


# ----------------------------------------------------------------------------------------------------
# dinov3/layers/patch_embed.py
# ----------------------------------------------------------------------------------------------------
class PatchEmbed(nn.Module):
    """[B, C, H, W] -> [B, H/p, W/p, D] (flatten_embedding=False, as DinoVisionTransformer uses it)."""

    def __init__(self, img_size: int = 224, patch_size: int = 16, in_chans: int = 3, embed_dim: int = 768,
                 norm_layer=None, flatten_embedding: bool = True):
        super().__init__()
        self.img_size = (img_size, img_size)
        self.patch_size = (patch_size, patch_size)
        self.in_chans = in_chans
        self.embed_dim = embed_dim
        self.flatten_embedding = flatten_embedding
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)
        self.norm = norm_layer(embed_dim) if norm_layer else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        x = self.proj(x)  # [B, D, H, W]
        H, W = x.size(2), x.size(3)
        x = x.flatten(2).transpose(1, 2)  # [B, HW, D]
        x = self.norm(x)
        if not self.flatten_embedding:
            x = x.reshape(-1, H, W, self.embed_dim)  # [B, H, W, D]
        return x


# ----------------------------------------------------------------------------------------------------
# dinov3/layers/rope_position_encoding.py
# ----------------------------------------------------------------------------------------------------
class RopePositionEmbedding(nn.Module):
    """Axial 2-D RoPE: `forward(H=, W=)` returns `(sin, cos)`, each [H*W, D_head]."""

    def __init__(self, embed_dim: int, *, num_heads: int, base: Optional[float] = 100.0,
                 min_period: Optional[float] = None, max_period: Optional[float] = None,
                 normalize_coords: str = "separate", dtype: torch.dtype = torch.float32):
        super().__init__()
        assert embed_dim % (4 * num_heads) == 0
        both_periods = min_period is not None and max_period is not None
        if (base is None and not both_periods) or (base is not None and both_periods):
            raise ValueError("Either `base` or `min_period`+`max_period` must be provided.")
        D_head = embed_dim // num_heads
        self.base, self.min_period, self.max_period = base, min_period, max_period
        self.D_head = D_head
        self.normalize_coords = normalize_coords
        self.dtype = dtype
        # persistent: it is in Meta's checkpoints (`rope_embed.periods`)
        self.register_buffer("periods", torch.empty(D_head // 4, dtype=dtype), persistent=True)
        self._init_weights()

    def _init_weights(self) -> None:
        dtype = self.dtype
        if self.base is not None:
            periods = self.base ** (2 * torch.arange(self.D_head // 4, dtype=dtype) / (self.D_head // 2))
        else:
            base = self.max_period / self.min_period
            exponents = torch.linspace(0, 1, self.D_head // 4, dtype=dtype)
            periods = base ** exponents / base * self.max_period
        self.periods.data = periods

    def forward(self, *, H: int, W: int) -> Tuple[Tensor, Tensor]:
        dd = {"device": self.periods.device, "dtype": self.dtype}
        if self.normalize_coords == "max":
            max_HW = max(H, W)
            coords_h = torch.arange(0.5, H, **dd) / max_HW
            coords_w = torch.arange(0.5, W, **dd) / max_HW
        elif self.normalize_coords == "min":
            min_HW = min(H, W)
            coords_h = torch.arange(0.5, H, **dd) / min_HW
            coords_w = torch.arange(0.5, W, **dd) / min_HW
        elif self.normalize_coords == "separate":
            coords_h = torch.arange(0.5, H, **dd) / H
            coords_w = torch.arange(0.5, W, **dd) / W
        else:
            raise ValueError(f"Unknown normalize_coords: {self.normalize_coords}")
        coords = torch.stack(torch.meshgrid(coords_h, coords_w, indexing="ij"), dim=-1)  # [H, W, 2]
        coords = coords.flatten(0, 1)  # [HW, 2] as (row, column)
        coords = 2.0 * coords - 1.0  # [0, 1] -> [-1, 1]
        # (training only, absent here: shift / jitter / rescale of the coordinates)
        angles = 2 * math.pi * coords[:, :, None] / self.periods[None, None, :]  # [HW, 2, D_head/4]
        angles = angles.flatten(1, 2)  # [HW, D_head/2]: row angles, then column angles
        angles = angles.tile(2)  # [HW, D_head]
        return torch.sin(angles), torch.cos(angles)


# ----------------------------------------------------------------------------------------------------
# dinov3/layers/attention.py
# ----------------------------------------------------------------------------------------------------
def rope_rotate_half(x: Tensor) -> Tensor:
    # x: [x0 x1 x2 x3 x4 x5] -> [-x3 -x4 -x5 x0 x1 x2]
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def rope_apply(x: Tensor, sin: Tensor, cos: Tensor) -> Tensor:
    return (x * cos) + (rope_rotate_half(x) * sin)


class LinearKMaskedBias(nn.Linear):
    """The qkv projection with `mask_k_bias=True`: bias * bias_mask, the mask being 0 on the K third in
    Meta's checkpoints (filled with NaN until loaded, as upstream)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        assert self.out_features % 3 == 0
        if self.bias is not None:
            self.register_buffer("bias_mask", torch.full_like(self.bias, fill_value=math.nan))

    def forward(self, input: Tensor) -> Tensor:
        masked_bias = self.bias * self.bias_mask.to(self.bias.dtype) if self.bias is not None else None
        return F.linear(input, self.weight, masked_bias)


class SelfAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int = 8, qkv_bias: bool = False, proj_bias: bool = True,
                 attn_drop: float = 0.0, proj_drop: float = 0.0, mask_k_bias: bool = False):
        super().__init__()
        self.num_heads = num_heads
        head_dim = dim // num_heads
        self.scale = head_dim ** -0.5
        linear_class = LinearKMaskedBias if mask_k_bias else nn.Linear
        self.qkv = linear_class(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim, bias=proj_bias)
        self.proj_drop = nn.Dropout(proj_drop)

    def apply_rope(self, q: Tensor, k: Tensor, rope: Tuple[Tensor, Tensor]) -> Tuple[Tensor, Tensor]:
        """RoPE on the last sin.shape[-2] tokens (the patches); the prefix (CLS + storage) is left as is."""
        q_dtype, k_dtype = q.dtype, k.dtype
        sin, cos = rope
        q, k = q.to(sin.dtype), k.to(sin.dtype)
        N = q.shape[-2]
        prefix = N - sin.shape[-2]
        assert prefix >= 0
        q = torch.cat((q[:, :, :prefix, :], rope_apply(q[:, :, prefix:, :], sin, cos)), dim=-2)
        k = torch.cat((k[:, :, :prefix, :], rope_apply(k[:, :, prefix:, :], sin, cos)), dim=-2)
        return q.to(q_dtype), k.to(k_dtype)

    def compute_attention(self, qkv: Tensor, attn_bias=None, rope=None) -> Tensor:
        assert attn_bias is None
        B, N, _ = qkv.shape
        C = self.qkv.in_features
        qkv = qkv.reshape(B, N, 3, self.num_heads, C // self.num_heads)
        q, k, v = torch.unbind(qkv, 2)
        q, k, v = [t.transpose(1, 2) for t in (q, k, v)]  # [B, heads, N, D_head]
        if rope is not None:
            q, k = self.apply_rope(q, k, rope)
        x = F.scaled_dot_product_attention(q, k, v)
        x = x.transpose(1, 2)
        return x.reshape([B, N, C])

    def forward(self, x: Tensor, attn_bias=None, rope=None) -> Tensor:
        qkv = self.qkv(x)
        x = self.compute_attention(qkv=qkv, attn_bias=attn_bias, rope=rope)
        x = self.proj(x)
        return self.proj_drop(x)


# ----------------------------------------------------------------------------------------------------
# dinov3/layers/layer_scale.py, ffn_layers.py, block.py
# ----------------------------------------------------------------------------------------------------
class LayerScale(nn.Module):
    def __init__(self, dim: int, init_values: float = 1e-5, inplace: bool = False):
        super().__init__()
        self.inplace = inplace
        self.gamma = nn.Parameter(torch.full((dim,), float(init_values)))

    def forward(self, x: Tensor) -> Tensor:
        return x.mul_(self.gamma) if self.inplace else x * self.gamma


class Mlp(nn.Module):
    def __init__(self, in_features: int, hidden_features: Optional[int] = None, out_features: Optional[int] = None,
                 act_layer=nn.GELU, drop: float = 0.0, bias: bool = True):
        super().__init__()
        out_features = out_features or in_features
        hidden_features = hidden_features or in_features
        self.fc1 = nn.Linear(in_features, hidden_features, bias=bias)
        self.act = act_layer()
        self.fc2 = nn.Linear(hidden_features, out_features, bias=bias)
        self.drop = nn.Dropout(drop)

    def forward(self, x: Tensor) -> Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class SelfAttentionBlock(nn.Module):
    def __init__(self, dim: int, num_heads: int, ffn_ratio: float = 4.0, qkv_bias: bool = False,
                 proj_bias: bool = True, ffn_bias: bool = True, init_values: Optional[float] = None,
                 act_layer=nn.GELU, norm_layer=nn.LayerNorm, ffn_layer=Mlp, mask_k_bias: bool = False):
        super().__init__()
        self.norm1 = norm_layer(dim)
        self.attn = SelfAttention(dim, num_heads=num_heads, qkv_bias=qkv_bias, proj_bias=proj_bias,
                                  mask_k_bias=mask_k_bias)
        self.ls1 = LayerScale(dim, init_values=init_values) if init_values else nn.Identity()
        self.norm2 = norm_layer(dim)
        self.mlp = ffn_layer(in_features=dim, hidden_features=int(dim * ffn_ratio), act_layer=act_layer,
                             bias=ffn_bias)
        self.ls2 = LayerScale(dim, init_values=init_values) if init_values else nn.Identity()

    def _forward(self, x: Tensor, rope=None) -> Tensor:
        x_attn = x + self.ls1(self.attn(self.norm1(x), rope=rope))
        x_ffn = x_attn + self.ls2(self.mlp(self.norm2(x_attn)))
        return x_ffn

    def forward(self, x_or_x_list, rope_or_rope_list=None):
        if isinstance(x_or_x_list, Tensor):
            return self._forward(x_or_x_list, rope=rope_or_rope_list)
        if rope_or_rope_list is None:
            rope_or_rope_list = [None] * len(x_or_x_list)
        return [self._forward(x, rope=r) for x, r in zip(x_or_x_list, rope_or_rope_list)]


# ----------------------------------------------------------------------------------------------------
# dinov3/models/vision_transformer.py
# ----------------------------------------------------------------------------------------------------
class DinoVisionTransformer(nn.Module):
    def __init__(self, *, img_size: int = 224, patch_size: int = 16, in_chans: int = 3,
                 pos_embed_rope_base: Optional[float] = 100.0, pos_embed_rope_min_period: Optional[float] = None,
                 pos_embed_rope_max_period: Optional[float] = None,
                 pos_embed_rope_normalize_coords: str = "separate", pos_embed_rope_dtype: torch.dtype = torch.float32,
                 embed_dim: int = 768, depth: int = 12, num_heads: int = 12, ffn_ratio: float = 4.0,
                 qkv_bias: bool = True, layerscale_init: Optional[float] = None, norm_layer: str = "layernorm",
                 ffn_bias: bool = True, proj_bias: bool = True, n_storage_tokens: int = 0,
                 mask_k_bias: bool = False, untie_cls_and_patch_norms: bool = False, **ignored_kwargs):
        super().__init__()
        norm_layer_cls = NORM_LAYERS[norm_layer]
        self.num_features = self.embed_dim = embed_dim
        self.n_blocks = depth
        self.num_heads = num_heads
        self.patch_size = patch_size
        self.patch_embed = PatchEmbed(img_size=img_size, patch_size=patch_size, in_chans=in_chans,
                                      embed_dim=embed_dim, flatten_embedding=False)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.n_storage_tokens = n_storage_tokens
        if n_storage_tokens > 0:
            self.storage_tokens = nn.Parameter(torch.zeros(1, n_storage_tokens, embed_dim))
        self.rope_embed = RopePositionEmbedding(
            embed_dim=embed_dim, num_heads=num_heads, base=pos_embed_rope_base,
            min_period=pos_embed_rope_min_period, max_period=pos_embed_rope_max_period,
            normalize_coords=pos_embed_rope_normalize_coords, dtype=pos_embed_rope_dtype)
        self.blocks = nn.ModuleList([
            SelfAttentionBlock(dim=embed_dim, num_heads=num_heads, ffn_ratio=ffn_ratio, qkv_bias=qkv_bias,
                               proj_bias=proj_bias, ffn_bias=ffn_bias, init_values=layerscale_init,
                               act_layer=nn.GELU, norm_layer=norm_layer_cls, ffn_layer=Mlp, mask_k_bias=mask_k_bias)
            for _ in range(depth)])
        self.norm = norm_layer_cls(embed_dim)  # on all tokens (or, when untied, on the patches)
        self.untie_cls_and_patch_norms = untie_cls_and_patch_norms
        self.cls_norm = norm_layer_cls(embed_dim) if untie_cls_and_patch_norms else None
        self.head = nn.Identity()
        self.mask_token = nn.Parameter(torch.zeros(1, embed_dim))

    def prepare_tokens_with_masks(self, x: Tensor, masks: Optional[Tensor] = None) -> Tuple[Tensor, Tuple[int, int]]:
        x = self.patch_embed(x)
        B, H, W, _ = x.shape
        x = x.flatten(1, 2)
        if masks is not None:
            x = torch.where(masks.unsqueeze(-1), self.mask_token.to(x.dtype).unsqueeze(0), x)
            cls_token = self.cls_token
        else:
            cls_token = self.cls_token + 0 * self.mask_token
        if self.n_storage_tokens > 0:
            storage_tokens = self.storage_tokens
        else:
            storage_tokens = torch.empty(1, 0, cls_token.shape[-1], dtype=cls_token.dtype, device=cls_token.device)
        x = torch.cat([cls_token.expand(B, -1, -1), storage_tokens.expand(B, -1, -1), x], dim=1)
        return x, (H, W)

    def forward_features_list(self, x_list: List[Tensor], masks_list: List[Optional[Tensor]]) -> List[Dict[str, Tensor]]:
        x, rope = [], []
        for t_x, t_masks in zip(x_list, masks_list):
            t2_x, hw = self.prepare_tokens_with_masks(t_x, t_masks)
            x.append(t2_x)
            rope.append(hw)
        for blk in self.blocks:
            rope_sincos = [self.rope_embed(H=H, W=W) for H, W in rope]
            x = blk(x, rope_sincos)
        output = []
        for x_i, masks in zip(x, masks_list):
            if self.untie_cls_and_patch_norms:
                x_norm_cls_reg = self.cls_norm(x_i[:, : self.n_storage_tokens + 1])
                x_norm_patch = self.norm(x_i[:, self.n_storage_tokens + 1:])
            else:
                x_norm = self.norm(x_i)
                x_norm_cls_reg = x_norm[:, : self.n_storage_tokens + 1]
                x_norm_patch = x_norm[:, self.n_storage_tokens + 1:]
            output.append({
                "x_norm_clstoken": x_norm_cls_reg[:, 0],
                "x_storage_tokens": x_norm_cls_reg[:, 1:],
                "x_norm_patchtokens": x_norm_patch,
                "x_prenorm": x_i,
                "masks": masks,
            })
        return output

    def forward_features(self, x, masks: Optional[Tensor] = None):
        if isinstance(x, Tensor):
            return self.forward_features_list([x], [masks])[0]
        return self.forward_features_list(x, masks)

    def forward(self, *args, is_training: bool = False, **kwargs):
        ret = self.forward_features(*args, **kwargs)
        if is_training:
            return ret
        return self.head(ret["x_norm_clstoken"])


# ----------------------------------------------------------------------------------------------------
# dinov3/hub/backbones.py
# ----------------------------------------------------------------------------------------------------
def dinov3_vits16(**kwargs) -> DinoVisionTransformer:
    """The architecture of `dinov3_vits16` (weights not included: load a state_dict)."""
    config = dict(img_size=224, patch_size=16, in_chans=3, pos_embed_rope_base=100,
                  pos_embed_rope_min_period=None, pos_embed_rope_max_period=None,
                  pos_embed_rope_normalize_coords="separate", pos_embed_rope_dtype=torch.float32,
                  embed_dim=384, depth=12, num_heads=6, ffn_ratio=4, qkv_bias=True, layerscale_init=1.0e-05,
                  norm_layer="layernormbf16", ffn_bias=True, proj_bias=True, n_storage_tokens=4,
                  mask_k_bias=True)
    config.update(kwargs)
    return DinoVisionTransformer(**config)


@torch.no_grad()
def make_meta_state_dict(seed: int = 0, qkv_bias: str = "zero", scale: float = 1.0,
                         **arch_kwargs) -> Dict[str, Tensor]:
    """A Meta-format `dinov3_vits16` state_dict with non-trivial random weights.

    `qkv_bias`: "zero" (as in Meta's distilled ViT-S/B/L) or "qkv" (non-zero q, k and v biases: the k third
    must then be ignored, as Meta's `bias_mask` does). `bias_mask` is Meta's:
    1 on q and v, 0 on k. `rope_embed.periods` is what Meta computes. Layer-scale gammas are far from their
    1e-5 init, norms are not the identity, all other biases are non-zero. `scale` multiplies the tokens,
    patch-embedding and gammas: a small value makes the residual stream tiny, so that the LayerNorm eps
    matters. Keys, shapes and dtypes are those of Meta's file.
    """
    if qkv_bias not in ("zero", "qkv"):
        raise ValueError(f"qkv_bias must be 'zero' or 'qkv', not {qkv_bias!r}")
    model = dinov3_vits16(**arch_kwargs)
    g = torch.Generator().manual_seed(seed)

    def randn(shape, std=1.0, mean=0.0):
        return torch.randn(shape, generator=g) * std + mean

    sd = {}
    for name, t in model.state_dict().items():
        if name == "rope_embed.periods":
            value = t.clone()
        elif name.endswith("bias_mask"):
            D = t.shape[0] // 3
            value = torch.cat([torch.ones(D), torch.zeros(D), torch.ones(D)])
        elif name.endswith("attn.qkv.bias"):
            value = randn(t.shape, 0.5) if qkv_bias == "qkv" else torch.zeros(t.shape)
        elif name.endswith(".gamma"):  # layer scale: far from the 1e-5 init, not tiny
            value = (torch.rand(t.shape, generator=g) * 0.4 + 0.1) * scale
        elif name in ("cls_token", "storage_tokens", "mask_token"):
            value = randn(t.shape, 1.0) * scale
        elif name == "patch_embed.proj.weight":
            value = randn(t.shape, 1.0 / math.sqrt(t[0].numel())) * scale
        elif name == "patch_embed.proj.bias":
            value = randn(t.shape, 0.2) * scale
        elif "norm" in name and name.endswith("weight"):  # LayerNorm
            value = randn(t.shape, 0.2, mean=1.0)
        elif name.endswith("weight"):  # Linear [out, in]
            value = randn(t.shape, 1.0 / math.sqrt(t.shape[1]))
        elif name.endswith("bias"):
            value = randn(t.shape, 0.2)
        else:
            raise AssertionError(f"unexpected key {name}")
        sd[name] = value.to(t.dtype).contiguous()
    return sd


def load_reference(state_dict: Dict[str, Tensor], **arch_kwargs) -> DinoVisionTransformer:
    """`dinov3_vits16` with `state_dict` loaded strictly, in eval mode."""
    model = dinov3_vits16(**arch_kwargs)
    model.load_state_dict(state_dict, strict=True)
    return model.eval().requires_grad_(False)
