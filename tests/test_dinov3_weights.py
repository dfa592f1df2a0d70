"""Meta's DINOv3 checkpoints, loaded with `--arch vit_small_patch16_dinov3` (timm's Eva port, keys converted
by timm's `checkpoint_filter_fn` through `utils.load_pretrained_weights`), give the features of Meta's own
model code.

Meta's code is not installable here, so `meta_dinov3.py` beside this file re-implements its inference path
(written independently of timm's port) with Meta's module names: its `state_dict` has exactly the keys of
Meta's released files. Random Meta-format weights are saved with `torch.save`, loaded through our loaders,
and the timm model's outputs are compared with the reference's `forward_features` dict:

- the encoder (CLS, storage and patch tokens after the final norm) for square and non-square inputs;
- the evaluation feature `model(x)` (what eval_knn uses) against `x_norm_clstoken`, which is what Meta's
  `forward(x, is_training=False)` returns;
- the same through eval_knn.py's `--dump_features` on a tiny ImageFolder.

Meta's distilled ViT-S/B/L have all-zero qkv biases: they go to `vit_small_patch16_dinov3` (no qkv bias);
non-zero biases need `vit_small_patch16_dinov3_qkvb`, and the plain arch refuses them. A variant with a tiny
residual stream makes the LayerNorm eps (1e-5 in Meta's `layernormbf16`) matter.
"""
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import parse
import meta_dinov3 as meta  # noqa: E402  (the reference beside this file; pytest puts tests/ on sys.path)

import backbones
import data  # noqa: E402  (repo root is on sys.path via conftest.py)
import eval_knn  # noqa: E402
import utils  # noqa: E402

ARCH = "vit_small_patch16_dinov3"
ARCH_QKVB = "vit_small_patch16_dinov3_qkvb"
ATOL = 1e-4
CPU = torch.device("cpu")
POOL_HINT = ("timm's DINOv3 ports default to global_pool='avg' (mean of the patch tokens); Meta's model returns the "
             "normalised CLS token: backbones.build_backbone must create timm DINOv3 models with global_pool='token'")

SHAPES = ((224, 224), (224, 160))
# name: (arch, qkv biases of the checkpoint, scale of the residual stream, input shapes)
CASES = {
    "zero_bias": (ARCH, "zero", 1.0, SHAPES),  # like Meta's distilled ViT-S/B/L
    "qkvb_nonzero_bias": (ARCH_QKVB, "qkv", 1.0, SHAPES),  # q, k and v biases non-zero: k must be masked out
    # tiny residual stream: the LayerNorm eps matters (1e-6 instead of Meta's 1e-5 is off by ~1.8)
    "zero_bias_tiny_stream": (ARCH, "zero", 1e-3, SHAPES[1:]),
}


def _expected_meta_keys(depth=12):
    keys = ["cls_token", "storage_tokens", "mask_token", "patch_embed.proj.weight", "patch_embed.proj.bias",
            "rope_embed.periods"]
    for i in range(depth):
        b = f"blocks.{i}."
        keys += [b + "norm1.weight", b + "norm1.bias", b + "attn.qkv.weight", b + "attn.qkv.bias",
                 b + "attn.qkv.bias_mask", b + "attn.proj.weight", b + "attn.proj.bias", b + "ls1.gamma",
                 b + "norm2.weight", b + "norm2.bias", b + "mlp.fc1.weight", b + "mlp.fc1.bias",
                 b + "mlp.fc2.weight", b + "mlp.fc2.bias", b + "ls2.gamma"]
    return keys + ["norm.weight", "norm.bias"]


# ----------------------------------------------------------------------------------------------------
# Shared state: Meta-format files, their reference outputs and the models our loader builds from them
# ----------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def inputs():
    g = torch.Generator().manual_seed(123)
    return {shape: torch.randn(1, 3, *shape, generator=g) for shape in SHAPES}


@pytest.fixture(scope="module")
def meta_files(tmp_path_factory):
    """{(bias, scale): (path of the Meta-format file, its state_dict)}."""
    folder = tmp_path_factory.mktemp("dinov3")
    files = {}
    for _, bias, scale, _ in CASES.values():
        if (bias, scale) not in files:
            sd = meta.make_meta_state_dict(seed=7, qkv_bias=bias, scale=scale)
            path = folder / f"dinov3_vits16_{bias}_{scale:g}.pth"
            torch.save(sd, path)
            files[(bias, scale)] = (str(path), sd)
    return files


@pytest.fixture(scope="module")
def case_results(meta_files, inputs):
    """Per case: the reference outputs and the model built by backbones.build_eval_model, computed once."""
    cache = {}

    def get(case):
        if case not in cache:
            arch, bias, scale, shapes = CASES[case]
            path, sd = meta_files[(bias, scale)]
            ref = meta.load_reference(sd)
            model = backbones.build_eval_model(arch, 16, path, None, CPU)
            with torch.no_grad():
                refs = {shape: ref.forward_features(inputs[shape]) for shape in shapes}
            cache[case] = (model, refs)
        return cache[case]
    return get


# ----------------------------------------------------------------------------------------------------
# The reference itself
# ----------------------------------------------------------------------------------------------------
def test_reference_state_dict_has_metas_keys(meta_files):
    sd = meta.dinov3_vits16().state_dict()
    assert list(sd) == _expected_meta_keys()
    shapes = {"cls_token": (1, 1, 384), "storage_tokens": (1, 4, 384), "mask_token": (1, 384),
              "patch_embed.proj.weight": (384, 3, 16, 16), "rope_embed.periods": (16,),
              "blocks.0.attn.qkv.weight": (1152, 384), "blocks.0.attn.qkv.bias_mask": (1152,),
              "blocks.0.ls1.gamma": (384,), "blocks.0.mlp.fc1.weight": (1536, 384)}
    assert {k: tuple(sd[k].shape) for k in shapes} == shapes
    # periods base ** (2 i / (D_head / 2)), i < D_head / 4, with base 100 and D_head 64
    torch.testing.assert_close(sd["rope_embed.periods"], 100.0 ** (torch.arange(16) / 16.0))
    made = meta_files[("qkv", 1.0)][1]
    assert list(made) == list(sd)
    assert all(made[k].shape == v.shape and made[k].dtype == v.dtype for k, v in sd.items())
    torch.testing.assert_close(made["rope_embed.periods"], sd["rope_embed.periods"], atol=0, rtol=0)
    mask = made["blocks.0.attn.qkv.bias_mask"]
    assert mask[:384].eq(1).all() and mask[384:768].eq(0).all() and mask[768:].eq(1).all()
    assert all(made[f"blocks.{i}.ls{j}.gamma"].min() >= 0.05 for i in range(12) for j in (1, 2))
    assert all(made[f"blocks.{i}.attn.qkv.bias"].abs().min() > 0 for i in range(12))  # k third too
    assert all(v.eq(0).all() for k, v in meta_files[("zero", 1.0)][1].items() if k.endswith("qkv.bias"))


@torch.no_grad()
def test_reference_masks_the_k_bias_and_rope_skips_the_prefix(meta_files, monkeypatch):
    """The comparisons below are not vacuous: the k bias and RoPE's prefix handling change nothing exactly
    where Meta's code says so, and would change the features otherwise."""
    sd = meta_files[("qkv", 1.0)][1]
    x = torch.randn(1, 3, 64, 48, generator=torch.Generator().manual_seed(0))
    model = meta.load_reference(sd)
    base = model(x)
    no_k = {k: (v.clone().index_fill_(0, torch.arange(384, 768), 0) if k.endswith("qkv.bias") else v)
            for k, v in sd.items()}
    model.load_state_dict(no_k)
    assert torch.equal(model(x), base)  # the k third is masked out ...
    unmasked = {k: (torch.ones_like(v) if k.endswith("bias_mask") else v) for k, v in sd.items()}
    model.load_state_dict(unmasked)
    assert (model(x) - base).abs().max() > 1e-2  # ... and it would matter
    model.load_state_dict(sd)

    original = meta.SelfAttention.apply_rope

    def rope_on_all_tokens(prefix_sin, prefix_cos):
        """apply_rope given sin/cos for the 5 prefix tokens too (so that no token is skipped)."""
        def apply_rope(self, q, k, rope):
            sin, cos = rope
            return original(self, q, k, (torch.cat([prefix_sin(sin), sin]), torch.cat([prefix_cos(cos), cos])))
        return apply_rope

    # sin 0 / cos 1 on the prefix is the identity: same features
    monkeypatch.setattr(meta.SelfAttention, "apply_rope", rope_on_all_tokens(
        lambda s: torch.zeros(5, s.shape[1]), lambda c: torch.ones(5, c.shape[1])))
    assert torch.allclose(model(x), base, atol=1e-6)
    # rotating the prefix as if it sat on the first patch changes them
    monkeypatch.setattr(meta.SelfAttention, "apply_rope", rope_on_all_tokens(
        lambda s: s[:1].expand(5, -1), lambda c: c[:1].expand(5, -1)))
    assert (model(x) - base).abs().max() > 1e-2


# ----------------------------------------------------------------------------------------------------
# timm's conversion and model against the reference
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", list(CASES))
@torch.no_grad()
def test_timm_encoder_matches_meta(case, case_results, inputs):
    """Every normalised token of timm's model equals Meta's: CLS, storage (register) and patch tokens."""
    model, refs = case_results(case)
    for shape, ref in refs.items():
        tokens = model.forward_features(inputs[shape])
        n_patches = (shape[0] // 16) * (shape[1] // 16)
        assert tokens.shape == (1, 1 + 4 + n_patches, 384), shape
        torch.testing.assert_close(tokens[:, 0], ref["x_norm_clstoken"], atol=ATOL, rtol=0)
        torch.testing.assert_close(tokens[:, 1:5], ref["x_storage_tokens"], atol=ATOL, rtol=0)
        torch.testing.assert_close(tokens[:, 5:], ref["x_norm_patchtokens"], atol=ATOL, rtol=0)


@pytest.mark.parametrize("case", list(CASES))
@torch.no_grad()
def test_eval_feature_is_metas_cls_token(case, case_results, inputs):
    """`model(x)`, the feature eval_knn extracts, is Meta's `forward(x, is_training=False)`."""
    model, refs = case_results(case)
    for shape, ref in refs.items():
        out = model(inputs[shape])
        expected = ref["x_norm_clstoken"]
        assert out.shape == expected.shape
        diff = (out - expected).abs().max().item()
        assert diff <= ATOL, f"{shape}: max abs diff {diff:.3g} from Meta's x_norm_clstoken. {POOL_HINT}"


def test_nonzero_qkv_bias_needs_the_qkvb_variant(meta_files):
    path, _ = meta_files[("qkv", 1.0)]
    with pytest.raises(utils.UserError, match=r"non-zero qkv biases.*vit_small_patch16_dinov3_qkvb"):
        backbones.build_eval_model(ARCH, 16, path, None, CPU)


def test_checkpoint_key_is_irrelevant_for_a_plain_state_dict(meta_files, capsys):
    path, _ = meta_files[("zero", 1.0)]
    model, _ = backbones.build_backbone(ARCH, 16)
    states = []
    for key in ("teacher", None, "student"):
        with torch.no_grad():
            for p in model.parameters():
                p.zero_()
        utils.load_pretrained_weights(model, path, key, ARCH, 16)
        states.append({k: v.clone() for k, v in model.state_dict().items()})
    out = capsys.readouterr().out
    assert "not used by the model" not in out  # mask_token, bias_mask, periods are dropped knowingly
    assert "Take key" not in out
    assert states[0]["reg_token"].abs().max() > 0  # storage_tokens, loaded
    for other in states[1:]:
        assert all(torch.equal(states[0][k], other[k]) for k in states[0])


# ----------------------------------------------------------------------------------------------------
# The command line: eval_knn.py --dump_features
# ----------------------------------------------------------------------------------------------------
def _make_image_folder(root: Path, classes=("a", "b"), per_class=3, seed=0):
    from PIL import Image
    rng = np.random.default_rng(seed)
    for split in ("train", "val"):
        for c in classes:
            (root / split / c).mkdir(parents=True)
            for i in range(per_class):
                base = rng.integers(0, 256, size=(8, 8, 3)).astype(np.uint8)  # smooth-ish, not pure noise
                img = Image.fromarray(base).resize((64, 64), Image.BILINEAR)
                img.save(root / split / c / f"{i}.png")
    return root


def test_eval_knn_features_are_metas_cls_tokens(tmp_path, meta_files):
    path, sd = meta_files[("zero", 1.0)]
    root = _make_image_folder(tmp_path / "imgs")
    dump = tmp_path / "feats"
    [(k, _, _)] = eval_knn.eval_knn(parse(eval_knn, "--arch", ARCH, "--pretrained_weights", path, "--data_path", root,
                                          "--resize_size", 64, "--crop_size", 64, "--dump_features", dump,
                                          "--nb_knn", 1, "--num_workers", 0, "--batch_size_per_gpu", 4))
    assert k == 1

    ref = meta.load_reference(sd)
    transform = data.eval_transform(64, 64)
    dataset_train, dataset_val = data.labeled_splits(str(root), 64, 64)  # the script's dataset order
    from PIL import Image
    for name, dataset in (("trainfeat.pth", dataset_train), ("testfeat.pth", dataset_val)):
        feats = torch.load(dump / name, weights_only=True)
        assert feats.shape == (len(dataset.samples), 384)
        images = torch.stack([transform(Image.open(p).convert("RGB")) for p, _ in dataset.samples])
        with torch.no_grad():
            expected = F.normalize(ref(images), dim=1)
        diff = (feats - expected).abs().max(dim=1).values
        assert diff.max() <= 1e-5, f"{name}: per-image max abs diff {diff.tolist()}. {POOL_HINT}"
