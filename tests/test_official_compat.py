"""Numerical compatibility with the official facebookresearch/dino code.

`tests/official_dino.py` is a test-only reference copy of the relevant parts of the official
repository (vision_transformer.py, utils.py, DINOLoss of main_dino.py). Every test here builds the
official object and ours, gives them the same weights / inputs, and checks that state_dict keys,
outputs, gradients and side effects (DINO centre, clipped gradients) agree.

CPU only and fast: small batches, small images for the large configurations, torch.no_grad.
"""
import copy
import warnings
from functools import lru_cache, partial

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import official_dino as ref  # noqa: E402  (the reference beside this file; pytest puts tests/ on sys.path)

import vision_transformer as ovt  # noqa: E402  (ours; repo root is on sys.path via conftest.py)
import losses  # noqa: E402
from losses.dino import DINOLoss as OurDINOLoss  # noqa: E402
from conftest import official_vit_keys, perturbed_state  # noqa: E402


@pytest.fixture(scope="module")
def ou():
    """Our utils module (imported lazily so that the ViT/loss tests run even while it is missing)."""
    import utils
    return utils


# --------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------
def assert_close(actual, expected, rel=1e-5, rtol=1e-4, msg=""):
    """assert_close with an absolute tolerance relative to the scale of `expected`."""
    actual = actual.detach().float()
    expected = expected.detach().float()
    assert actual.shape == expected.shape, f"{msg}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    scale = max(1.0, expected.abs().max().item())
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=rel * scale, msg=lambda m: f"{msg}: {m}")


def shapes(sd):
    return {k: tuple(v.shape) for k, v in sd.items()}


ARCH_DIMS = {"vit_tiny": (192, 12, 3), "vit_small": (384, 12, 6), "vit_base": (768, 12, 12)}


@lru_cache(maxsize=None)
def vit_pair(arch, patch):
    """(reference, ours) built by the `arch` builders, ours holding the reference's perturbed weights."""
    torch.manual_seed(0)
    r = getattr(ref, arch)(patch_size=patch).eval()
    o = getattr(ovt, arch)(patch_size=patch).eval()
    r.load_state_dict(perturbed_state(r, seed=sum(map(ord, arch)) + patch))
    o.load_state_dict(r.state_dict(), strict=True)
    return r, o


# Input shapes (B, H, W) per configuration: a square input at the native 224 resolution where cheap
# (no interpolation: the `npatch == N and w == h` branch), a non-square one and a small one.
VIT_CASES = [
    ("vit_tiny", 16, (2, 224, 224)),
    ("vit_tiny", 16, (2, 224, 160)),
    ("vit_tiny", 16, (2, 96, 96)),
    ("vit_tiny", 16, (1, 112, 448)),  # 7x28 = 196 patches = N, but not square: official interpolates
    ("vit_tiny", 8, (1, 224, 224)),
    ("vit_tiny", 8, (1, 96, 128)),
    ("vit_tiny", 8, (1, 96, 96)),
    ("vit_small", 16, (1, 224, 224)),
    ("vit_small", 16, (1, 224, 160)),
    ("vit_small", 16, (2, 96, 96)),
    ("vit_small", 8, (1, 128, 128)),
    ("vit_small", 8, (1, 64, 48)),
    ("vit_small", 8, (1, 96, 96)),
    ("vit_base", 16, (1, 224, 224)),
    ("vit_base", 16, (1, 160, 96)),
    ("vit_base", 16, (1, 96, 96)),
    ("vit_base", 8, (1, 64, 48)),
    ("vit_base", 8, (1, 96, 96)),
]
ARCH_PATCHES = sorted({(a, p) for a, p, _ in VIT_CASES})


# --------------------------------------------------------------------------------------------------
# Vision Transformer
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch,patch", ARCH_PATCHES)
def test_vit_state_dict_keys_and_strict_loading(arch, patch):
    r, o = vit_pair(arch, patch)
    embed_dim, depth, heads = ARCH_DIMS[arch]
    expected = official_vit_keys(embed_dim, depth, patch)
    assert shapes(r.state_dict()) == expected  # the reference itself is faithful
    assert shapes(o.state_dict()) == expected
    assert list(o.state_dict()) == list(r.state_dict())  # same order too
    assert o.embed_dim == o.num_features == embed_dim
    assert o.patch_embed.patch_size == patch
    assert all(blk.attn.num_heads == heads for blk in o.blocks)
    norms = [m for m in o.modules() if isinstance(m, nn.LayerNorm)]
    assert len(norms) == 2 * depth + 1 and all(m.eps == 1e-6 for m in norms)
    # vit_pair loaded official -> ours with strict=True; now ours -> official (strict), values preserved.
    sd_r = {k: v.clone() for k, v in r.state_dict().items()}
    r.load_state_dict(o.state_dict(), strict=True)
    for k, v in r.state_dict().items():
        assert torch.equal(v, sd_r[k]), k
        assert torch.equal(o.state_dict()[k], sd_r[k]), k


@pytest.mark.parametrize("arch,patch,bhw", VIT_CASES, ids=lambda v: "x".join(map(str, v)) if isinstance(v, tuple) else str(v))
def test_vit_outputs_match_official(arch, patch, bhw):
    r, o = vit_pair(arch, patch)
    b, h, w = bhw
    x = torch.randn(b, 3, h, w, generator=torch.Generator().manual_seed(h * 1000 + w))
    n_tokens = 1 + (h // patch) * (w // patch)
    _, _, heads = ARCH_DIMS[arch]
    with torch.no_grad():
        out_r, out_o = r(x), o(x)
        assert out_o.shape == (b, r.embed_dim)
        assert_close(out_o, out_r, msg=f"{arch}/{patch} forward {bhw}")

        att_r, att_o = r.get_last_selfattention(x), o.get_last_selfattention(x)
        assert att_o.shape == (b, heads, n_tokens, n_tokens)
        assert_close(att_o, att_r, msg=f"{arch}/{patch} get_last_selfattention {bhw}")

        int_r, int_o = r.get_intermediate_layers(x, n=2), o.get_intermediate_layers(x, n=2)
        assert isinstance(int_o, (list, tuple)) and len(int_o) == 2
        for i, (a, e) in enumerate(zip(int_o, int_r)):
            assert a.shape == (b, n_tokens, r.embed_dim)
            assert_close(a, e, msg=f"{arch}/{patch} get_intermediate_layers[{i}] {bhw}")
        # the last intermediate layer is the normalised output whose CLS token `forward` returns
        assert_close(int_o[-1][:, 0], out_o, msg="last intermediate layer CLS vs forward")


def test_vit_cpu_bf16_autocast_explicit_attention_matches_fp32():
    """bf16 autocast on CPU takes the explicit attention path (faster there than torch's fused CPU kernel): its
    outputs and gradients stay within bf16 rounding of the fp32 model, and it returns no attention weights."""
    model = ovt.vit_tiny(patch_size=16, drop_path_rate=0.0)
    x = torch.randn(2, 3, 64, 48, generator=torch.Generator().manual_seed(0))
    out32 = model(x)
    out32.square().sum().backward()
    grads32 = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out16 = model(x)
        y, attn = model.blocks[0].attn(model.prepare_tokens(x))
    assert y.dtype == torch.bfloat16 and attn is None  # the residual stream (and so the output) stays fp32
    rel = ((out16.float() - out32).norm() / out32.norm()).item()
    assert rel < 3e-2, rel
    out16.float().square().sum().backward()
    for n, p in model.named_parameters():
        assert p.grad is not None and p.grad.dtype == torch.float32, n
        g = grads32[n]
        if g.norm() > 0:
            assert ((p.grad - g).norm() / g.norm()).item() < 0.1, n


def test_vit_intermediate_layers_default_n_and_pos_encoding():
    r, o = vit_pair("vit_tiny", 16)
    x = torch.randn(1, 3, 64, 80, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        a, e = o.get_intermediate_layers(x), r.get_intermediate_layers(x)
        assert len(a) == 1
        assert_close(a[0], e[0], msg="get_intermediate_layers(n=1)")
        # the interpolated position embeddings themselves (official signature: x tokens, w=H, h=W)
        tok = torch.zeros(1, 1 + 4 * 5, r.embed_dim)
        assert_close(o.interpolate_pos_encoding(tok, 64, 80), r.interpolate_pos_encoding(tok, 64, 80),
                     rel=1e-6, msg="interpolate_pos_encoding")
        tok = torch.zeros(1, 1 + 196, r.embed_dim)
        assert torch.equal(o.interpolate_pos_encoding(tok, 224, 224), o.pos_embed)


def test_vit_large_keys(monkeypatch):
    # only keys and shapes matter here: skip the (slow) truncated-normal init of 300M parameters
    monkeypatch.setattr(nn.init, "trunc_normal_", lambda t, *a, **k: t)
    o = ovt.vit_large(patch_size=16)
    assert shapes(o.state_dict()) == official_vit_keys(1024, 24, 16)
    assert o.embed_dim == 1024 and all(blk.attn.num_heads == 16 for blk in o.blocks)
    norms = [m for m in o.modules() if isinstance(m, nn.LayerNorm)]
    assert len(norms) == 49 and all(m.eps == 1e-6 for m in norms)
    assert all(blk.attn.qkv.bias is not None for blk in o.blocks)


def test_vit_constructor_signature_matches_official():
    """Same VisionTransformer kwargs as the official one: build a tiny custom config on both."""
    kw = dict(img_size=[32], patch_size=8, in_chans=3, num_classes=0, embed_dim=48, depth=2, num_heads=4,
              mlp_ratio=2., qkv_bias=False, qk_scale=None, drop_rate=0., attn_drop_rate=0.,
              drop_path_rate=0., norm_layer=nn.LayerNorm)
    torch.manual_seed(0)
    r = ref.VisionTransformer(**kw).eval()
    o = ovt.VisionTransformer(**kw).eval()
    assert shapes(o.state_dict()) == shapes(r.state_dict())
    r.load_state_dict(perturbed_state(r, seed=5))
    o.load_state_dict(r.state_dict(), strict=True)
    x = torch.randn(3, 3, 40, 24, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert_close(o(x), r(x), msg="custom VisionTransformer forward")
    # positional arguments in the official order for the builders
    assert ovt.vit_tiny(8).patch_embed.patch_size == 8


def test_vit_drop_path_train_random_eval_deterministic():
    torch.manual_seed(0)
    r = ref.vit_tiny(patch_size=16, drop_path_rate=0.5)
    o = ovt.vit_tiny(patch_size=16, drop_path_rate=0.5)
    r.load_state_dict(perturbed_state(r, seed=7))
    o.load_state_dict(r.state_dict(), strict=True)
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        o.train()
        a, b = o(x), o(x)
        assert not torch.allclose(a, b), "drop_path_rate>0 in train() should make outputs random"
        o.eval()
        e1, e2 = o(x), o(x)
        assert torch.equal(e1, e2)
        assert_close(e1, r.eval()(x), msg="eval output with drop_path_rate")
    # stochastic depth decay rule: the official linspace(0, rate, depth)
    rates = [getattr(blk.drop_path, "drop_prob", 0.) for blk in o.blocks]
    expected = [getattr(blk.drop_path, "drop_prob", 0.) for blk in r.blocks]
    np.testing.assert_allclose(rates, expected, rtol=1e-6)


def test_drop_path_function_matches_official():
    x = torch.randn(8, 5, 4)
    for p in (0.0, 0.3):
        torch.manual_seed(123)
        e = ref.drop_path(x, p, training=True)
        torch.manual_seed(123)
        a = ovt.drop_path(x, p, training=True)
        assert torch.equal(a, e)
        assert torch.equal(ovt.drop_path(x, p, training=False), x)


# --------------------------------------------------------------------------------------------------
# DINOHead
# --------------------------------------------------------------------------------------------------
HEAD_CASES = [(bn, nll, nl) for bn in (False, True) for nll in (True, False) for nl in (1, 2, 3)]


@pytest.mark.parametrize("use_bn,norm_last_layer,nlayers", HEAD_CASES)
def test_dino_head_matches_official(use_bn, norm_last_layer, nlayers):
    kw = dict(in_dim=24, out_dim=40, use_bn=use_bn, norm_last_layer=norm_last_layer, nlayers=nlayers,
              hidden_dim=32, bottleneck_dim=16)
    torch.manual_seed(0)
    r = ref.DINOHead(**kw)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        o = ovt.DINOHead(**kw)
    assert shapes(o.state_dict()) == shapes(r.state_dict())
    assert list(o.state_dict()) == list(r.state_dict())
    assert tuple(o.last_layer.weight_g.shape) == (40, 1)
    assert tuple(o.last_layer.weight_v.shape) == (40, 16)
    # weight_g filled with ones at construction, frozen iff norm_last_layer
    assert torch.equal(o.last_layer.weight_g.detach(), torch.ones(40, 1))
    assert o.last_layer.weight_g.requires_grad is (not norm_last_layer)
    assert r.last_layer.weight_g.requires_grad is (not norm_last_layer)
    assert o.last_layer.weight_v.requires_grad
    assert [n for n, p in o.named_parameters() if p.requires_grad] == \
        [n for n, p in r.named_parameters() if p.requires_grad]

    r.load_state_dict(perturbed_state(r, seed=11))
    o.load_state_dict(r.state_dict(), strict=True)
    r2 = ref.DINOHead(**kw)
    r2.load_state_dict(o.state_dict(), strict=True)

    x = torch.randn(6, 24, generator=torch.Generator().manual_seed(1))
    w = torch.randn(6, 40, generator=torch.Generator().manual_seed(2))
    for mode in ("eval", "train"):  # train: BatchNorm uses batch statistics and updates running stats
        getattr(r, mode)()
        getattr(o, mode)()
        xr = x.clone().requires_grad_(True)
        xo = x.clone().requires_grad_(True)
        out_r, out_o = r(xr), o(xo)
        assert_close(out_o, out_r, msg=f"DINOHead forward ({mode})")
        (out_r * w).sum().backward()
        (out_o * w).sum().backward()
        assert_close(xo.grad, xr.grad, msg=f"DINOHead input gradient ({mode})")
        grads_r = {n: p.grad for n, p in r.named_parameters()}
        for n, p in o.named_parameters():
            if grads_r[n] is None:
                assert p.grad is None or not p.requires_grad, n
            else:
                assert p.grad is not None, n
                assert_close(p.grad, grads_r[n], msg=f"DINOHead grad {n} ({mode})")
        r.zero_grad(set_to_none=True)
        o.zero_grad(set_to_none=True)
        for k, v in r.state_dict().items():
            assert_close(o.state_dict()[k], v, msg=f"DINOHead state {k} after {mode} forward")


def test_dino_head_last_layer_rows_are_unit_norm_and_deepcopy():
    torch.manual_seed(0)
    o = ovt.DINOHead(8, 12, hidden_dim=16, bottleneck_dim=4)
    weight = o.last_layer.weight_g * o.last_layer.weight_v / o.last_layer.weight_v.norm(dim=1, keepdim=True)
    x = F.normalize(torch.randn(3, 4), dim=-1)
    assert_close(o.last_layer(x), x @ weight.t(), msg="last_layer = g * v / ||v||")
    c = copy.deepcopy(o)  # main_dino builds the teacher by copying the student
    z = torch.randn(3, 8)
    with torch.no_grad():
        assert torch.equal(c(z), o(z))


def test_constructing_ours_emits_no_warnings():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ovt.DINOHead(16, 32, hidden_dim=16, bottleneck_dim=8)
        ovt.DINOHead(16, 32, norm_last_layer=False, use_bn=True, hidden_dim=16, bottleneck_dim=8)
        ovt.VisionTransformer(img_size=[32], patch_size=8, embed_dim=32, depth=1, num_heads=2)
        OurDINOLoss(8, 4, 0.04, 0.07, 3, 10)


# --------------------------------------------------------------------------------------------------
# MultiCropWrapper
# --------------------------------------------------------------------------------------------------
def _small_backbone_and_head(module):
    torch.manual_seed(0)
    vit = module.VisionTransformer(patch_size=16, embed_dim=64, depth=2, num_heads=4, qkv_bias=True,
                                   norm_layer=partial(nn.LayerNorm, eps=1e-6))
    head = module.DINOHead(64, 48, hidden_dim=40, bottleneck_dim=24)
    return vit, head


def _crops(sizes, batch=2):
    g = torch.Generator().manual_seed(sum(sizes))
    return [torch.randn(batch, 3, s, s, generator=g) for s in sizes]


@pytest.mark.parametrize("sizes,n_backbone_calls", [
    ([64, 64, 32, 32, 32, 32], 2),   # 2 global + 4 local crops
    ([64, 32, 64], 3),               # runs of consecutive equal widths, as torch.unique_consecutive
    ([32], 1),
])
def test_multicrop_wrapper_matches_official(ou, sizes, n_backbone_calls):
    rv, rh = _small_backbone_and_head(ref)
    ov, oh = _small_backbone_and_head(ovt)
    rw = ref.MultiCropWrapper(rv, rh)
    ow = ou.MultiCropWrapper(ov, oh)
    rw.load_state_dict(perturbed_state(rw, seed=21))
    assert shapes(ow.state_dict()) == shapes(rw.state_dict())
    ow.load_state_dict(rw.state_dict(), strict=True)

    calls = []
    hook = ow.backbone.register_forward_hook(lambda m, i, out: calls.append(i[0].shape[0]))
    crops = _crops(sizes)
    out_o = ow(crops)
    hook.remove()
    out_r = rw(crops)
    assert len(calls) == n_backbone_calls, f"backbone called {len(calls)} times, expected {n_backbone_calls}"
    assert out_o.shape == (2 * len(sizes), 48)
    assert_close(out_o, out_r, msg="MultiCropWrapper vs official")
    with torch.no_grad():  # crop-major rows: crop 0 (all images), crop 1, ...
        per_crop = torch.cat([oh(ov(c)) for c in crops])
    assert_close(out_o, per_crop, msg="MultiCropWrapper vs per-crop backbone+head")

    # gradients through the wrapper agree too
    g = torch.randn(out_o.shape, generator=torch.Generator().manual_seed(0))
    (out_o * g).sum().backward()
    (out_r * g).sum().backward()
    grads_r = dict(rw.named_parameters())
    for n, p in ow.named_parameters():
        if grads_r[n].grad is None:
            assert p.grad is None, n
        else:
            assert_close(p.grad, grads_r[n].grad, msg=f"MultiCropWrapper grad {n}")


def test_multicrop_wrapper_single_tensor_input(ou):
    ov, oh = _small_backbone_and_head(ovt)
    ow = ou.MultiCropWrapper(ov, oh).eval()
    x = _crops([32])[0]
    with torch.no_grad():
        assert_close(ow(x), oh(ov(x)), msg="MultiCropWrapper on a tensor")
    assert isinstance(ow.backbone.head, nn.Identity)


# --------------------------------------------------------------------------------------------------
# cosine_scheduler, clip_gradients, cancel_gradients_last_layer, get_params_groups
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("args,kwargs", [
    ((0.0005 * 64 / 256, 1e-6, 100, 10), dict(warmup_epochs=10)),          # lr
    ((0.04, 0.4, 100, 7), {}),                                            # weight decay
    ((0.996, 1.0, 20, 13), {}),                                           # teacher momentum
    ((1.0, 0.0, 3, 4), dict(warmup_epochs=1, start_warmup_value=0.5)),
    ((0.1, 0.01, 5, 3), dict(warmup_epochs=2, start_warmup_value=1e-3)),
    ((0.1, 0.01, 5, 3), dict(warmup_epochs=0, start_warmup_value=0.7)),   # start value unused w/o warmup
    ((2.0, 2.0, 2, 1), {}),
    ((0.3, 0.0, 1, 1), {}),
])
def test_cosine_scheduler_identical(ou, args, kwargs):
    expected = ref.cosine_scheduler(*args, **kwargs)
    actual = ou.cosine_scheduler(*args, **kwargs)
    assert isinstance(actual, np.ndarray)
    assert actual.shape == expected.shape == (args[2] * args[3],)
    np.testing.assert_allclose(actual, expected, rtol=0, atol=0)
    # positional call in the official order as well
    positional = ou.cosine_scheduler(*args, kwargs.get("warmup_epochs", 0), kwargs.get("start_warmup_value", 0))
    np.testing.assert_allclose(positional, expected, rtol=0, atol=0)


def _grad_model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 10), nn.GELU(), nn.Linear(10, 10), nn.GELU(),
                          ovt.DINOHead(10, 12, hidden_dim=8, bottleneck_dim=4))
    model.register_parameter("unused", nn.Parameter(torch.ones(3)))  # grad stays None
    return model


def _backward(model, scale=1.0):
    x = torch.randn(5, 6, generator=torch.Generator().manual_seed(0))
    w = torch.randn(5, 12, generator=torch.Generator().manual_seed(1))
    (scale * (model(x) * w).sum()).backward()


def test_clip_gradients_matches_official(ou):
    a = _grad_model()
    b = copy.deepcopy(a)
    _backward(a, 30.0)
    _backward(b, 30.0)
    unclipped = [p.grad.norm().item() for p in a.parameters() if p.grad is not None]
    clip = float(np.median(unclipped))  # about half the tensors get clipped
    assert min(unclipped) < clip < max(unclipped)
    norms_e = ref.clip_gradients(b, clip)
    norms_a = ou.clip_gradients(a, clip)
    assert len(norms_a) == len(norms_e) == len(unclipped)
    np.testing.assert_allclose(np.array([float(n) for n in norms_a]), np.array(norms_e), rtol=1e-6)
    for (n, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters()):
        if pb.grad is None:
            assert pa.grad is None, n
        else:
            assert_close(pa.grad, pb.grad, rel=1e-6, rtol=1e-6, msg=f"clipped grad {n}")
            assert pa.grad.norm().item() <= clip * (1 + 1e-5)


def test_cancel_gradients_last_layer_matches_official(ou):
    for epoch, freeze in [(0, 1), (0, 0), (1, 1), (2, 3), (5, 3)]:
        a, b = _grad_model(), _grad_model()  # (deepcopy would not copy .grad)
        _backward(a)
        _backward(b)
        ou.cancel_gradients_last_layer(epoch, a, freeze)
        ref.cancel_gradients_last_layer(epoch, b, freeze)
        for (n, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters()):
            assert (pa.grad is None) == (pb.grad is None), (epoch, freeze, n)
            if pb.grad is not None:
                assert torch.equal(pa.grad, pb.grad), n
        assert (a[4].last_layer.weight_v.grad is None) == (epoch < freeze)


@pytest.mark.parametrize("norm_last_layer", [True, False])
def test_get_params_groups_matches_official(ou, norm_last_layer):
    torch.manual_seed(0)
    vit = ovt.VisionTransformer(img_size=[32], patch_size=8, embed_dim=32, depth=2, num_heads=2, qkv_bias=True)
    head = ovt.DINOHead(32, 16, use_bn=True, norm_last_layer=norm_last_layer, hidden_dim=24, bottleneck_dim=8)
    model = ou.MultiCropWrapper(vit, head)
    expected = ref.get_params_groups(model)
    actual = ou.get_params_groups(model)
    assert len(actual) == len(expected) == 2
    for ga, ge in zip(actual, expected):
        assert [id(p) for p in ga["params"]] == [id(p) for p in ge["params"]]
        assert ga.get("weight_decay", None) == ge.get("weight_decay", None)


# --------------------------------------------------------------------------------------------------
# DINOLoss
# --------------------------------------------------------------------------------------------------
LOSS_KW = dict(out_dim=32, ncrops=6, warmup_teacher_temp=0.04, teacher_temp=0.07,
               warmup_teacher_temp_epochs=4, nepochs=10)


def _loss_inputs(seed, batch=3, out_dim=32, ncrops=6):
    g = torch.Generator().manual_seed(seed)
    s = 3 * torch.randn(ncrops * batch, out_dim, generator=g)
    t = 3 * torch.randn(2 * batch, out_dim, generator=g) + torch.linspace(-1, 1, out_dim)  # non-zero mean
    return s, t


def test_dino_loss_interfaces():
    assert losses.DINOLoss is OurDINOLoss
    o = OurDINOLoss(**LOSS_KW)
    assert "center" in dict(o.named_buffers())
    assert tuple(o.center.shape) == (1, 32)
    assert torch.equal(o.center, torch.zeros(1, 32))
    # official positional order and defaults
    p = OurDINOLoss(32, 6, 0.04, 0.07, 4, 10)
    assert p.student_temp == 0.1 and p.center_momentum == 0.9
    np.testing.assert_allclose(np.asarray(p.teacher_temp_schedule),
                               ref.DINOLoss(32, 6, 0.04, 0.07, 4, 10).teacher_temp_schedule, rtol=0, atol=0)
    # state_dict compatible with official checkpoints (`dino_loss` entry)
    assert shapes(p.state_dict()) == shapes(ref.DINOLoss(32, 6, 0.04, 0.07, 4, 10).state_dict())


@pytest.mark.parametrize("student_temp,center_momentum", [(0.1, 0.9), (0.2, 0.5)])
def test_dino_loss_matches_official(student_temp, center_momentum):
    kw = dict(LOSS_KW, student_temp=student_temp, center_momentum=center_momentum)
    r, o = ref.DINOLoss(**kw), OurDINOLoss(**kw)
    # epochs inside the warmup (0..3), at its end and after it; the centre carries over between calls
    for step, epoch in enumerate([0, 1, 2, 3, 4, 9]):
        s, t = _loss_inputs(seed=step)
        sr, so = s.clone().requires_grad_(True), s.clone().requires_grad_(True)
        tr, to = t.clone().requires_grad_(True), t.clone().requires_grad_(True)
        lr, lo = r(sr, tr, epoch), o(so, to, epoch)
        assert lo.dim() == 0
        assert_close(lo, lr, rel=1e-6, rtol=1e-5, msg=f"loss epoch {epoch}")
        lr.backward()
        lo.backward()
        assert_close(so.grad, sr.grad, rel=1e-6, rtol=1e-5, msg=f"student grad epoch {epoch}")
        assert to.grad is None and tr.grad is None, "no gradient flows into the teacher"
        assert_close(o.center, r.center, rel=1e-6, rtol=1e-6, msg=f"center after call {step + 1}")


def test_dino_loss_two_crops_and_center_after_one_and_two_calls():
    kw = dict(out_dim=16, ncrops=2, warmup_teacher_temp=0.04, teacher_temp=0.04,
              warmup_teacher_temp_epochs=0, nepochs=3)
    r, o = ref.DINOLoss(**kw), OurDINOLoss(**kw)
    centers = []
    for step in range(2):
        s, t = _loss_inputs(seed=10 + step, batch=4, out_dim=16, ncrops=2)
        with torch.no_grad():
            assert_close(o(s, t, step), r(s, t, step), rel=1e-6, rtol=1e-5, msg=f"loss call {step + 1}")
        assert_close(o.center, r.center, rel=1e-6, rtol=1e-6, msg=f"center after call {step + 1}")
        centers.append(o.center.clone())
    assert not torch.equal(centers[0], centers[1])


def test_dino_loss_hand_computed():
    """out_dim 3, batch 1, ncrops 2, computed with explicit numpy formulas (float64)."""
    s = np.array([[0.3, -0.2, 0.5], [-0.1, 0.4, 0.0]])
    t = np.array([[0.05, 0.10, -0.02], [0.00, -0.06, 0.08]])
    o = OurDINOLoss(3, 2, warmup_teacher_temp=0.04, teacher_temp=0.07, warmup_teacher_temp_epochs=2, nepochs=4)

    def softmax(z):
        e = np.exp(z - z.max(-1, keepdims=True))
        return e / e.sum(-1, keepdims=True)

    def log_softmax(z):
        z = z - z.max(-1, keepdims=True)
        return z - np.log(np.exp(z).sum(-1, keepdims=True))

    center = np.zeros((1, 3))
    for epoch, temp in [(0, 0.04), (1, 0.07), (3, 0.07)]:  # linspace(0.04, 0.07, 2) then 0.07
        q = softmax((t - center) / temp)
        logp = log_softmax(s / 0.1)
        expected = 0.5 * (-(q[0] * logp[1]).sum() - (q[1] * logp[0]).sum())
        actual = o(torch.tensor(s, dtype=torch.float32), torch.tensor(t, dtype=torch.float32), epoch)
        np.testing.assert_allclose(actual.item(), expected, rtol=1e-5)
        center = 0.9 * center + 0.1 * t.mean(0, keepdims=True)
        np.testing.assert_allclose(o.center.numpy(), center, rtol=1e-5, atol=1e-8)


def test_dino_loss_center_all_reduce_with_single_process_group(tmp_path):
    import torch.distributed as dist
    if not dist.is_available() or dist.is_initialized():
        pytest.skip("torch.distributed unavailable or a process group already exists")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        r, o = ref.DINOLoss(**LOSS_KW), OurDINOLoss(**LOSS_KW)
        for step in range(2):
            s, t = _loss_inputs(seed=30 + step)
            with torch.no_grad():
                assert_close(o(s, t, step), r(s, t, step), rel=1e-6, rtol=1e-5, msg="loss with process group")
            assert_close(o.center, r.center, rel=1e-6, rtol=1e-6, msg="center with process group")
    finally:
        dist.destroy_process_group()
