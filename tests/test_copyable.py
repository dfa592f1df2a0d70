"""vision_transformer.py, augmentations.py, masking.py and every file of losses/ can be copied alone into
other code.

Each file is copied into an empty folder and imported there by a fresh, isolated interpreter
(`python -I`: no PYTHONPATH, no current directory, no user site) in which the repository is not
importable; a tiny forward must run. A static check (AST) also bounds their imports to torch, numpy
and the standard library.
"""
import ast
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
LOSS_FILES = sorted(p.name for p in (REPO / "losses").glob("*.py") if p.name != "__init__.py")
COPYABLE = ["vision_transformer.py", "augmentations.py", "masking.py"] + [f"losses/{name}" for name in LOSS_FILES]
ALLOWED_THIRD_PARTY = {"torch", "numpy"}

# Run first in every child: prove the isolation, then make the copy (and only it) importable.
PRELUDE = textwrap.dedent("""
    import importlib.util, os, sys
    for name in ("utils", "data", "main_dino", "losses", "augmentations", "masking"):
        assert importlib.util.find_spec(name) is None, f"the repository is importable: {name}"
    sys.path.insert(0, os.getcwd())
""")

# A tiny forward for the files we know; any other loss file is at least imported.
FORWARDS = {
    "vision_transformer": """
        import torch
        import vision_transformer as m
        assert os.path.dirname(os.path.abspath(m.__file__)) == os.getcwd(), m.__file__
        torch.manual_seed(0)
        model = m.vit_tiny(patch_size=16).eval()
        with torch.no_grad():
            out = model(torch.randn(1, 3, 32, 32))
            attn = model.get_last_selfattention(torch.randn(1, 3, 32, 32))
        assert out.shape == (1, 192) and torch.isfinite(out).all(), out.shape
        assert attn.shape == (1, 3, 5, 5), attn.shape
        head = m.DINOHead(192, 64, hidden_dim=32, bottleneck_dim=16)
        y = head(out)
        assert y.shape == (1, 64) and torch.isfinite(y).all()
        print("FORWARD OK", tuple(out.shape), tuple(y.shape))
    """,
    "augmentations": """
        import random
        import torch
        import augmentations as m
        assert os.path.dirname(os.path.abspath(m.__file__)) == os.getcwd(), m.__file__
        random.seed(0)
        torch.manual_seed(0)
        image = torch.randint(0, 256, (3, 40, 56), dtype=torch.uint8)  # a uint8 tensor stands for a PIL image
        aug = m.DataAugmentationDINO((0.4, 1.0), (0.05, 0.4), 3, global_crops_size=32, local_crops_size=16)
        crops = aug(image)
        assert [tuple(c.shape) for c in crops] == [(3, 32, 32)] * 2 + [(3, 16, 16)] * 3, [c.shape for c in crops]
        assert all(c.dtype == torch.float32 and torch.isfinite(c).all() for c in crops)
        one = m.CropAugmentation(24, (0.4, 1.0), blur_p=1.0)(image)
        assert one.shape == (3, 24, 24) and torch.isfinite(one).all()
        print("FORWARD OK", len(crops))
    """,
    "masking": """
        import random
        import torch
        import masking as m
        assert os.path.dirname(os.path.abspath(m.__file__)) == os.getcwd(), m.__file__
        random.seed(0)
        sampler = m.BlockMaskSampler(32, 4, 8, mask_ratio=(0.1, 0.5), mask_probability=1.0)
        crops, masks = m.MaskedCrops(lambda image: [torch.zeros(3, 32, 32)] * 2 + [torch.zeros(3, 16, 16)],
                                     sampler)(None)
        assert len(crops) == 3 and masks.shape == (2, 64) and masks.dtype == torch.bool and masks.any()
        try:
            m.BlockMaskSampler(32, 4, 6)
        except ValueError as e:
            assert "--mask_patch_size 6" in str(e), e
        else:
            raise AssertionError("no ValueError")
        print("FORWARD OK", int(masks.sum()))
    """,
    "dino": """
        import torch
        import dino as m
        assert os.path.dirname(os.path.abspath(m.__file__)) == os.getcwd(), m.__file__
        torch.manual_seed(0)
        loss_fn = m.DINOLoss(out_dim=16, ncrops=4, warmup_teacher_temp=0.04, teacher_temp=0.07,
                             warmup_teacher_temp_epochs=2, nepochs=5)
        student = torch.randn(4 * 3, 16, requires_grad=True)
        teacher = torch.randn(2 * 3, 16)
        loss = loss_fn(student, teacher, epoch=0)
        loss.backward()
        assert loss.ndim == 0 and torch.isfinite(loss) and loss.item() > 0
        assert student.grad is not None and torch.isfinite(student.grad).all()
        assert loss_fn.center.abs().sum() > 0  # the center moved
        print("FORWARD OK", float(loss))
    """,
}


def _run_isolated(folder: Path, code: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env["CUDA_VISIBLE_DEVICES"] = ""
    return subprocess.run([sys.executable, "-I", "-c", PRELUDE + textwrap.dedent(code)], cwd=folder, env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("relpath", COPYABLE)
def test_file_works_alone(relpath, tmp_path):
    src = REPO / relpath
    folder = tmp_path / "alone"
    folder.mkdir()
    shutil.copy(src, folder / src.name)
    assert sorted(os.listdir(folder)) == [src.name]
    module = src.stem
    code = FORWARDS.get(module, f"import {module}\nprint('FORWARD OK (import only)')\n")
    proc = _run_isolated(folder, code)
    assert proc.returncode == 0, f"{relpath} does not work alone:\n{proc.stdout}\n{proc.stderr}"
    assert "FORWARD OK" in proc.stdout


def test_isolation_is_real(tmp_path):
    """The same child, given a file that imports the repository, fails: the check above can fail."""
    folder = tmp_path / "alone"
    folder.mkdir()
    (folder / "leaky.py").write_text("import utils\n")
    proc = _run_isolated(folder, "import leaky\n")
    assert proc.returncode != 0 and "ModuleNotFoundError" in proc.stderr


def _imported_modules(path: Path):
    """(top-level module name, line) of every import in the file, nested ones included; relative
    imports as ('.', line)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name.split(".")[0], node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            found.append(("." if node.level else node.module.split(".")[0], node.lineno))
        elif isinstance(node, ast.Call) and getattr(node.func, "id", getattr(node.func, "attr", None)) in (
                "__import__", "import_module"):
            arg = node.args[0] if node.args else None
            name = arg.value.split(".")[0] if isinstance(arg, ast.Constant) and isinstance(arg.value, str) else "?"
            found.append((name, node.lineno))
    return found


@pytest.mark.parametrize("relpath", COPYABLE)
def test_imports_only_torch_numpy_stdlib(relpath):
    path = REPO / relpath
    bad = [(name, line) for name, line in _imported_modules(path)
           if name not in ALLOWED_THIRD_PARTY and name not in sys.stdlib_module_names]
    assert not bad, f"{relpath} imports {bad} (allowed: torch, numpy, the standard library; no relative imports)"


def test_import_checker_catches_violations(tmp_path):
    f = tmp_path / "x.py"
    f.write_text("import os\nimport torch.nn as nn\nfrom numpy import linalg\n"
                 "def g():\n    import timm\n    from . import utils\n    from PIL import Image\n")
    names = [n for n, _ in _imported_modules(f)]
    assert names == ["os", "torch", "numpy", "timm", ".", "PIL"]
    assert [n for n in names if n not in ALLOWED_THIRD_PARTY and n not in sys.stdlib_module_names] == \
        ["timm", ".", "PIL"]


def test_losses_package_is_covered():
    assert "dino.py" in LOSS_FILES
