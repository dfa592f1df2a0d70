"""Packed image collections (data.pack_image_folders, data.PackedImages, benchmarks/pack_cifar10.py): one file holds
the images' exact bytes, reads as an ImageFolder, and `--data_path x.npz` works in training and evaluation."""
import json
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import DATA_ROOT, REPO_ROOT, noise_image, run_cmd
import data
import utils

PY = sys.executable


def tiny_splits(root, per_class=3):
    """train/ and test/ with 2 classes: JPEGs of one size (a shared header), a PNG, a grayscale JPEG, a
    palette PNG."""
    for split, seed in (("train", 0), ("test", 100)):
        for c, cls in enumerate(("cat", "dog")):
            folder = root / split / cls
            folder.mkdir(parents=True)
            for i in range(per_class):
                noise_image((32, 32), seed=seed + 10 * c + i).save(folder / f"{i}.jpg", quality=90)
            noise_image((20, 24), seed=seed + 50 + c).save(folder / "extra.png")
    noise_image((32, 32), seed=7).convert("L").save(root / "train" / "cat" / "gray.jpg")
    noise_image((16, 16), seed=8).convert("P").save(root / "test" / "dog" / "palette.png")
    return root


@pytest.fixture
def packed(tmp_path):
    root = tiny_splits(tmp_path / "folders")
    path = tmp_path / "tiny.npz"
    counts = data.pack_image_folders({"train": str(root / "train"), "test": str(root / "test")}, str(path))
    return root, path, counts


def test_packed_items_are_the_folders_images_exactly(packed):
    root, path, counts = packed
    assert counts == {"train": 9, "test": 9}
    for split in ("train", "test"):
        folder = data.build_dataset(str(root / split))
        pack = data.PackedImages(str(path), split)
        assert len(pack) == len(folder) and pack.classes == folder.classes == ["cat", "dog"]
        assert pack.targets == [t for _, t in folder.samples] and pack.class_to_idx == folder.class_to_idx
        for i, (file, label) in enumerate(folder.samples):
            with open(file, "rb") as f:
                assert pack.image_bytes(i) == f.read()
            image, target = pack[i]
            assert isinstance(image, Image.Image) and image.mode == "RGB" and target == label
            assert np.array_equal(np.asarray(image), np.asarray(data.pil_loader_rgb(file)))
            name = pack.samples[i][0]
            assert name == f"{path}:{split}/{file[len(str(root / split)) + 1:]}"


def test_packed_file_shares_jpeg_headers(tmp_path):
    root = tmp_path / "f"
    (root / "train" / "a").mkdir(parents=True)
    for i in range(20):
        noise_image((32, 32), seed=i).save(root / "train" / "a" / f"{i}.jpg", quality=90)
    files = sum((root / "train" / "a" / f"{i}.jpg").stat().st_size for i in range(20))
    data.pack_image_folders({"train": str(root / "train")}, str(tmp_path / "p.npz"))
    with np.load(tmp_path / "p.npz") as z:
        assert len(z["header_offsets"]) == 3  # the empty header and one JPEG header for all 20 files
        header = int(z["header_offsets"][-1])
        assert z["train_data"].nbytes == files - 20 * header


def test_build_dataset_and_labeled_splits_accept_a_packed_file(packed):
    _, path, _ = packed
    train = data.build_dataset(str(path))
    assert isinstance(train, data.PackedImages) and train.split == "train" and len(train) == 9
    train_set, val_set = data.labeled_splits(str(path), 32, 32)
    assert val_set.base.split == "test"  # no val split: the test split is the evaluation's val
    x, label, error = val_set[0]
    assert x.shape == (3, 32, 32) and error == "" and label == val_set.targets[0]
    assert train_set.classes == val_set.classes == ["cat", "dog"]


def test_pretraining_loader_over_a_packed_file(packed):
    _, path, _ = packed
    import augmentations
    transform = augmentations.DataAugmentationDINO((0.4, 1.), (0.05, 0.4), 2, 32, 16)
    dataset = data.PretrainDataset(data.build_dataset(str(path)), transform, seed=0)
    loader = data.build_loader(dataset, batch_size=4, num_workers=1, seed=0)
    loader.sampler.set_epoch(0)
    crops, labels, bad = next(iter(loader))
    assert [tuple(c.shape) for c in crops] == [(4, 3, 32, 32)] * 2 + [(4, 3, 16, 16)] * 2
    assert list(bad) == [""] * 4
    first = dataset[(0, 3)]
    assert all(torch.equal(a, b) for a, b in zip(first[0], dataset[(0, 3)][0]))  # seeded per sample


def test_packed_file_errors(packed, tmp_path):
    _, path, _ = packed
    with pytest.raises(utils.UserError, match="has no split 'val2'"):
        data.PackedImages(str(path), "val2")
    with pytest.raises(utils.UserError, match="no such packed file"):
        data.build_dataset(str(tmp_path / "missing.npz"))
    np.savez(tmp_path / "other.npz", x=np.zeros(3))
    with pytest.raises(utils.UserError, match="not a packed image file"):
        data.build_dataset(str(tmp_path / "other.npz"))
    (tmp_path / "broken.npz").write_bytes(b"not a zip")
    with pytest.raises(utils.UserError, match="not a readable packed file"):
        data.build_dataset(str(tmp_path / "broken.npz"))


def test_scripts_train_and_evaluate_on_a_packed_file(packed, tmp_path):
    _, path, _ = packed
    out = tmp_path / "run"
    run_cmd([PY, REPO_ROOT / "main_dino.py", "--data_path", path, "--arch", "vit_nano", "--patch_size", "16",
             "--global_crops_size", "32", "--local_crops_size", "16", "--local_crops_number", "1", "--out_dim", "32",
             "--batch_size_per_gpu", "4", "--epochs", "1", "--warmup_epochs", "0", "--num_workers", "0",
             "--knn_data_path", path, "--knn_resize_size", "32", "--knn_crop_size", "32", "--output_dir", out],
            timeout=600)
    record = json.loads((out / "log.txt").read_text().splitlines()[0])
    assert record["train_loss"] == record["train_loss"] and 0 <= record["knn_top1"] <= 100
    proc = run_cmd([PY, REPO_ROOT / "eval_knn.py", "--arch", "vit_nano", "--patch_size", "16",
                    "--pretrained_weights", out / "checkpoint.pth", "--data_path", path, "--resize_size", "32",
                    "--crop_size", "32", "--nb_knn", "3", "--num_workers", "0"], timeout=600)
    assert "Data loaded with 9 train and 9 val imgs" in proc.stdout
    assert "3-NN classifier result" in proc.stdout


def test_pack_cifar10_script_on_a_few_real_images(tmp_path):
    root = DATA_ROOT / "cifar10"
    if not (root / "train").is_dir() or not (root / "test").is_dir():
        pytest.skip(f"CIFAR-10 image folders not found at {root} (../shared/data, or set DINO_DATA_ROOT)")
    out = tmp_path / "c10.npz"
    proc = run_cmd([PY, REPO_ROOT / "benchmarks" / "pack_cifar10.py", "--root", root, "--out", out,
                    "--per_class", "3"], timeout=300)
    assert "Packed 30 train, 30 test images" in proc.stdout
    train = data.PackedImages(str(out))
    assert len(train) == 30 and len(train.classes) == 10 and sorted(set(train.targets)) == list(range(10))
    for i, (name, label) in enumerate(train.samples):
        relative = name.split(":train/", 1)[1]  # class/file.jpg
        assert train.classes[label] == relative.split("/")[0]
        with open(root / "train" / relative, "rb") as f:
            assert train.image_bytes(i) == f.read()
    assert data.PackedImages(str(out), "val").split == "test"


def test_pack_cifar10_script_needs_its_folders(tmp_path):
    proc = run_cmd([PY, REPO_ROOT / "benchmarks" / "pack_cifar10.py", "--root", tmp_path, "--out",
                    tmp_path / "x.npz"], check=False, timeout=120)
    assert proc.returncode == 2 and "has no train, test folder" in proc.stderr


@pytest.mark.slow
def test_whole_cifar10_packs_into_at_most_40_mib(tmp_path):
    root = DATA_ROOT / "cifar10"
    if not (root / "train").is_dir():
        pytest.skip(f"CIFAR-10 image folders not found at {root}")
    out = tmp_path / "cifar10.npz"
    run_cmd([PY, REPO_ROOT / "benchmarks" / "pack_cifar10.py", "--root", root, "--out", out], timeout=900)
    assert out.stat().st_size <= 40 * 2**20
    assert len(data.PackedImages(str(out))) == 50000 and len(data.PackedImages(str(out), "val")) == 10000
