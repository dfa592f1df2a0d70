"""layouts.py and data.build_dataset on any image collection: ImageFolder trees, unlabeled folders at any depth,
list files and mixes of them; detection and forced layouts; hidden, non-image and oddly cased files; symbolic
link loops; the cached walk (hit without listing, invalidated by a change).

CPU only and fast: most "images" are a few bytes with an image extension (only the walk reads them); the tests
that decode one write real PNGs.
"""
import os
import pickle
import time

import pytest
from PIL import Image

from conftest import image_folder, noise_image
import data
import layouts
import utils


def touch(path, content=b"x"):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)
    return path


def age(root):
    """Every folder under `root` last changed an hour ago: the cache does not trust folders changed in the
    seconds before their listing (layouts.RACY_NS), which every folder a test just made is."""
    t = time.time_ns() - 3600 * 10 ** 9
    for folder, _, _ in os.walk(root):
        os.utime(folder, ns=(t, t))


def paths(ds):
    return [p for p, _ in ds.samples]


def torchvision_samples(roots):
    """The samples of the former data.MultiRootImageFolder: torchvision's make_dataset, root after root, with
    class indices from the sorted union of the roots' class folders."""
    from torchvision.datasets.folder import IMG_EXTENSIONS, make_dataset
    classes = sorted({e.name for r in roots for e in os.scandir(r) if e.is_dir() and not e.name.startswith(".")})
    samples = []
    for r in roots:
        present = {c: i for i, c in enumerate(classes) if os.path.isdir(os.path.join(r, c))}
        samples += make_dataset(r, present, IMG_EXTENSIONS)
    return classes, samples


# ----------------------------------------------------------------------------------------------------
# Detection and reading, one layout at a time
# ----------------------------------------------------------------------------------------------------
def test_imagefolder_detected_and_identical_to_torchvision(tmp_path, capsys):
    root = image_folder(tmp_path / "train", n_per_class=3, size=8, classes=("dog", "cat", "bird"))
    touch(root / "cat" / "deeper" / "z" / "a.JPG")  # images below a class folder belong to it
    touch(root / "cat" / "deeper" / "b.png")
    touch(root / "cat" / "deeper-x" / "c.jpeg")  # '-' sorts before '/': torchvision's folder order, not file order
    touch(root / "dog" / "notes.txt")
    touch(root / "README.md")
    ds = data.build_dataset(str(root))
    classes, samples = torchvision_samples([str(root)])
    assert ds.classes == classes == ["bird", "cat", "dog"]
    assert ds.samples == samples and ds.targets == [t for _, t in samples]
    assert ds.class_to_idx == {"bird": 0, "cat": 1, "dog": 2} and layouts.has_labels(ds) and ds.layout == "imagefolder"
    image, target = ds[0]
    assert isinstance(image, Image.Image) and image.mode == "RGB" and target == 0
    out = capsys.readouterr().out
    assert f"Data: ImageFolder: 3 classes, 12 images ({root}; listed in " in out


def test_multi_root_imagefolder_identical_to_torchvision(tmp_path):
    image_folder(tmp_path / "train.X1", n_per_class=2, size=8, classes=("n02", "n01"))
    image_folder(tmp_path / "train.X2", n_per_class=3, size=8, classes=("n03", "n01"))
    roots = [str(tmp_path / "train.X2"), str(tmp_path / "train.X1")]
    ds = data.build_dataset(", ".join(roots))
    classes, samples = torchvision_samples(roots)
    assert ds.classes == classes == ["n01", "n02", "n03"] and ds.samples == samples
    glob_ds = data.build_dataset(str(tmp_path / "train.X*"))
    assert glob_ds.samples == torchvision_samples(sorted(roots))[1]


def test_unlabeled_flat_folder(tmp_path, capsys):
    root = tmp_path / "photos"
    for i in (2, 0, 1):
        noise_image((16, 16), seed=i).save(touch(root / f"img{i}.png"))
    ds = data.build_dataset(str(root))
    assert paths(ds) == [str(root / f"img{i}.png") for i in range(3)]
    assert ds.classes == [] and ds.targets == [-1, -1, -1] and ds.class_to_idx == {}
    assert not layouts.has_labels(ds) and ds.layout == "unlabeled"
    image, target = ds[1]
    assert isinstance(image, Image.Image) and image.size == (16, 16) and target == -1
    assert pickle.loads(pickle.dumps(ds)).samples == ds.samples  # data-loader workers may receive it pickled
    assert f"Data: unlabeled: 3 images under 1 folder ({root}; listed in " in capsys.readouterr().out


def test_unlabeled_nested_at_depth_in_sorted_order(tmp_path):
    root = tmp_path / "dump"
    files = [root / "top.jpg", root / "a" / "b" / "c" / "d" / "e" / "deep.png", root / "a" / "x.webp",
             root / "a-b" / "y.bmp", root / "z" / "w.tif"]
    for f in files:
        touch(f)
    (root / "empty" / "deeper").mkdir(parents=True)
    ds = data.build_dataset(str(root))  # images at the top and below: not an ImageFolder
    assert ds.classes == [] and set(ds.targets) == {-1}
    # sorted like torchvision's walk: the root's files, then folder by folder in path order
    assert paths(ds) == [str(f) for f in (files[0], files[2], files[3], files[1], files[4])]
    assert "under 5 folders" in ds.description


def test_hidden_non_image_and_case_insensitive_extensions(tmp_path):
    root = tmp_path / "mixed"
    names = ["a.JPG", "b.Jpeg", "c.PNG", "d.ppm", "e.BMP", "f.pgm", "g.TIF", "h.tiff", "i.WebP"]
    for name in names:
        touch(root / "sub" / name)
    for skipped in ["notes.txt", "model.pth", "jpg", "archive.jpg.gz", ".hidden.jpg", "._a.JPG",
                    ".cache/x.jpg", ".git/objects/y.png"]:
        touch(root / "sub" / skipped)
    touch(root / ".thumbnails" / "t.jpg")  # a hidden top-level folder is neither a class nor walked
    (root / "sub" / "folder.jpg").mkdir()  # a folder with an image's name is walked, not read
    touch(root / "sub" / "folder.jpg" / "inner.png")
    ds = data.build_dataset(str(root))
    assert ds.classes == ["sub"]  # one sub-folder of images: an ImageFolder of one class
    assert sorted(os.path.basename(p) for p in paths(ds)) == sorted(names + ["inner.png"])


def test_detection_edge_cases(tmp_path):
    one = tmp_path / "one"
    touch(one / "only" / "x.png")
    assert data.build_dataset(str(one)).classes == ["only"]
    both = tmp_path / "both"  # images at the top and in sub-folders: unlabeled, every image kept
    touch(both / "x.png"), touch(both / "c1" / "y.png"), touch(both / "c2" / "z.png")
    ds = data.build_dataset(str(both))
    assert ds.classes == [] and len(ds) == 3
    # a sub-folder without images (annotations beside images/): unlabeled, and the line says why
    annotated = tmp_path / "annotated"
    touch(annotated / "images" / "x.png"), touch(annotated / "annotations" / "x.json")
    ds = data.build_dataset(str(annotated))
    assert ds.classes == [] and len(ds) == 1
    assert "not an ImageFolder: no image in its sub-folder(s) annotations" in ds.description


def test_no_image_error_names_the_path_and_the_extensions(tmp_path):
    root = tmp_path / "docs"
    touch(root / "a.txt"), touch(root / "sub" / "b.pdf"), touch(root / ".hidden.jpg")
    for path in (root, tmp_path / "nothing"):
        path.mkdir(exist_ok=True)
        with pytest.raises(utils.UserError) as e:
            data.build_dataset(str(path))
        assert str(path) in str(e.value) and ".jpg" in str(e.value) and ".webp" in str(e.value)


# ----------------------------------------------------------------------------------------------------
# Symbolic links
# ----------------------------------------------------------------------------------------------------
def test_symlink_loop_terminates_and_counts_each_image_once(tmp_path):
    root = tmp_path / "loop"
    touch(root / "top.png")
    touch(root / "a" / "x.png")
    touch(root / "a" / "b" / "y.png")
    (root / "a" / "b" / "up").symlink_to(root / "a", target_is_directory=True)  # to its parent folder
    (root / "a" / "b" / "self").symlink_to(root / "a" / "b", target_is_directory=True)  # to itself
    (root / "a" / "root").symlink_to(root, target_is_directory=True)  # back to the root
    (root / "a" / "dangling.png").symlink_to(root / "missing.png")  # a broken link: kept, unreadable later
    (root / "knot").symlink_to("knot")  # a link onto itself (ELOOP)
    ds = data.build_dataset(str(root))
    assert sorted(paths(ds)) == sorted(str(p) for p in (root / "top.png", root / "a" / "x.png",
                                                         root / "a" / "b" / "y.png", root / "a" / "dangling.png"))
    # the same through an ImageFolder's class folders
    cls_root = tmp_path / "classes"
    touch(cls_root / "c1" / "x.png"), touch(cls_root / "c2" / "y.png")
    (cls_root / "c1" / "up").symlink_to(cls_root / "c1", target_is_directory=True)
    (cls_root / "c2" / "root").symlink_to(cls_root, target_is_directory=True)
    ds = data.build_dataset(str(cls_root))
    assert ds.samples == [(str(cls_root / "c1" / "x.png"), 0), (str(cls_root / "c2" / "y.png"), 1)]


def test_linked_folders_are_followed(tmp_path):
    outside = tmp_path / "outside"
    touch(outside / "o.png")
    root = tmp_path / "root"
    touch(root / "a" / "x.png")
    (root / "b").symlink_to(outside, target_is_directory=True)  # a class folder that is a link: followed
    ds = data.build_dataset(str(root))
    assert ds.samples == [(str(root / "a" / "x.png"), 0), (str(root / "b" / "o.png"), 1)]
    (root / "a" / "again").symlink_to(outside, target_is_directory=True)  # outside reached twice
    touch(root / "top.png")  # now unlabeled: the linked folder counts once, where first walked (a/ before b/)
    ds = data.build_dataset(str(root))
    assert paths(ds) == [str(root / "top.png"), str(root / "a" / "x.png"), str(root / "a" / "again" / "o.png")]


def test_threads_give_the_same_list(tmp_path):
    root = tmp_path / "many"
    for i in range(12):
        for j in range(3):
            touch(root / f"d{i:02d}" / f"s{j}" / f"{j}.png")
    (root / "d03" / "s0" / "link").symlink_to(root / "d07", target_is_directory=True)
    touch(root / "top.jpg")
    one = layouts.read_collection([str(root)], data.pil_loader_rgb, threads=1)
    many = layouts.read_collection([str(root)], data.pil_loader_rgb, threads=8)
    assert one.samples == many.samples and len(one) == 12 * 3 + 1


# ----------------------------------------------------------------------------------------------------
# List files, mixes, forced layouts
# ----------------------------------------------------------------------------------------------------
def test_list_file_relative_absolute_comments(tmp_path, capsys):
    images = tmp_path / "lists" / "imgs"
    for i in range(3):
        noise_image((8, 8), seed=i).save(touch(images / f"{i}.png"))
    elsewhere = touch(tmp_path / "other" / "far.png")
    listing = tmp_path / "lists" / "train.txt"
    listing.write_text(f"# my images\nimgs/2.png\n\n  imgs/0.png  \n{elsewhere}\n   # indented comment\r\nimgs/1.png\n")
    ds = data.build_dataset(str(listing))
    base = tmp_path / "lists"
    assert paths(ds) == [str(base / "imgs" / "2.png"), str(base / "imgs" / "0.png"), str(elsewhere),
                         str(base / "imgs" / "1.png")]  # file order
    assert ds.classes == [] and set(ds.targets) == {-1} and ds.layout == "list"
    assert ds[0][0].size == (8, 8)
    assert f"Data: list: 4 images ({listing})" in capsys.readouterr().out
    assert paths(data.build_dataset(str(listing), layout="list")) == paths(ds)


def test_list_file_errors(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("# nothing\n\n")
    with pytest.raises(utils.UserError, match="names no image"):
        data.build_dataset(str(empty))
    wrong = tmp_path / "wrong.txt"
    wrong.write_text("imgs/0.png\n")
    with pytest.raises(utils.UserError, match="first image .*imgs/0.png does not exist"):
        data.build_dataset(str(wrong))
    image = touch(tmp_path / "one.png")
    with pytest.raises(utils.UserError, match="is an image, not a list"):
        data.build_dataset(str(image))
    binary = touch(tmp_path / "blob.bin", bytes(range(256)))
    with pytest.raises(utils.UserError, match="not a text file"):
        data.build_dataset(str(binary))


def test_comma_separated_mix_is_unlabeled(tmp_path, capsys):
    labelled = image_folder(tmp_path / "labelled", n_per_class=2, size=8)
    flat = tmp_path / "flat"
    touch(flat / "f.png")
    touch(tmp_path / "listed" / "l.png")
    listing = tmp_path / "list.txt"
    listing.write_text("listed/l.png\n")
    ds = data.build_dataset(f"{labelled},{flat}, {listing}")
    assert ds.classes == [] and set(ds.targets) == {-1}
    assert paths(ds) == [str(labelled / c / f"{i}.png") for c in "ab" for i in range(2)] + [
        str(flat / "f.png"), str(tmp_path / "listed" / "l.png")]
    out = capsys.readouterr().out
    assert "Data: unlabeled: 6 images from 3 parts, labels not used: " in out
    assert f"{labelled} (ImageFolder: 2 classes, 4 images; listed in" in out and f"{listing} (list: 1 image" in out


def test_forced_layouts(tmp_path):
    labelled = image_folder(tmp_path / "labelled", n_per_class=2, size=8)
    flat = tmp_path / "flat"
    touch(flat / "f.png")
    listing = tmp_path / "list.txt"
    listing.write_text("flat/f.png\n")
    ds = data.build_dataset(str(labelled), layout="unlabeled")  # the labels dropped on request
    assert ds.classes == [] and paths(ds) == paths(data.build_dataset(str(labelled)))
    with pytest.raises(utils.UserError, match="no class folders found.*--data_layout unlabeled") as e:
        data.build_dataset(str(flat), layout="imagefolder")
    assert str(flat) in str(e.value)
    with pytest.raises(utils.UserError, match="is a folder: --data_layout list takes a text file"):
        data.build_dataset(str(flat), layout="list")
    with pytest.raises(utils.UserError, match="is a file: --data_layout imagefolder takes folders"):
        data.build_dataset(str(listing), layout="imagefolder")
    with pytest.raises(utils.UserError, match="choose one of auto, imagefolder, unlabeled, list"):
        data.build_dataset(str(flat), layout="images")
    # images beside the class folders are left out of a forced ImageFolder, as torchvision does
    touch(labelled / "stray.png")
    ds = data.build_dataset(str(labelled), layout="imagefolder")
    assert ds.classes == ["a", "b"] and len(ds) == 4 and "1 image directly in it not used" in ds.description


def test_forced_imagefolder_errors_name_the_empty_class_folders(tmp_path):
    root = image_folder(tmp_path / "train", n_per_class=2, size=8)
    touch(root / "empty_cls" / "readme.txt")
    with pytest.raises(utils.UserError) as e:
        data.build_dataset(str(root), layout="imagefolder")
    assert str(root / "empty_cls") in str(e.value) and ".jpg" in str(e.value)
    image_folder(tmp_path / "train.X1", n_per_class=1, size=8, classes=("n01",))
    image_folder(tmp_path / "train.X2", n_per_class=1, size=8, classes=("n02",))
    (tmp_path / "train.X2" / "n01").mkdir()  # empty in the second root only
    with pytest.raises(utils.UserError) as e:
        data.build_dataset(str(tmp_path / "train.X*"), layout="imagefolder")
    assert str(tmp_path / "train.X2" / "n01") in str(e.value)
    # auto reads both as one unlabeled collection, and says why
    ds = data.build_dataset(str(tmp_path / "train.X*"))
    assert ds.classes == [] and len(ds) == 2 and "no image in its sub-folder(s) n01" in ds.description


# ----------------------------------------------------------------------------------------------------
# Labels
# ----------------------------------------------------------------------------------------------------
def test_has_labels_and_labeled_splits_without_labels(tmp_path):
    root = tmp_path / "eval"
    for split in ("train", "val"):
        touch(root / split / "x.png")
    with pytest.raises(utils.UserError) as e:
        data.labeled_splits(str(root), 32, 32)
    message = str(e.value)
    assert "no labels" in message and "ImageFolder" in message
    assert all(signal in message for signal in ("teacher_entropy", "kl", "rankme"))
    labelled = image_folder(tmp_path / "labelled", n_per_class=2, size=8)
    base = data.build_dataset(str(labelled))
    assert data.has_labels(base) and data.has_labels(data.LabeledDataset(base, transform=lambda x: x))
    assert data.has_labels(data.PretrainDataset(base, transform=lambda x: x))
    assert not data.has_labels(data.PretrainDataset(data.build_dataset(str(root / "train")), lambda x: x))


# ----------------------------------------------------------------------------------------------------
# The cached walk
# ----------------------------------------------------------------------------------------------------
def count_scandir(monkeypatch):
    calls = []
    real = os.scandir

    def counting(path="."):
        calls.append(path)
        return real(path)
    monkeypatch.setattr(layouts.os, "scandir", counting)
    return calls


def test_cache_hit_without_walking_and_invalidated_by_a_new_file(tmp_path, monkeypatch, capsys):
    root = tmp_path / "data"
    for i in range(3):
        for j in range(2):
            touch(root / f"c{i}" / f"sub{j}" / f"{j}.png")
    touch(root / "top.png")
    age(root)
    out = tmp_path / "run"
    calls = count_scandir(monkeypatch)
    first = data.build_dataset(str(root), cache_dir=str(out))
    assert len(calls) == 1 + 3 * 3  # the root, 3 top-level folders and their 6 sub-folders
    caches = sorted(os.listdir(out))
    assert len(caches) == 1 and caches[0].startswith("file_list_") and caches[0].endswith(".json")  # no temp files

    calls.clear()
    capsys.readouterr()
    second = data.build_dataset(str(root), cache_dir=str(out))
    assert calls == [] and second.samples == first.samples  # not listed again
    assert f"file list from {out / caches[0]}" in capsys.readouterr().out
    forced = data.build_dataset(str(root), layout="unlabeled", cache_dir=str(out))  # one walk serves any layout
    assert calls == [] and paths(forced) == paths(first)

    new = touch(root / "c1" / "sub0" / "new.png")  # a folder gains a file: its modification time moves
    third = data.build_dataset(str(root), cache_dir=str(out))
    assert calls and str(new) in paths(third) and len(third) == len(first) + 1
    calls.clear()
    age(root)
    data.build_dataset(str(root), cache_dir=str(out))  # stored again
    calls.clear()
    assert paths(data.build_dataset(str(root), cache_dir=str(out))) == paths(third) and calls == []
    (root / "c2" / "sub1" / "1.png").unlink()  # a folder loses a file
    assert len(data.build_dataset(str(root), cache_dir=str(out))) == len(third) - 1


def test_cache_not_trusted_for_folders_changed_just_before_the_walk(tmp_path, monkeypatch):
    root = tmp_path / "fresh"
    touch(root / "a" / "x.png")
    data.build_dataset(str(root), cache_dir=str(tmp_path / "run"))  # just made: a change may follow unseen
    calls = count_scandir(monkeypatch)
    data.build_dataset(str(root), cache_dir=str(tmp_path / "run"))
    assert calls


def test_no_cache_dir_no_cache_and_a_bad_cache_file_is_ignored(tmp_path, monkeypatch):
    root = tmp_path / "data"
    touch(root / "a" / "x.png")
    age(root)
    before = set(os.listdir(tmp_path))
    data.build_dataset(str(root))
    assert set(os.listdir(tmp_path)) == before
    out = tmp_path / "run"
    first = data.build_dataset(str(root), cache_dir=str(out))
    (cache,) = out.iterdir()
    cache.write_text("{not json")
    calls = count_scandir(monkeypatch)
    assert data.build_dataset(str(root), cache_dir=str(out)).samples == first.samples and calls
