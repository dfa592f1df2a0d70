"""extract_features.py: the files it writes and their alignment, its flags, unreadable images, a run stopped (SIGTERM,
kill -9) and continued, two processes against one, and the output folders it refuses.

A randomly initialised ViT-Tiny/16 (seed 0) on 32-px crops of generated images: one pass is milliseconds, so the
time of a test is the start-up of the processes it runs.
"""
import inspect
import json
import os
import signal
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import child_env, image_folder, parse, run_cmd, script, stop_when, torchrun
import data
import extract_features as ef
import utils
import vision_transformer as vits

MODEL = ["--arch", "vit_tiny", "--patch_size", 16, "--resize_size", 32, "--crop_size", 32, "--seed", 0]
FAST = MODEL + ["--batch_size_per_gpu", 4, "--num_workers", 0, "--chunk_size", 4, "--print_freq", 1]


def flags(data_path, out, *extra) -> list:
    return ["--data_path", data_path, "--output_dir", out, *FAST, *extra]


def extract(data_path, out, *extra) -> dict:
    """extract_features.py in this process; returns meta.json's content."""
    return ef.extract_features(parse(ef, *flags(data_path, out, *extra)))


def outputs(out: Path) -> dict:
    """Everything a finished extraction holds."""
    found = {"features": np.load(out / "features.npy"), "paths": (out / "paths.txt").read_text().splitlines(),
             "skipped": (out / "skipped.txt").read_text().splitlines(),
             "meta": json.loads((out / "meta.json").read_text())}
    for name in ("labels", "patch_features"):
        if (out / f"{name}.npy").exists():
            found[name] = np.load(out / f"{name}.npy")
    return found


def assert_same_outputs(a: dict, b: dict, atol: float = 0.) -> None:
    assert a["paths"] == b["paths"] and a["skipped"] == b["skipped"]
    assert set(a) == set(b)
    for name in ("features", "patch_features"):
        if name in a:
            assert a[name].dtype == b[name].dtype
            np.testing.assert_allclose(a[name], b[name], rtol=0, atol=atol)
    if "labels" in a:
        assert np.array_equal(a["labels"], b["labels"])


@torch.no_grad()
def by_hand(paths, patch_tokens: bool = False) -> torch.Tensor:
    """The CLS tokens (or the mean patch tokens) of a ViT-Tiny/16 initialised as the script does (seed 0), on the
    official evaluation transform of each image, one at a time."""
    utils.fix_random_seeds(0)
    model = vits.vit_tiny(patch_size=16).eval()
    transform = data.eval_transform(32, 32)
    images = torch.stack([transform(data.pil_loader_rgb(p)) for p in paths])
    tokens = model.forward_features(images)
    return tokens[:, 1:].mean(1) if patch_tokens else tokens[:, 0]


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """15 images in 3 classes (15: not a multiple of the chunk, of the batch or of 2 processes)."""
    return image_folder(tmp_path_factory.mktemp("ef") / "imgs", n_per_class=5, classes=("a", "b", "c"))


@pytest.fixture(scope="module")
def reference(folder, tmp_path_factory) -> dict:
    """The outputs of one uninterrupted run with the default flags, in this process."""
    out = tmp_path_factory.mktemp("ef_reference")
    extract(folder, out)
    return outputs(out)


@pytest.fixture(scope="module")
def with_bad_image(tmp_path_factory) -> Path:
    """The 15 images of `folder` and an unreadable one, b/2_bad.png (in the middle of the dataset order)."""
    root = image_folder(tmp_path_factory.mktemp("ef_bad") / "imgs", n_per_class=5, classes=("a", "b", "c"))
    (root / "b" / "2_bad.png").write_bytes(b"not an image at all")
    return root


def test_outputs_aligned(folder, reference):
    out = reference
    dataset = data.build_dataset(str(folder))
    assert out["paths"] == [p for p, _ in dataset.samples]  # dataset order
    assert out["features"].shape == (15, 192) and out["features"].dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(out["features"], axis=1), 1, atol=1e-5)
    # each row is the normalised CLS token of the image on the same line of paths.txt
    expected = torch.nn.functional.normalize(by_hand(out["paths"]), dim=1).numpy()
    np.testing.assert_allclose(out["features"], expected, atol=1e-5)
    assert out["labels"].tolist() == [dataset.class_to_idx[Path(p).parent.name] for p in out["paths"]]
    assert out["skipped"] == [] and "patch_features" not in out
    meta = out["meta"]
    assert meta["complete"] and meta["count"] == 15 and meta["dim"] == 192 and meta["classes"] == ["a", "b", "c"]
    assert meta["options"]["arch"] == "vit_tiny" and meta["options"]["weights"] == "random initialisation, seed 0"
    assert sorted(meta["files"]) == ["features.npy", "labels.npy", "paths.txt", "skipped.txt"]


@pytest.mark.skipif("layout" not in inspect.signature(data.build_dataset).parameters,
                    reason="data.build_dataset has no `layout` parameter yet: unlabeled folders and lists are not read")
def test_unlabeled_folder_and_list(folder, reference, tmp_path):
    # the same images, loose at several depths: no classes, so no labels.npy
    loose = tmp_path / "loose"
    for i, path in enumerate(reference["paths"]):
        target = loose / ("x" if i % 2 else "") / ("y" * (i % 3)) / f"{i:02d}.png"
        target.parent.mkdir(parents=True, exist_ok=True)
        os.link(path, target)
    meta = extract(loose, tmp_path / "unlabeled", "--data_layout", "unlabeled")
    got = outputs(tmp_path / "unlabeled")
    assert "labels" not in got and meta["classes"] == [] and "labels.npy" not in meta["files"]
    assert len(got["paths"]) == 15
    np.testing.assert_allclose(got["features"], torch.nn.functional.normalize(by_hand(got["paths"]), dim=1).numpy(),
                               atol=1e-5)
    # a list file: the rows follow its lines
    listing = tmp_path / "images.txt"
    listing.write_text("".join(p + "\n" for p in reversed(reference["paths"])))
    extract(listing, tmp_path / "list", "--data_layout", "list")
    got = outputs(tmp_path / "list")
    assert "labels" not in got and got["paths"] == list(reversed(reference["paths"]))
    np.testing.assert_allclose(got["features"], reference["features"][::-1], atol=1e-6)


def test_raw_float16_and_patch_tokens(folder, reference, tmp_path):
    extract(folder, tmp_path, "--normalize", "false", "--dtype", "float16", "--patch_tokens", "true")
    got = outputs(tmp_path)
    assert got["paths"] == reference["paths"] and got["features"].dtype == np.float16
    raw = by_hand(got["paths"]).numpy()
    np.testing.assert_allclose(got["features"].astype(np.float32), raw, rtol=1e-3, atol=1e-3)  # not normalised
    assert not np.allclose(np.linalg.norm(raw, axis=1), 1, atol=0.1)
    assert got["patch_features"].shape == (15, 192) and got["patch_features"].dtype == np.float16
    np.testing.assert_allclose(got["patch_features"].astype(np.float32), by_hand(got["paths"], patch_tokens=True),
                               rtol=1e-3, atol=1e-3)
    assert got["meta"]["patch_dim"] == 192 and "patch_features.npy" in got["meta"]["files"]


def test_unreadable_image_listed_not_embedded(with_bad_image, reference, tmp_path):
    extract(with_bad_image, tmp_path)
    got = outputs(tmp_path)
    bad = str(with_bad_image / "b" / "2_bad.png")
    assert len(got["skipped"]) == 1 and got["skipped"][0].startswith(bad + ": UnidentifiedImageError")
    assert bad not in got["paths"] and len(got["paths"]) == len(got["features"]) == len(got["labels"]) == 15
    assert [Path(p).relative_to(with_bad_image) for p in got["paths"]] == \
        [Path(p).relative_to(Path(reference["paths"][0]).parent.parent) for p in reference["paths"]]
    np.testing.assert_allclose(got["features"], reference["features"], atol=1e-6)  # the rows of the others
    assert got["labels"].tolist() == reference["labels"].tolist()
    assert got["meta"]["skipped"] == 1


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGKILL])
def test_stopped_then_continued(signum, tmp_path):
    """A run stopped after a few chunks (SIGTERM: it says where it stopped; kill -9: nothing said), then the same
    command again: the same files as a run never stopped."""
    images = image_folder(tmp_path / "imgs", n_per_class=10, classes=("a", "b", "c", "d"))  # 40 chunks of 1 image
    one = ["--chunk_size", 1]
    extract(images, tmp_path / "reference", *one)
    out = tmp_path / "out"
    # Output arrives through a pipe of one page read line by line: the run cannot get more than a few chunks past
    # the line matched before the signal lands.
    code, log = stop_when(script("extract_features.py", *flags(images, out, *one)), r"Chunk 3/40 written",
                          lambda proc: os.killpg(proc.pid, signum), timeout=300, env=child_env())
    assert code == (-signal.SIGKILL if signum == signal.SIGKILL else 128 + signum), log[-3000:]
    done = len(list((out / "parts").glob("chunk_*.npz")))
    assert 3 <= done < 40 and not (out / "features.npy").exists(), log[-3000:]
    if signum == signal.SIGTERM:
        assert f"Stopped by SIGTERM: {done} of 40 chunks are in {out / 'parts'}" in log
    meta = extract(images, out, *one)
    assert meta["complete"] and not (out / "parts").exists()
    assert_same_outputs(outputs(out), outputs(tmp_path / "reference"), atol=1e-6)


def test_two_processes_equal_one(with_bad_image, tmp_path):
    # 16 images (one unreadable) in chunks of 5: 3 on one rank and 2 + 1 repeated on the other; the last chunk, of
    # one image, read by both
    extra = ["--patch_tokens", "true", "--chunk_size", 5]
    extract(with_bad_image, tmp_path / "one", *extra)
    run_cmd(torchrun("extract_features.py", *flags(with_bad_image, tmp_path / "two", *extra)),
            env={"OMP_NUM_THREADS": "1"})
    one, two = outputs(tmp_path / "one"), outputs(tmp_path / "two")
    assert len(two["skipped"]) == 1 and len(two["paths"]) == 15
    assert_same_outputs(one, two, atol=1e-5)
    assert one["meta"] == two["meta"]


def test_refuses_another_extraction(folder, tmp_path):
    meta = extract(folder, tmp_path)
    stamp = (tmp_path / "features.npy").stat().st_mtime_ns
    assert extract(folder, tmp_path) == meta  # the same command again: finished, nothing redone
    assert (tmp_path / "features.npy").stat().st_mtime_ns == stamp
    with pytest.raises(utils.UserError, match=r"holds another extraction \(normalize: True there, False now\)"):
        extract(folder, tmp_path, "--normalize", "false")
    weights = tmp_path / "weights.pth"
    torch.save(vits.vit_tiny(patch_size=16).state_dict(), weights)
    with pytest.raises(utils.UserError, match="holds another extraction.*weights: 'random initialisation"):
        extract(folder, tmp_path, "--pretrained_weights", weights)
    # weights that do not fit the model stop before anything is written
    with pytest.raises(utils.UserError, match="does not fit vit_small"):
        extract(folder, tmp_path / "fresh", "--pretrained_weights", weights, "--arch", "vit_small")
    assert not (tmp_path / "fresh").exists()
    with pytest.raises(utils.UserError, match="does not exist"):
        extract(tmp_path / "nowhere", tmp_path / "fresh")
    # extraction files without a meta.json saying what they are
    (tmp_path / "stray").mkdir()
    np.save(tmp_path / "stray" / "features.npy", np.zeros((2, 2)))
    with pytest.raises(utils.UserError, match="holds features.npy but no meta.json"):
        extract(folder, tmp_path / "stray")
