"""hubconf.py through torch.hub.load(..., source='local'): the official entry points and architectures,
weights from local files and explicit URLs only, the linear classifiers of eval_linear.py, and an
import that stays light and leaves the caller's modules alone.
"""
import argparse
import shutil
import socket
import subprocess
import sys

import pytest
import torch
import torch.nn as nn

import official_dino as ref  # the reference beside this file (pytest puts tests/ on sys.path)
from conftest import REPO_ROOT, official_vit_keys, perturbed_state

DINOV2_ENTRY_POINTS = [f"dinov2_vit{size}14{reg}" for reg in ("", "_reg") for size in "sblg"]
ENTRY_POINTS = ["dino_vits16", "dino_vits8", "dino_vitb16", "dino_vitb8", "dino_resnet50", "dino_head",
                "dino_vits16_lc", "dino_vits8_lc", "dino_vitb16_lc", "dino_vitb8_lc", "dino_resnet50_lc"
                ] + DINOV2_ENTRY_POINTS
OFFICIAL = "https://dl.fbaipublicfiles.com/dino/"


def hub_load(name, **kwargs):
    return torch.hub.load(str(REPO_ROOT), name, source="local", **kwargs)


def shapes(state_dict):
    return {k: tuple(v.shape) for k, v in state_dict.items()}


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to download or to open a connection fails the test."""
    def refuse(*args, **kwargs):
        raise AssertionError("hubconf tried to reach the network")
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(torch.hub, "download_url_to_file", refuse)
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", refuse)


@pytest.fixture(scope="module")
def vits16_files(tmp_path_factory):
    """An official ViT-S/16 with perturbed weights, saved as an official backbone-only file
    (`dino_deitsmall16_pretrain.pth`) and as an official full checkpoint (teacher = backbone. + head.)."""
    root = tmp_path_factory.mktemp("hub")
    torch.manual_seed(0)
    backbone = ref.vit_small(patch_size=16)
    backbone.load_state_dict(perturbed_state(backbone, seed=3))
    head = ref.DINOHead(384, 100, hidden_dim=64, bottleneck_dim=32)
    head.load_state_dict(perturbed_state(head, seed=4))
    teacher = ref.MultiCropWrapper(backbone, head).eval()
    torch.save(backbone.state_dict(), root / "pretrain.pth")
    torch.save({"teacher": teacher.state_dict(), "student": {"module." + k: v for k, v in teacher.state_dict().items()},
                "epoch": 100, "args": argparse.Namespace(arch="vit_small", patch_size=16)}, root / "full.pth")
    return {"pretrain": root / "pretrain.pth", "full": root / "full.pth", "teacher": teacher}


def assert_same_tensors(actual, expected):
    assert actual.keys() == expected.keys()
    for k, v in expected.items():
        assert torch.equal(actual[k], v), k


# ----------------------------------------------------------------------------------------------------
# Backbones
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name,embed_dim,patch_size", [
    ("dino_vits16", 384, 16), ("dino_vits8", 384, 8), ("dino_vitb16", 768, 16), ("dino_vitb8", 768, 8)])
def test_vit_entry_points_build_the_official_architecture(name, embed_dim, patch_size, no_network):
    model = hub_load(name, pretrained=False)
    assert type(model).__name__ == "VisionTransformer" and isinstance(model.head, nn.Identity)
    assert model.embed_dim == embed_dim and model.patch_embed.patch_size == patch_size
    assert shapes(model.state_dict()) == official_vit_keys(embed_dim, 12, patch_size)
    with torch.no_grad():
        assert model(torch.randn(2, 3, 32, 32)).shape == (2, embed_dim)


def test_resnet50_outputs_2048_features(tmp_path, no_network):
    # a torchvision-style state_dict (with its ImageNet classifier) loads, the classifier ignored
    import torchvision
    source = torchvision.models.resnet50(weights=None)
    source.load_state_dict(perturbed_state(source, seed=8))
    torch.save(source.state_dict(), tmp_path / "r50.pth")
    model = hub_load("dino_resnet50", weights=str(tmp_path / "r50.pth")).eval()
    assert isinstance(model.fc, nn.Identity)
    assert_same_tensors(model.state_dict(), {k: v for k, v in source.state_dict().items() if not k.startswith("fc.")})
    x = torch.randn(2, 3, 64, 64)
    source.fc = nn.Identity()
    with torch.no_grad():
        features = model(x)
        assert features.shape == (2, 2048)
        torch.testing.assert_close(features, source.eval()(x))


@pytest.mark.parametrize("fmt", ["pretrain", "full"])
def test_local_weights_load_exactly_the_saved_tensors(vits16_files, fmt, no_network):
    model = hub_load("dino_vits16", weights=str(vits16_files[fmt]))  # pretrained=True, the default
    assert_same_tensors(model.state_dict(), vits16_files["teacher"].backbone.state_dict())
    x = torch.randn(1, 3, 48, 48)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x), vits16_files["teacher"].backbone(x), rtol=1e-5, atol=1e-5)


def test_wrong_weights_stop_with_a_message(vits16_files, no_network):
    with pytest.raises(Exception, match="does not fit") as e:
        hub_load("dino_vits8", weights=str(vits16_files["pretrain"]))  # ViT-S/16 weights, ViT-S/8 model
    assert type(e.value).__name__ == "UserError"


@pytest.mark.parametrize("name", ENTRY_POINTS)
def test_pretrained_without_weights_shows_the_official_url_and_downloads_nothing(name, no_network):
    with pytest.raises(Exception) as e:
        hub_load(name)  # pretrained=True by default, as in the official hubconf
    message = str(e.value)
    assert type(e.value).__name__ == "UserError"
    assert "never downloads implicitly" in message and f"'{name}'" in message
    if name.startswith("dinov2_"):  # Meta's URL: dinov2_vits14/dinov2_vits14_reg4_pretrain.pth
        base, registers = name.replace("_reg", ""), "_reg4" if name.endswith("_reg") else ""
        assert f"weights='https://dl.fbaipublicfiles.com/dinov2/{base}/{base}{registers}_pretrain.pth'" in message
        return
    base = name[:-3] if name.endswith("_lc") else name
    official = {"dino_vits16": "dino_deitsmall16", "dino_vits8": "dino_deitsmall8", "dino_vitb16": "dino_vitbase16",
                "dino_vitb8": "dino_vitbase8", "dino_resnet50": "dino_resnet50", "dino_head": "dino_deitsmall16"}[base]
    if base == "dino_head":
        assert f"weights='{OFFICIAL}{official}_pretrain/{official}_pretrain_full_checkpoint.pth'" in message
    else:
        assert f"weights='{OFFICIAL}{official}_pretrain/{official}_pretrain.pth'" in message
    if name.endswith("_lc"):
        assert f"linear_weights='{OFFICIAL}{official}_pretrain/{official}_linearweights.pth'" in message


def test_an_explicit_url_is_downloaded_once_into_the_hub_cache(vits16_files, tmp_path, monkeypatch):
    downloads = []

    def fake_download(url, dst, *args, **kwargs):  # stands for the network: copies the local file
        downloads.append(url)
        shutil.copy(vits16_files["pretrain"], dst)

    monkeypatch.setattr(torch.hub, "download_url_to_file", fake_download)
    monkeypatch.setattr(torch.hub, "_hub_dir", str(tmp_path / "hub"))
    url = "https://example.org/models/my_vits16.pth?download=1"
    for _ in range(2):
        model = hub_load("dino_vits16", weights=url)
        assert_same_tensors(model.state_dict(), vits16_files["teacher"].backbone.state_dict())
    assert downloads == [url]  # the second load reads the cache
    assert (tmp_path / "hub" / "checkpoints" / "my_vits16.pth").is_file()


# ----------------------------------------------------------------------------------------------------
# Projection head
# ----------------------------------------------------------------------------------------------------
def test_dino_head(vits16_files, no_network):
    head = hub_load("dino_head", pretrained=False, in_dim=384, out_dim=100, hidden_dim=64, bottleneck_dim=32)
    assert shapes(head.state_dict()) == shapes(ref.DINOHead(384, 100, hidden_dim=64, bottleneck_dim=32).state_dict())
    default = hub_load("dino_head", pretrained=False, nlayers=1)  # official defaults otherwise: 384 -> 65536
    assert default.mlp.in_features == 384 and default.last_layer.weight_v.shape == (65536, 256)

    source = vits16_files["teacher"].head
    for key in ("teacher", "student"):  # the student's keys carry DDP's module. prefix
        head = hub_load("dino_head", weights=str(vits16_files["full"]), checkpoint_key=key, out_dim=100,
                        hidden_dim=64, bottleneck_dim=32).eval()
        assert_same_tensors(head.state_dict(), source.state_dict())
        x = torch.randn(3, 384)
        with torch.no_grad():
            torch.testing.assert_close(head(x), source(x), rtol=1e-5, atol=1e-6)

    with pytest.raises(Exception, match="holds no projection head"):
        hub_load("dino_head", weights=str(vits16_files["pretrain"]))
    with pytest.raises(Exception, match="does not fit DINOHead"):
        hub_load("dino_head", weights=str(vits16_files["full"]))  # out_dim 65536, hidden 2048: not this head


# ----------------------------------------------------------------------------------------------------
# Linear classifiers
# ----------------------------------------------------------------------------------------------------
def linear_checkpoint(path, in_features, num_labels, ddp=True, seed=0):
    """What eval_linear.py writes: the classifier's state_dict (DDP-wrapped: module.linear.*) and more."""
    g = torch.Generator().manual_seed(seed)
    weight, bias = torch.randn(num_labels, in_features, generator=g) / in_features ** 0.5, torch.randn(num_labels, generator=g)
    prefix = "module.linear." if ddp else "linear."
    torch.save({"epoch": 100, "state_dict": {prefix + "weight": weight, prefix + "bias": bias},
                "optimizer": {"state": {}, "param_groups": [{"lr": 0.01, "params": [0, 1]}]},
                "scheduler": {"last_epoch": 100}, "best_acc": 77.0}, path)
    return weight, bias


def test_vits16_lc_concatenates_the_cls_tokens_of_the_last_4_blocks(vits16_files, tmp_path, no_network):
    weight, bias = linear_checkpoint(tmp_path / "linear.pth", 4 * 384, num_labels=7)
    model = hub_load("dino_vits16_lc", weights=str(vits16_files["pretrain"]),
                     linear_weights=str(tmp_path / "linear.pth")).eval()
    assert model.linear.weight.shape == (7, 1536)  # num_labels read from the checkpoint
    assert set(model.state_dict()) == {"backbone." + k for k in vits16_files["teacher"].backbone.state_dict()} | \
        {"linear.weight", "linear.bias"}
    x = torch.randn(2, 3, 32, 48)
    with torch.no_grad():
        blocks = vits16_files["teacher"].backbone.get_intermediate_layers(x, 4)  # the official model
        expected = torch.cat([b[:, 0] for b in blocks], dim=-1) @ weight.t() + bias
        logits = model(x)
    assert logits.shape == (2, 7)
    torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-4)


def test_vitb16_lc_interleaves_cls_token_and_average_pooled_patches(tmp_path, no_network):
    weight, bias = linear_checkpoint(tmp_path / "linear.pth", 2 * 768, num_labels=3, ddp=False)
    model = hub_load("dino_vitb16_lc", pretrained=False, linear_weights=str(tmp_path / "linear.pth")).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        tokens = model.backbone.get_intermediate_layers(x, 1)[0]
        features = model.features(x)
        logits = model(x)
    assert features.shape == (2, 1536)
    # the official eval_linear.py order: cat((cls.unsqueeze(-1), avg.unsqueeze(-1)), -1).reshape
    assert torch.equal(features[:, 0::2], tokens[:, 0])
    torch.testing.assert_close(features[:, 1::2], tokens[:, 1:].mean(1))
    torch.testing.assert_close(logits, features @ weight.t() + bias, rtol=1e-4, atol=1e-4)


def test_resnet50_lc(tmp_path, no_network):
    weight, bias = linear_checkpoint(tmp_path / "linear.pth", 2048, num_labels=4)
    model = hub_load("dino_resnet50_lc", pretrained=False, linear_weights=str(tmp_path / "linear.pth")).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model(x), model.backbone(x) @ weight.t() + bias, rtol=1e-4, atol=1e-4)
    assert hub_load("dino_resnet50_lc", pretrained=False, num_labels=10).linear.weight.shape == (10, 2048)


def test_linear_checkpoint_that_does_not_fit_stops_with_a_message(tmp_path, no_network):
    linear_checkpoint(tmp_path / "linear.pth", 384, num_labels=5)  # one block's CLS token, not 4
    with pytest.raises(Exception, match="n_last_blocks=4"):
        hub_load("dino_vits16_lc", pretrained=False, linear_weights=str(tmp_path / "linear.pth"))
    model = hub_load("dino_vits16_lc", pretrained=False, linear_weights=str(tmp_path / "linear.pth"), n_last_blocks=1)
    assert model.linear.weight.shape == (5, 384)
    torch.save({"state_dict": {"module.fc.weight": torch.zeros(5, 384)}}, tmp_path / "other.pth")
    with pytest.raises(Exception, match="holds no linear classifier"):
        hub_load("dino_vits16_lc", pretrained=False, linear_weights=str(tmp_path / "other.pth"))


# ----------------------------------------------------------------------------------------------------
# Import
# ----------------------------------------------------------------------------------------------------
def test_import_is_light_and_leaves_the_callers_modules_alone(tmp_path):
    """torch.hub imports hubconf into the caller's process: `utils` and `runtime` modules of the caller's (common
    names) must neither be used by us nor be replaced by ours, and torchvision loads only for ResNets."""
    (tmp_path / "utils.py").write_text("CALLERS = True\n")
    (tmp_path / "runtime.py").write_text("CALLERS = True\n")  # another common name, imported by ours
    code = f"""
import sys, torch
import hubconf  # while no `utils` is imported: ours must not take the name
for name in ('utils', 'runtime', 'checkpointing', 'backbones'):
    assert name not in sys.modules, f'hubconf registered its {{name}} as the caller-visible `{{name}}`'
import runtime
assert runtime.CALLERS
assert 'torchvision' not in sys.modules, 'importing hubconf imported torchvision'
assert hubconf.dependencies == ['torch', 'torchvision']
entry_points = sorted(f for f in dir(hubconf) if callable(getattr(hubconf, f)) and not f.startswith('_'))
print(entry_points)
import utils  # the caller's
assert utils.CALLERS
# torch.hub imports hubconf again, now with the caller's `utils` imported: ours must still be used
model = torch.hub.load({str(REPO_ROOT)!r}, 'dino_vits8', source='local', pretrained=False)
assert type(model).__module__ == 'vision_transformer' and model.patch_embed.patch_size == 8
try:
    torch.hub.load({str(REPO_ROOT)!r}, 'dino_vits16', source='local')
except Exception as e:
    assert type(e).__name__ == 'UserError' and 'never downloads' in str(e), repr(e)
else:
    raise AssertionError('pretrained=True without weights did not raise')
assert sys.modules['utils'] is utils and utils.CALLERS
"""
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                          env={"PYTHONPATH": f"{tmp_path}:{REPO_ROOT}", "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == str(sorted(ENTRY_POINTS))
