"""visualize_attention.py: the official computation of the maps and masks, the files it writes, the
checkpoint formats it reads, and its errors.

A ViT-Tiny/16 on 64x80 crops keeps every test fast on CPU. Weights are perturbed (not the near-uniform
initialisation) so that attention maps and masks differ between patches and heads.
"""
import argparse
import socket
import sys

import matplotlib
import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms

import official_dino as ref  # the reference beside this file (pytest puts tests/ on sys.path)
from conftest import REPO_ROOT, assert_one_error_line, perturbed_state, run_cmd

import synthetic

import utils  # noqa: E402
import vision_transformer as vits  # noqa: E402
import visualize_attention as va  # noqa: E402

PATCH = 16
IMAGE_SIZE = (72, 88)   # resized to 72x88 (height, width), cropped to 64x80: 4x5 patches, not square
CROP = (64, 80)
HEADS = 3               # ViT-Tiny
SCRIPT = REPO_ROOT / "visualize_attention.py"


def va_args(**kwargs) -> argparse.Namespace:
    args = va.get_args_parser().parse_args([])
    args.arch, args.patch_size, args.image_size = "vit_tiny", PATCH, list(IMAGE_SIZE)
    for k, v in kwargs.items():
        setattr(args, k, v)
    return args


def expected_input(image_path) -> torch.Tensor:
    """The official preprocessing, written out: resize, normalise, crop bottom/right to whole patches."""
    t = transforms.Compose([transforms.Resize(list(IMAGE_SIZE)), transforms.ToTensor(),
                            transforms.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])
    return t(Image.open(image_path).convert("RGB"))[:, :CROP[0], :CROP[1]].unsqueeze(0)


@torch.no_grad()
def hand_maps(backbone, img) -> torch.Tensor:
    """CLS-to-patch attention of the last block, one value repeated over each 16x16 patch: [heads, 64, 80]."""
    attn = backbone.get_last_selfattention(img)                  # [1, heads, 1 + 20, 1 + 20]
    per_patch = attn[0, :, 0, 1:].reshape(HEADS, CROP[0] // PATCH, CROP[1] // PATCH)
    return per_patch.repeat_interleave(PATCH, dim=1).repeat_interleave(PATCH, dim=2)


def official_threshold(attentions: torch.Tensor, threshold: float) -> torch.Tensor:
    """The official script's lines, verbatim apart from names."""
    val, idx = torch.sort(attentions)
    val /= torch.sum(val, dim=1, keepdim=True)
    cumval = torch.cumsum(val, dim=1)
    th_attn = cumval > (1 - threshold)
    idx2 = torch.argsort(idx)
    for head in range(attentions.shape[0]):
        th_attn[head] = th_attn[head][idx2[head]]
    return th_attn


@pytest.fixture(scope="module")
def official_teacher():
    """An official MultiCropWrapper(ViT-Tiny/16, DINOHead) with perturbed weights (the weights' source)."""
    torch.manual_seed(0)
    wrapper = ref.MultiCropWrapper(ref.vit_tiny(patch_size=PATCH), ref.DINOHead(192, 64, hidden_dim=32,
                                                                                 bottleneck_dim=16))
    wrapper.load_state_dict(perturbed_state(wrapper, seed=5))
    return wrapper.eval()


@pytest.fixture(scope="module")
def files(tmp_path_factory, official_teacher):
    """An image and the official full checkpoint of `official_teacher`."""
    root = tmp_path_factory.mktemp("visualize")
    image_path = root / "shape.png"
    synthetic.synthetic_image(7, np.random.default_rng(1), size=100).save(image_path)  # three squares
    ckpt = root / "official_full.pth"
    teacher = official_teacher.state_dict()
    torch.save({"student": {"module." + k: v.clone() for k, v in teacher.items()}, "teacher": teacher,
                "epoch": 100, "args": argparse.Namespace(arch="vit_tiny", patch_size=PATCH),
                "dino_loss": {"center": torch.zeros(1, 64)}}, ckpt)
    return {"image": image_path, "official_full": ckpt, "root": root}


def decode_viridis(path) -> np.ndarray:
    """Colour levels 0..255 of an image written by plt.imsave with the default colormap (viridis)."""
    lut = matplotlib.colormaps["viridis"](np.arange(256))[:, :3] * 255
    rgb = np.asarray(Image.open(path).convert("RGB"), dtype=np.float64)
    dist = ((rgb[:, :, None, :] - lut[None, None]) ** 2).sum(-1)
    assert dist.min(-1).max() < 2, f"{path} has colours outside the viridis colormap"
    return dist.argmin(-1)


# ----------------------------------------------------------------------------------------------------
# The command line, end to end
# ----------------------------------------------------------------------------------------------------
def test_cli_writes_official_maps_and_masks_from_an_official_full_checkpoint(files, official_teacher, tmp_path):
    out = tmp_path / "out"
    proc = run_cmd([sys.executable, SCRIPT, "--arch", "vit_tiny", "--patch_size", PATCH,
                    "--pretrained_weights", files["official_full"], "--checkpoint_key", "teacher",
                    "--image_path", files["image"], "--image_size", *IMAGE_SIZE,
                    "--output_dir", out, "--threshold", 0.6], timeout=300)
    mask_names = [f"mask_th0.6_head{j}.png" for j in range(HEADS)]
    attn_names = [f"attn-head{j}.png" for j in range(HEADS)]
    assert sorted(p.name for p in out.iterdir()) == sorted(["img.png"] + attn_names + mask_names)
    for name in ["img.png"] + attn_names + mask_names:  # the paths are printed, all of them
        assert str(out / name) in proc.stdout
        assert Image.open(out / name).size == (CROP[1], CROP[0]), name  # PIL: (width, height)

    # img.png: the input after resize and crop, with the ImageNet normalisation undone
    x = expected_input(files["image"])
    mean, std = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1), torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
    expected_img = ((x[0] * std + mean).clamp(0, 1) * 255).permute(1, 2, 0).numpy()
    saved_img = np.asarray(Image.open(out / "img.png"), dtype=np.float64)
    assert np.abs(saved_img - expected_img).max() <= 1.0

    # attn-head{j}.png: the official colour-mapped CLS attention of the model the weights came from
    maps = hand_maps(official_teacher.backbone, x).numpy()
    for j in range(HEADS):
        m = maps[j]
        levels = np.clip(np.floor((m - m.min()) / (m.max() - m.min()) * 256), 0, 255)
        assert np.abs(decode_viridis(out / attn_names[j]) - levels).max() <= 1, f"head {j}"
    assert len({decode_viridis(out / n).tobytes() for n in attn_names}) == HEADS  # heads differ

    # mask_th0.6_head{j}.png: the image, half red where the official threshold keeps the patch
    attn = official_teacher.backbone.get_last_selfattention(x).detach()[0, :, 0, 1:]
    kept = official_threshold(attn.clone(), 0.6).reshape(HEADS, CROP[0] // PATCH, CROP[1] // PATCH).numpy()
    centres = np.arange(PATCH // 2, CROP[0], PATCH), np.arange(PATCH // 2, CROP[1], PATCH)
    base = saved_img[np.ix_(*centres)]  # pixel at the centre of each patch, away from the outlines
    for j in range(HEADS):
        overlay = np.asarray(Image.open(out / mask_names[j]).convert("RGB"), dtype=np.float64)[np.ix_(*centres)]
        m = kept[j][..., None]
        expected = base * (1 - 0.5 * m) + 0.5 * m * np.array([255.0, 0.0, 0.0])
        assert np.abs(overlay - expected).max() <= 2, f"mask overlay of head {j}"
        assert 0 < kept[j].sum() < kept[j].size, "the test needs masks that keep some patches, not all"


@pytest.mark.parametrize("kind", ["missing", "unreadable"])
def test_bad_image_path_stops_with_a_message(tmp_path, kind):
    path = tmp_path / "photo.jpg"
    if kind == "unreadable":
        path.write_bytes(b"\xff\xd8 not really a jpeg")
    with pytest.raises(utils.UserError) as e:
        va.visualize_attention(va_args(image_path=str(path), output_dir=str(tmp_path / "out")))
    message = str(e.value)
    assert message.startswith("--image_path ") and str(path) in message and "\n" not in message
    assert ("does not exist" if kind == "missing" else "not a readable image") in message
    assert not (tmp_path / "out" / "img.png").exists()


def test_cli_error_is_one_line_and_exit_code_2(tmp_path):
    path = tmp_path / "photo.jpg"
    proc = run_cmd([sys.executable, SCRIPT, "--arch", "vit_tiny", "--patch_size", PATCH, "--image_path", path,
                    "--output_dir", tmp_path / "out"], check=False, timeout=300)
    assert_one_error_line(proc, f"--image_path {path} does not exist")
    assert not (tmp_path / "out" / "img.png").exists()


# ----------------------------------------------------------------------------------------------------
# The computation
# ----------------------------------------------------------------------------------------------------
def test_maps_equal_the_hand_computation_from_get_last_selfattention(files, official_teacher):
    model = vits.vit_tiny(patch_size=PATCH).eval()
    model.load_state_dict({k[len("backbone."):]: v for k, v in official_teacher.state_dict().items()
                           if k.startswith("backbone.")})
    x = expected_input(files["image"])
    attentions = va.cls_attention(model, x)
    assert attentions.shape == (HEADS, 20)
    maps = va.upsample(attentions, CROP[0] // PATCH, CROP[1] // PATCH, PATCH)
    expected = hand_maps(model, x).numpy()
    assert maps.shape == (HEADS, *CROP)
    np.testing.assert_array_equal(maps, expected)
    np.testing.assert_allclose(maps, hand_maps(official_teacher.backbone, x).numpy(), rtol=1e-5, atol=1e-7)
    assert not np.allclose(maps[:, :PATCH, :PATCH], maps[:, -PATCH:, -PATCH:])  # patches differ


@pytest.mark.parametrize("threshold", [0.1, 0.5, 0.6, 0.9, 1.0])
def test_threshold_keeps_the_smallest_set_holding_the_mass(threshold):
    g = torch.Generator().manual_seed(int(threshold * 10))
    attentions = torch.softmax(3 * torch.randn(4, 60, generator=g), dim=-1)  # 4 heads, 60 patches
    kept = va.threshold_masks(attentions, threshold)
    assert kept.dtype == torch.bool and kept.shape == attentions.shape
    assert torch.equal(kept, official_threshold(attentions.clone(), threshold))
    a = attentions.double()
    a = a / a.sum(1, keepdim=True)
    for head in range(4):
        mass = a[head][kept[head]].sum().item()
        assert mass >= threshold - 1e-6, (head, mass)
        # minimal: without its smallest patch the set holds less than the threshold ...
        assert mass - a[head][kept[head]].min().item() < threshold + 1e-6, (head, mass)
        # ... and it is made of the largest patches
        if (~kept[head]).any():
            assert a[head][kept[head]].min() >= a[head][~kept[head]].max()


@pytest.mark.parametrize("fmt", ["main_dino", "official_full", "official_backbone_only"])
def test_checkpoint_formats_give_the_maps_of_the_source_model(files, official_teacher, tmp_path, fmt):
    backbone = {k[len("backbone."):]: v for k, v in official_teacher.state_dict().items() if k.startswith("backbone.")}
    source = vits.vit_tiny(patch_size=PATCH).eval()
    source.load_state_dict(backbone)
    path = files["official_full"]
    if fmt == "main_dino":  # what main_dino.py writes: MultiCropWrapper keys under teacher/student
        head = vits.DINOHead(192, 64, hidden_dim=32, bottleneck_dim=16)
        teacher = {"backbone." + k: v for k, v in backbone.items()}
        teacher.update({"head." + k: v for k, v in head.state_dict().items()})
        path = tmp_path / "checkpoint.pth"
        torch.save({"student": dict(teacher), "teacher": teacher, "epoch": 3, "args": {"arch": "vit_tiny"},
                    "dino_loss": {"center": torch.zeros(1, 64)}}, path)
    elif fmt == "official_backbone_only":  # e.g. dino_deitsmall16_pretrain.pth
        path = tmp_path / "pretrain.pth"
        torch.save(backbone, path)
    img, maps, masks = va.attention_maps(va_args(pretrained_weights=str(path), image_path=str(files["image"]),
                                                 threshold=0.5))
    assert torch.equal(img, expected_input(files["image"]))
    np.testing.assert_array_equal(maps, hand_maps(source, img).numpy())
    attn = va.cls_attention(source, img)
    expected_masks = official_threshold(attn.clone(), 0.5).reshape(HEADS, 4, 5).float()
    expected_masks = expected_masks.repeat_interleave(PATCH, 1).repeat_interleave(PATCH, 2).numpy()
    np.testing.assert_array_equal(masks, expected_masks)


# ----------------------------------------------------------------------------------------------------
# Without an image or weights, and bad flags
# ----------------------------------------------------------------------------------------------------
def test_no_image_and_no_weights_uses_a_generated_image_and_never_downloads(tmp_path, monkeypatch, capsys):
    def refuse(*args, **kwargs):
        raise AssertionError("visualize_attention.py tried to reach the network")
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(torch.hub, "download_url_to_file", refuse)
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", refuse)
    paths = va.visualize_attention(va_args(image_size=[40, 56], output_dir=str(tmp_path)))
    out = capsys.readouterr().out
    assert "generated image" in out and "RANDOMLY INITIALISED" in out
    assert [p.rsplit("/", 1)[-1] for p in paths] == ["img.png"] + [f"attn-head{j}.png" for j in range(HEADS)]
    assert Image.open(tmp_path / "img.png").size == (48, 32)  # 40x56 cropped to whole 16x16 patches
    assert Image.open(tmp_path / "attn-head0.png").size == (48, 32)


@pytest.mark.parametrize("flags,message", [
    (dict(arch="resnet50"), "--arch resnet50 has no self-attention"),
    (dict(arch="vit_small_patch16_224"), "has no self-attention"),
    (dict(threshold=1.5), "--threshold"),
    (dict(threshold=0.0), "--threshold"),
    (dict(image_size=[64, 64, 64]), "--image_size"),
    (dict(image_size=[8]), "smaller than one 16x16 patch"),
])
def test_bad_flags_stop_with_a_message(flags, message, tmp_path):
    with pytest.raises(utils.UserError, match=message):
        va.visualize_attention(va_args(output_dir=str(tmp_path / "out"), **flags))
    assert not (tmp_path / "out" / "img.png").exists()


def test_deit_alias_is_accepted_and_help_prints():
    va.check_args(va_args(arch="deit_tiny"))
    assert "--threshold" in va.get_args_parser().format_help()  # every help string formats (no stray %)
