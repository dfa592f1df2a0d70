"""data.py: image decoding, datasets, the synthetic dataset, seeded loading (the augmentation itself is
tested in test_augmentation_stats.py, the iBOT masks in test_masking.py).

CPU only, small images, no real data needed: every image is generated in tmp_path.
"""
import collections
import functools
import io
import json
import os
import random

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import noise_image
import augmentations
import synthetic
import data
import utils


def small_aug(n_local=2, global_size=64, local_size=32):
    return augmentations.DataAugmentationDINO((0.4, 1.0), (0.05, 0.4), n_local, global_crops_size=global_size,
                                              local_crops_size=local_size)


# ----------------------------------------------------------------------------------------------------
# pil_loader_rgb
# ----------------------------------------------------------------------------------------------------
def _load(path):
    img = data.pil_loader_rgb(str(path))
    assert isinstance(img, Image.Image) and img.mode == "RGB"
    arr = np.asarray(img)
    assert arr.dtype == np.uint8 and arr.ndim == 3 and arr.shape[2] == 3
    return arr


def test_loader_grayscale_L(tmp_path):
    arr = np.array([[0, 50], [200, 255]], dtype=np.uint8)
    Image.fromarray(arr, mode="L").save(tmp_path / "g.png")
    out = _load(tmp_path / "g.png")
    for ch in range(3):
        np.testing.assert_array_equal(out[..., ch], arr)


def test_loader_rgb_jpeg(tmp_path):
    Image.new("RGB", (16, 16), (200, 30, 60)).save(tmp_path / "c.jpg", quality=95)
    out = _load(tmp_path / "c.jpg")
    assert np.abs(out.astype(int) - [200, 30, 60]).max() <= 6


def _palette_image(transparency):
    img = Image.new("P", (2, 1))
    img.putpalette([255, 0, 0, 0, 0, 255] + [0] * (256 * 3 - 6))  # 0: red, 1: blue
    img.putpixel((0, 0), 0)
    img.putpixel((1, 0), 1)
    if transparency:
        img.info["transparency"] = 0
    return img


def test_loader_palette_without_transparency(tmp_path):
    _palette_image(False).save(tmp_path / "p.png")
    assert Image.open(tmp_path / "p.png").mode == "P"
    out = _load(tmp_path / "p.png")
    assert out[0, 0].tolist() == [255, 0, 0] and out[0, 1].tolist() == [0, 0, 255]


def test_loader_palette_with_transparency(tmp_path):
    img = _palette_image(True)
    img.save(tmp_path / "pt.png", transparency=0)
    reopened = Image.open(tmp_path / "pt.png")
    assert reopened.mode == "P" and "transparency" in reopened.info
    out = _load(tmp_path / "pt.png")
    assert out[0, 0].tolist() == [255, 255, 255]  # transparent red -> composited on white
    assert out[0, 1].tolist() == [0, 0, 255]


def test_loader_rgba(tmp_path):
    arr = np.zeros((1, 3, 4), dtype=np.uint8)
    arr[0, 0] = (0, 0, 0, 0)  # fully transparent black -> white
    arr[0, 1] = (10, 200, 30, 255)  # opaque -> unchanged
    arr[0, 2] = (0, 0, 0, 128)  # half-transparent black -> mid grey
    Image.fromarray(arr, mode="RGBA").save(tmp_path / "a.png")
    out = _load(tmp_path / "a.png")
    assert out[0, 0].tolist() == [255, 255, 255]
    assert out[0, 1].tolist() == [10, 200, 30]
    assert np.all(np.abs(out[0, 2].astype(int) - 127) <= 2)


def test_loader_LA(tmp_path):
    arr = np.array([[[0, 0], [100, 255]]], dtype=np.uint8)
    Image.fromarray(arr, mode="LA").save(tmp_path / "la.png")
    assert Image.open(tmp_path / "la.png").mode == "LA"
    out = _load(tmp_path / "la.png")
    assert out[0, 0].tolist() == [255, 255, 255] and out[0, 1].tolist() == [100, 100, 100]


def test_loader_cmyk_jpeg(tmp_path):
    Image.new("CMYK", (16, 16), (0, 255, 255, 0)).save(tmp_path / "cmyk.jpg", quality=95)  # red
    assert Image.open(tmp_path / "cmyk.jpg").mode == "CMYK"
    out = _load(tmp_path / "cmyk.jpg")
    r, g, b = out[8, 8].astype(int)
    assert r >= 230 and g <= 30 and b <= 30, out[8, 8]


def test_loader_16bit_png(tmp_path):
    arr = np.array([[0, 1000, 40000, 65535]], dtype=np.uint16)
    Image.fromarray(arr).save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode.startswith("I")  # I;16 on current Pillow
    out = _load(tmp_path / "g16.png")
    expected = np.round(arr / 257.0).astype(int)  # [0, 4, 156, 255]: full range mapped, not clipped
    assert np.abs(out[0, :, 0].astype(int) - expected).max() <= 1, (out[0, :, 0], expected)
    assert np.all(out[..., 0] == out[..., 1]) and np.all(out[..., 1] == out[..., 2])


def test_loader_16bit_png_dark_image_stays_dark(tmp_path):
    arr = np.full((2, 2), 200, dtype=np.uint16)  # a very dark 16-bit image, not an 8-bit one
    Image.fromarray(arr).save(tmp_path / "dark16.png")
    assert _load(tmp_path / "dark16.png").max() <= 1


def test_loader_32bit_I_tiff(tmp_path):
    arr16 = np.array([[0, 40000], [65535, 1000]], dtype=np.int32)  # 16-bit data in 32-bit ints
    Image.fromarray(arr16, mode="I").save(tmp_path / "i32.tif")
    assert Image.open(tmp_path / "i32.tif").mode == "I"
    out = _load(tmp_path / "i32.tif")
    np.testing.assert_allclose(out[..., 0], np.round(arr16 / 257.0), atol=1)
    arr8 = np.array([[0, 100], [200, 255]], dtype=np.int32)  # 8-bit data in 32-bit ints: kept as is
    Image.fromarray(arr8, mode="I").save(tmp_path / "i8.tif")
    np.testing.assert_array_equal(_load(tmp_path / "i8.tif")[..., 1], arr8)


def test_loader_float_F_tiff(tmp_path):
    arr = np.linspace(0, 1, 16, dtype=np.float32).reshape(4, 4)
    Image.fromarray(arr, mode="F").save(tmp_path / "f.tif")
    assert Image.open(tmp_path / "f.tif").mode == "F"
    out = _load(tmp_path / "f.tif")[..., 0].astype(int)
    assert out[0, 0] <= 1 and out[-1, -1] >= 254
    assert np.all(np.diff(out.ravel()) > 0)  # monotone ramp
    np.testing.assert_allclose(out.ravel(), arr.ravel() * 255, atol=1.01)


def _jpeg_bytes(size=64):
    buf = io.BytesIO()
    noise_image((size, size)).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


@pytest.mark.parametrize("kind", ["truncated_jpeg", "truncated_png", "empty", "text"])
def test_loader_rejects_broken_files(tmp_path, kind):
    if kind == "truncated_jpeg":
        path, b = tmp_path / "t.jpg", _jpeg_bytes()
        path.write_bytes(b[: len(b) // 2])
    elif kind == "truncated_png":
        buf = io.BytesIO()
        noise_image((64, 64)).save(buf, format="PNG")
        path, b = tmp_path / "t.png", buf.getvalue()
        path.write_bytes(b[: len(b) // 2])
    elif kind == "empty":
        path = tmp_path / "empty.jpg"
        path.write_bytes(b"")
    else:
        path = tmp_path / "notes.jpg"
        path.write_text("this is not an image\n")
    with pytest.raises(Exception):
        data.pil_loader_rgb(str(path))


def test_loader_accepts_the_full_jpeg(tmp_path):
    """Counterpart of the truncated case: the same bytes, complete, do load."""
    (tmp_path / "full.jpg").write_bytes(_jpeg_bytes())
    assert _load(tmp_path / "full.jpg").shape == (64, 64, 3)


# ----------------------------------------------------------------------------------------------------
# build_dataset
# ----------------------------------------------------------------------------------------------------
def make_class_folder(root, cls, n, size=8, start=0):
    folder = os.path.join(str(root), cls)
    os.makedirs(folder, exist_ok=True)
    for i in range(start, start + n):
        Image.new("RGB", (size, size), ((i * 37) % 256, 0, 0)).save(os.path.join(folder, f"{cls}_{i}.png"))


def _check_consistent(ds):
    assert ds.classes == sorted(ds.classes)
    assert ds.class_to_idx == {c: i for i, c in enumerate(ds.classes)}
    for path, target in ds.samples:
        assert os.path.basename(os.path.dirname(path)) == ds.classes[target], (path, target)
    assert ds.targets == [t for _, t in ds.samples]


def test_build_dataset_single_root(tmp_path):
    make_class_folder(tmp_path / "train", "dog", 2)
    make_class_folder(tmp_path / "train", "cat", 3)
    (tmp_path / "train" / ".hidden").mkdir()  # hidden folders are not classes
    ds = data.build_dataset(str(tmp_path / "train"))
    assert ds.classes == ["cat", "dog"]
    assert len(ds) == 5
    _check_consistent(ds)
    img, target = ds[0]
    assert isinstance(img, Image.Image) and img.mode == "RGB" and target == 0


@pytest.mark.parametrize("how", ["comma", "glob"])
def test_build_dataset_multi_root_disjoint_and_overlapping(tmp_path, how):
    # ImageNet-100 style: train.X1 and train.X2, with one class present in both.
    make_class_folder(tmp_path / "train.X1", "n02", 2)
    make_class_folder(tmp_path / "train.X1", "n01", 1)
    make_class_folder(tmp_path / "train.X2", "n03", 2)
    make_class_folder(tmp_path / "train.X2", "n01", 2, start=10)
    (tmp_path / "train.X1.txt").write_text("not a root")  # a file the glob below does not match
    if how == "comma":
        path = f"{tmp_path / 'train.X2'}, {tmp_path / 'train.X1'}"  # order and spaces do not matter
    else:
        path = str(tmp_path / "train.X[0-9]")
    ds = data.build_dataset(path)
    assert ds.classes == ["n01", "n02", "n03"]
    assert len(ds) == 7
    _check_consistent(ds)
    counts = collections.Counter(ds.targets)
    assert counts == {0: 3, 1: 2, 2: 2}
    # every file of both roots is there exactly once
    expected = sorted(str(p) for p in tmp_path.glob("train.X?/*/*.png"))
    assert sorted(p for p, _ in ds.samples) == expected


def test_build_dataset_nonexistent_path(tmp_path):
    missing = str(tmp_path / "does_not_exist")
    with pytest.raises(utils.UserError, match="does_not_exist"):
        data.build_dataset(missing)
    make_class_folder(tmp_path / "ok", "a", 1)
    with pytest.raises(utils.UserError, match="does_not_exist"):  # one bad root in a list
        data.build_dataset(f"{tmp_path / 'ok'},{missing}")
    with pytest.raises(utils.UserError, match="nomatch"):
        data.build_dataset(str(tmp_path / "nomatch*"))


def test_build_dataset_no_class_folders(tmp_path):
    root = tmp_path / "flat"
    root.mkdir()
    Image.new("RGB", (8, 8)).save(root / "img.png")  # images directly in the root: no classes
    with pytest.raises(utils.UserError) as e:
        data.build_dataset(str(root), layout="imagefolder")
    assert str(root) in str(e.value)
    assert not data.has_labels(data.build_dataset(str(root)))  # detected: an unlabeled folder


def test_build_dataset_empty_class_folder(tmp_path):
    root = tmp_path / "train"
    make_class_folder(root, "full", 2)
    (root / "empty_cls").mkdir()
    (root / "empty_cls" / "readme.txt").write_text("no images here")
    with pytest.raises(utils.UserError) as e:
        data.build_dataset(str(root), layout="imagefolder")
    assert str(root) in str(e.value) and "empty_cls" in str(e.value)


def test_build_dataset_empty_class_folder_multi_root_names_the_root(tmp_path):
    make_class_folder(tmp_path / "train.X1", "n01", 2)
    make_class_folder(tmp_path / "train.X2", "n02", 2)
    (tmp_path / "train.X2" / "n01").mkdir()  # empty in the second root only
    with pytest.raises(utils.UserError) as e:
        data.build_dataset(str(tmp_path / "train.X*"), layout="imagefolder")
    assert "n01" in str(e.value)
    assert os.path.join(str(tmp_path / "train.X2"), "n01") in str(e.value)


# ----------------------------------------------------------------------------------------------------
# make_synthetic_dataset
# ----------------------------------------------------------------------------------------------------
SMALL = dict(num_train_per_class=3, num_val_per_class=2, image_size=32)


def _tree(root):
    """{relative path: bytes} of every file under root."""
    out = {}
    for dirpath, _, files in os.walk(root):
        for f in files:
            p = os.path.join(dirpath, f)
            with open(p, "rb") as fh:
                out[os.path.relpath(p, root)] = fh.read()
    return out


def test_synthetic_layout_and_images(tmp_path):
    root = synthetic.make_synthetic_dataset(str(tmp_path), seed=0, **SMALL)
    assert os.path.dirname(root) == str(tmp_path)
    for split, n in (("train", 3), ("val", 2)):
        classes = sorted(os.listdir(os.path.join(root, split)))
        assert classes == sorted(synthetic.SYNTHETIC_CLASSES) and len(classes) == 10
        for cls in classes:
            files = sorted(os.listdir(os.path.join(root, split, cls)))
            assert len(files) == n and all(f.endswith(".png") for f in files)
    with open(os.path.join(root, "dataset.json")) as f:
        meta = json.load(f)
    assert meta["train_per_class"] == 3 and meta["val_per_class"] == 2 and meta["image_size"] == 32
    img = data.pil_loader_rgb(os.path.join(root, "train", "circle", sorted(os.listdir(
        os.path.join(root, "train", "circle")))[0]))
    assert img.size == (32, 32) and np.asarray(img).std() > 5  # not a blank image
    assert sorted(os.listdir(tmp_path)) == [os.path.basename(root)]  # no temporary folder left behind


def test_synthetic_deterministic_and_seed_dependent(tmp_path):
    a = _tree(synthetic.make_synthetic_dataset(str(tmp_path / "a"), seed=0, **SMALL))
    b = _tree(synthetic.make_synthetic_dataset(str(tmp_path / "b"), seed=0, **SMALL))
    c = _tree(synthetic.make_synthetic_dataset(str(tmp_path / "c"), seed=1, **SMALL))
    assert len(a) == 10 * 5 + 1
    assert a == b  # same seed: same bytes
    images = [k for k in a if k.endswith(".png")]
    assert set(images) <= set(c)
    assert all(a[k] != c[k] for k in images)  # another seed: every image differs
    # train and val are different images
    assert a[os.path.join("train", "star", "star_00000.png")] != a[os.path.join("val", "star", "star_00000.png")]


def test_synthetic_reused_from_cache(tmp_path, monkeypatch):
    root = synthetic.make_synthetic_dataset(str(tmp_path), seed=0, **SMALL)
    files = [os.path.join(d, f) for d, _, fs in os.walk(root) for f in fs]
    before = {p: os.stat(p).st_mtime_ns for p in files}
    old = 1_000_000_000  # push mtimes into the past: a rewrite would change them, whatever the fs resolution
    for p in files:
        os.utime(p, ns=(old, old))
    generated = []
    real_synthetic_image = synthetic.synthetic_image
    monkeypatch.setattr(synthetic, "synthetic_image", lambda *a, **k: generated.append(a) or real_synthetic_image(*a, **k))
    assert synthetic.make_synthetic_dataset(str(tmp_path), seed=0, **SMALL) == root
    assert generated == []  # nothing generated again
    assert {p: os.stat(p).st_mtime_ns for p in files} == {p: old for p in before}
    assert sorted(os.listdir(tmp_path)) == [os.path.basename(root)]
    # other parameters: another dataset beside it
    other = synthetic.make_synthetic_dataset(str(tmp_path), seed=0, num_train_per_class=2, num_val_per_class=1,
                                        image_size=32)
    assert other != root and os.path.isfile(os.path.join(other, "dataset.json"))


def test_synthetic_concurrent_writer_lost_the_race(tmp_path, monkeypatch):
    """Two processes generating at once: the one whose rename fails keeps the other's dataset and cleans up."""
    root = synthetic.make_synthetic_dataset(str(tmp_path), seed=0, **SMALL)
    before = _tree(root)
    real_isfile, calls = os.path.isfile, []

    def isfile_once_false(p):
        calls.append(p)
        if len(calls) == 1:  # the first marker check: "not there yet"
            return False
        return real_isfile(p)

    monkeypatch.setattr(synthetic.os.path, "isfile", isfile_once_false)
    assert synthetic.make_synthetic_dataset(str(tmp_path), seed=0, **SMALL) == root
    monkeypatch.undo()
    assert _tree(root) == before
    assert sorted(os.listdir(tmp_path)) == [os.path.basename(root)]


def test_build_dataset_synthetic(tmp_path, monkeypatch):
    monkeypatch.setattr(synthetic, "make_synthetic_dataset", functools.partial(synthetic.make_synthetic_dataset, **SMALL))
    train = data.build_dataset(f"synthetic:{tmp_path / 'cache'}")
    val = data.build_dataset(f"synthetic:{tmp_path / 'cache'}", split="val")
    assert train.classes == sorted(synthetic.SYNTHETIC_CLASSES) == val.classes
    assert len(train) == 30 and len(val) == 20
    _check_consistent(train)
    assert all(p.startswith(str(tmp_path / "cache")) for p, _ in train.samples)
    # plain "synthetic" uses DINO_SYNTHETIC_ROOT
    monkeypatch.setenv("DINO_SYNTHETIC_ROOT", str(tmp_path / "envcache"))
    ds = data.build_dataset("synthetic")
    assert len(ds) == 30 and all(p.startswith(str(tmp_path / "envcache")) for p, _ in ds.samples)


def test_build_dataset_on_synthetic_root(tmp_path):
    root = synthetic.make_synthetic_dataset(str(tmp_path), seed=3, **SMALL)
    ds = data.build_dataset(os.path.join(root, "train"))
    assert len(ds) == 30 and len(ds.classes) == 10
    _check_consistent(ds)


# ----------------------------------------------------------------------------------------------------
# PretrainDataset, EpochSampler, build_loader, BadImageTracker
# ----------------------------------------------------------------------------------------------------


def tiny_aug():
    return small_aug(2, 16, 8)


def collect(loader, epoch):
    """{index: crops of that sample} from a loader, using its sampler's order."""
    loader.sampler.set_epoch(epoch)
    order = list(loader.sampler)
    assert all(e == epoch for e, _ in order)
    out, pos = {}, 0
    for crops, targets, bad in loader:
        assert len(crops) == 4 and all(c.shape[0] == len(targets) for c in crops)
        assert list(bad) == [""] * len(targets)
        for j in range(len(targets)):
            idx = order[pos][1]
            sample = tuple(c[j].clone() for c in crops)
            if idx in out:  # padding repeats an index: same crops
                assert all(torch.equal(x, y) for x, y in zip(out[idx], sample))
            out[idx] = sample
            pos += 1
    assert pos == len(order)
    return out


def same(a, b):
    return all(torch.equal(x, y) for x, y in zip(a, b))


def test_crops_independent_of_workers_batches_and_ranks(tiny_folder):
    ds = data.PretrainDataset(data.build_dataset(str(tiny_folder)), tiny_aug(), seed=7)
    n = len(ds)
    ref = {i: tuple(ds[(2, i)][0]) for i in range(n)}
    assert ds[(2, 3)][1] == ds.samples[3][1]

    variants = {
        "w0_b4": collect(data.build_loader(ds, 4, 0, seed=7, drop_last=False), 2),
        "w2_b3": collect(data.build_loader(ds, 3, 2, seed=7, drop_last=False), 2),
        "w0_noshuffle": collect(data.build_loader(ds, 5, 0, seed=7, drop_last=False, shuffle=False), 2),
        "other_sampler_seed": collect(data.build_loader(ds, 4, 0, seed=99, drop_last=False), 2),
    }
    ranks = {}
    for rank in range(2):
        ranks.update(collect(data.build_loader(ds, 2, 1 if rank else 0, seed=7, rank=rank, world_size=2,
                                               drop_last=False), 2))
    variants["2_ranks"] = ranks
    for name, got in variants.items():
        assert sorted(got) == list(range(n)), name
        for i in range(n):
            assert same(got[i], ref[i]), (name, i)
    # the loader really shuffles (so the comparison above is not in a trivial order)
    loader = data.build_loader(ds, 4, 0, seed=7)
    loader.sampler.set_epoch(2)
    assert [i for _, i in loader.sampler] != list(range(n))


def test_crops_depend_on_epoch_and_seed(tiny_folder):
    base = data.build_dataset(str(tiny_folder))
    ds = data.PretrainDataset(base, tiny_aug(), seed=0)
    ds_other = data.PretrainDataset(base, tiny_aug(), seed=1)
    for i in range(len(ds)):
        a, b = ds[(0, i)][0], ds[(0, i)][0]
        assert same(a, b)  # deterministic
        assert not same(a, ds[(1, i)][0])  # another epoch
        assert not same(a, ds_other[(0, i)][0])  # another seed
        assert not same(a, ds[(0, (i + 1) % len(ds))][0])
    assert same(ds[3][0], ds[(0, 3)][0])  # a plain index means epoch 0


def test_loading_leaves_main_process_rng_untouched(tiny_folder):
    ds = data.PretrainDataset(data.build_dataset(str(tiny_folder)), tiny_aug(), seed=0)
    loader = data.build_loader(ds, 4, 0, seed=0, drop_last=False)
    random.seed(42)
    torch.manual_seed(42)
    np.random.seed(42)
    torch_state, py_state, np_state = torch.get_rng_state(), random.getstate(), np.random.get_state()
    for epoch in range(2):
        loader.sampler.set_epoch(epoch)
        n = sum(len(t) for _, t, _ in loader)
        assert n == len(ds)
    _ = ds[(5, 1)]
    assert torch.equal(torch.get_rng_state(), torch_state)
    assert random.getstate() == py_state
    np_after = np.random.get_state()
    assert np_after[0] == np_state[0] and np.array_equal(np_after[1], np_state[1]) and np_after[2:] == np_state[2:]


def test_loading_does_not_depend_on_main_process_rng(tiny_folder):
    ds = data.PretrainDataset(data.build_dataset(str(tiny_folder)), tiny_aug(), seed=0)
    torch.manual_seed(1)
    random.seed(1)
    a = collect(data.build_loader(ds, 4, 0, seed=0, drop_last=False), 0)
    torch.manual_seed(2)
    random.seed(2)
    torch.rand(10)
    b = collect(data.build_loader(ds, 4, 0, seed=0, drop_last=False), 0)
    assert all(same(a[i], b[i]) for i in a)


def test_unreadable_image_is_replaced_and_reported(tiny_folder):
    bad_path = tiny_folder / "a" / "zz_broken.jpg"
    bad_path.write_text("not an image")
    base = data.build_dataset(str(tiny_folder))
    bad_index = [p for p, _ in base.samples].index(str(bad_path))
    ds = data.PretrainDataset(base, tiny_aug(), seed=0)
    crops, target, report = ds[(0, bad_index)]
    assert len(crops) == 4 and crops[0].shape == (3, 16, 16)
    assert report.startswith(f"{bad_path}: ") and len(report.splitlines()) == 1
    assert "UnidentifiedImageError" in report
    # deterministic replacement: same crops again, and they are those of a real sample
    crops2, target2, report2 = ds[(0, bad_index)]
    assert same(crops, crops2) and target == target2 and report == report2
    assert target in (0, 1)
    # good samples report nothing
    assert ds[(0, (bad_index + 1) % len(ds))][2] == ""
    # through the loader: the third field carries the report of exactly that sample
    loader = data.build_loader(ds, 4, 0, seed=0, drop_last=False, shuffle=False)
    reports = [r for _, _, batch in loader for r in batch]
    assert len(reports) == len(ds)
    assert reports[bad_index] == report and sum(bool(r) for r in reports) == 1


def test_all_images_unreadable_raises(tmp_path):
    root = tmp_path / "bad"
    (root / "c").mkdir(parents=True)
    for i in range(3):
        (root / "c" / f"{i}.jpg").write_bytes(b"")
    ds = data.PretrainDataset(data.build_dataset(str(root)), tiny_aug(), seed=0, max_attempts=5)
    with pytest.raises(RuntimeError, match="5 unreadable images"):
        ds[(0, 0)]


def test_bad_image_tracker(capsys):
    tracker = data.BadImageTracker(dataset_size=10, max_fraction=0.25)  # at most 2.5 bad images
    tracker.update(["/d/x.jpg: OSError: truncated", "", "/d/x.jpg: OSError: truncated"])
    tracker.update(["/d/x.jpg: OSError: truncated\n/d/y.png: UnidentifiedImageError: cannot identify"])
    assert tracker.count == 2
    out = capsys.readouterr().out
    assert out.count("/d/x.jpg") == 1 and out.count("/d/y.png") == 1
    assert "truncated" in out
    tracker.agree([""])  # the training loop's call: within the limit, nothing happens
    assert tracker.count == 2
    with pytest.raises(utils.UserError, match=r"3 unreadable images out of 10"):
        tracker.agree(["/d/z.jpg: OSError: broken"])


def test_multiline_error_counts_as_one_bad_image(tmp_path):
    class Base:
        samples = [(str(tmp_path / f"{i}.jpg"), 0) for i in range(4)]

        @staticmethod
        def loader(path):
            if path.endswith("0.jpg"):
                raise ValueError("bad header\nsee the decoder log for details")
            return noise_image((24, 24))

    ds = data.PretrainDataset(Base(), tiny_aug(), seed=0)
    _, _, report = ds[(0, 0)]
    assert report
    tracker = data.BadImageTracker(dataset_size=4, max_fraction=1.0)
    tracker.update([report])
    assert tracker.count == 1 and list(tracker.seen) == [Base.samples[0][0]]


def test_epoch_sampler_two_replicas():
    class Sized:
        def __len__(self):
            return 11

    samplers = [data.EpochSampler(Sized(), num_replicas=2, rank=r, shuffle=True, seed=0) for r in range(2)]
    for s in samplers:
        s.set_epoch(3)
    parts = [list(s) for s in samplers]
    for part in parts:
        assert len(part) == 6
        assert all(isinstance(x, tuple) and len(x) == 2 and x[0] == 3 for x in part)
    idx = [[i for _, i in part] for part in parts]
    assert set(idx[0]) | set(idx[1]) == set(range(11))
    assert len(idx[0]) + len(idx[1]) - len(set(idx[0]) | set(idx[1])) == 1  # one padding sample
    # another epoch: another order, same coverage; same epoch again: same order
    for s in samplers:
        s.set_epoch(4)
    idx4 = [[i for _, i in s] for s in samplers]
    assert idx4 != idx and set(idx4[0]) | set(idx4[1]) == set(range(11))
    samplers[0].set_epoch(3)
    assert [i for _, i in samplers[0]] == idx[0]
    # without shuffling: strided split
    plain = [data.EpochSampler(Sized(), num_replicas=2, rank=r, shuffle=False) for r in range(2)]
    assert [i for _, i in plain[0]] == [0, 2, 4, 6, 8, 10]
    assert [i for _, i in plain[1]] == [1, 3, 5, 7, 9, 0]
