"""visualize_features.py: the PCA maps (shapes, the sign of the first component, the background threshold), the
feature maps of ViTs and ResNets, nearest neighbours (on the fly and from an extract_features.py folder), and the
pictures written.

A randomly initialised ViT-Tiny/16 (seed 0) on 64-px crops (4x4 patches) of generated images keeps every test fast.
"""
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import image_folder, noise_image, parse
import backbones
import data
import extract_features as ef
import utils
import visualize_features as vf

MODEL = ["--arch", "vit_tiny", "--patch_size", 16, "--resize_size", 64, "--crop_size", 64, "--seed", 0,
         "--batch_size_per_gpu", 4, "--num_workers", 0]


def run(mode, out, *extra) -> dict:
    return vf.visualize_features(parse(vf, mode, *MODEL, "--output_dir", out, *extra))


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return image_folder(tmp_path_factory.mktemp("vf") / "imgs", n_per_class=6, size=72, classes=("a", "b"))


def assert_png(path, min_width: int, min_height: int) -> None:
    with Image.open(path) as image:
        assert image.format == "PNG" and image.width >= min_width and image.height >= min_height, image.size


def test_pca_picture_and_maps(folder, tmp_path):
    result = run("pca", tmp_path, "--data_path", folder, "--num_images", 3)
    assert result["rgb"].shape == (3, 4, 4, 3) and result["foreground"].all()
    assert result["rgb"].min() == 0 and result["rgb"].max() == 1  # min-max per component, over all images
    assert len(set(result["names"])) == 3 and all(Path(n).is_file() for n in result["names"])
    assert_png(result["png"], 6 * 120, 120)  # one row of 3 image-and-map pairs
    # the same images by path give the same maps
    again = run("pca", tmp_path, "--image_paths", *result["names"])
    assert torch.allclose(again["rgb"], result["rgb"], atol=1e-5)
    # background: black, and the rest coloured by a PCA of its own
    masked = run("pca", tmp_path, "--image_paths", *result["names"], "--bg_threshold", 0.5)
    foreground = masked["foreground"]
    assert foreground.shape == (3, 4, 4) and 0 < foreground.sum() < foreground.numel()
    assert (masked["rgb"][~foreground] == 0).all() and masked["rgb"][foreground].max() == 1


def test_pca_first_component_rises_towards_the_object():
    """Feature maps of an object (the 4x4 interior of 6x6 maps) on a background: whatever sign the eigen-solver
    gives, the first component is low on the border; the threshold finds the object exactly."""
    g = torch.Generator().manual_seed(0)
    object_, background = torch.randn(32, generator=g), torch.randn(32, generator=g)
    maps = background + 0.05 * torch.randn(2, 6, 6, 32, generator=g)
    maps[:, 1:5, 1:5] = object_ + 0.05 * torch.randn(2, 4, 4, 32, generator=g)
    for sign in (1, -1):  # the data mirrored: the eigenvector's sign flips, the picture does not
        rgb, foreground = vf.pca_maps(sign * maps)
        assert rgb[:, 1:5, 1:5, 0].min() > rgb[:, 0, :, 0].max()
        rgb, foreground = vf.pca_maps(sign * maps, bg_threshold=0.5)
        assert torch.equal(foreground, vf.border_mask(6, 6).logical_not().expand(2, 6, 6))
        assert (rgb[~foreground] == 0).all()


def test_feature_maps_of_vit_and_resnet():
    images = torch.randn(2, 3, 64, 96)
    vit = backbones.build_eval_model("vit_tiny", 16, "", None, torch.device("cpu"))
    assert backbones.patch_features(vit, images, "vit_tiny")[0].shape == (2, 4, 6, 192)
    resnet = backbones.build_eval_model("resnet18", 16, "", None, torch.device("cpu"))
    maps = backbones.patch_features(resnet, images, "resnet18")[0]
    assert maps.shape == (2, 2, 3, 512)
    # the global feature of a ResNet is the mean of this map
    assert torch.allclose(maps.mean(dim=(1, 2)), resnet(images), atol=1e-5)


def test_neighbors_on_the_fly_find_themselves_first(folder, tmp_path):
    result = run("neighbors", tmp_path, "--data_path", folder, "--num_images", 3, "--k", 4)
    sims, rows, paths = result["similarities"], result["rows"], result["paths"]
    assert sims.shape == rows.shape == (3, 4) and len(paths) == 12
    assert [paths[r] for r in rows[:, 0].tolist()] == result["queries"]  # each query is its own nearest
    assert torch.allclose(sims[:, 0], torch.ones(3), atol=1e-5)
    assert (sims[:, :-1] >= sims[:, 1:]).all()  # most similar first
    assert_png(result["png"], 5 * 120, 3 * 120)  # 3 rows: the query and 4 neighbours


def test_neighbors_from_features_dir(folder, tmp_path):
    ef.extract_features(parse(ef, "--data_path", folder, "--output_dir", tmp_path / "feats", *MODEL))
    features = np.load(tmp_path / "feats" / "features.npy")
    paths = (tmp_path / "feats" / "paths.txt").read_text().splitlines()
    new_image = tmp_path / "new.png"
    noise_image((70, 80), seed=7).save(new_image)
    # the model and transform come from the folder's meta.json: the flags given here are not used
    result = vf.visualize_features(parse(vf, "neighbors", "--features_dir", tmp_path / "feats", "--arch", "vit_small",
                                         "--image_paths", paths[5], new_image, "--k", 3, "--output_dir", tmp_path))
    sims, rows = result["similarities"], result["rows"]
    assert rows[0, 0] == 5 and sims[0, 0] == pytest.approx(1, abs=1e-5)
    # the new image, embedded as the collection was, against every row by hand
    utils.fix_random_seeds(0)
    model = backbones.build_eval_model("vit_tiny", 16, "", None, torch.device("cpu"))
    with torch.no_grad():
        query = model(data.eval_transform(64, 64)(data.pil_loader_rgb(str(new_image))).unsqueeze(0))
    expected = torch.from_numpy(features) @ torch.nn.functional.normalize(query, dim=1)[0]
    top = expected.topk(3)
    assert rows[1].tolist() == top.indices.tolist()
    assert torch.allclose(sims[1], top.values, atol=1e-5)
    assert_png(result["png"], 4 * 120, 2 * 120)


def test_top_k_reads_in_blocks():
    g = torch.Generator().manual_seed(0)
    collection = torch.randn(1000, 16, generator=g)
    queries = torch.randn(5, 16, generator=g)
    sims, rows = vf.top_k(queries, collection.numpy(), k=7, block=64)
    expected = (torch.nn.functional.normalize(queries, dim=1) @ torch.nn.functional.normalize(collection, dim=1).T
                ).topk(7)
    assert torch.equal(rows, expected.indices) and torch.allclose(sims, expected.values, atol=1e-6)


def test_errors(folder, tmp_path):
    with pytest.raises(utils.UserError, match="give the images"):
        run("pca", tmp_path)
    with pytest.raises(utils.UserError, match="--bg_threshold 1.5"):
        run("pca", tmp_path, "--data_path", folder, "--bg_threshold", 1.5)
    with pytest.raises(utils.UserError, match="is not a readable image"):
        (tmp_path / "bad.png").write_bytes(b"no")
        run("pca", tmp_path, "--image_paths", tmp_path / "bad.png")
    with pytest.raises(utils.UserError, match="holds no finished extraction"):
        run("neighbors", tmp_path, "--features_dir", tmp_path)
