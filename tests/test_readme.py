"""The README's two opening commands stay true: the flags parse, and (slow) the quickstart trains."""
import json
import re
import shlex
import sys

import pytest

from conftest import REPO_ROOT, run_cmd


def readme_commands():
    text = (REPO_ROOT / "README.md").read_text()
    block = re.search(r"```bash\n(.*?)```", text, re.S).group(1)
    return [line for line in block.splitlines() if line.strip()]


def quickstart_flags():
    first = readme_commands()[0]
    training = first.split("&&")[-1].strip()
    words = shlex.split(training)
    assert words[:2] == [".venv/bin/python", "main_dino.py"], training
    return words[2:]


def test_readme_opens_with_install_train_and_test_commands():
    install_and_train, tests = readme_commands()[:2]
    assert install_and_train.startswith("python3 -m venv .venv && .venv/bin/pip install -r requirements.txt && ")
    assert tests == ".venv/bin/python -m pytest"
    ci = (REPO_ROOT / ".ci" / "run").read_text()
    assert tests in ci, ".ci/run must run the README's test command"


def test_quickstart_flags_are_valid():
    import main_dino
    args = main_dino.get_args_parser().parse_args(quickstart_flags())
    main_dino.check_args(args)
    assert args.data_path == "synthetic"


@pytest.mark.slow
def test_quickstart_trains_and_reports_its_outputs(tmp_path):
    flags = quickstart_flags()
    flags[flags.index("--output_dir") + 1] = str(tmp_path / "quickstart")
    proc = run_cmd([sys.executable, REPO_ROOT / "main_dino.py", *flags], timeout=1800,
                   env={"DINO_SYNTHETIC_ROOT": str(tmp_path / "cache")})
    for line in ("Log (one JSON line per epoch):", "Checkpoint:", "Training curves:"):
        path = proc.stdout.split(line, 1)[1].split("\n", 1)[0].strip()
        assert (tmp_path / "quickstart" / path.rsplit("/", 1)[-1]).is_file(), line
    with open(tmp_path / "quickstart" / "log.txt") as f:
        records = [json.loads(line) for line in f]
    losses = [r["train_loss"] for r in records]
    assert losses[-1] < losses[0], f"the quickstart did not learn: {losses}"
    assert all(0 <= r["knn_top1"] <= 100 for r in records)  # the online k-NN ran every epoch
