"""recipes/*.sh stay runnable: every command line they would run is parsed by its script's own parser and
checked by its check_args (a dry run: DRY_RUN=1 prints the commands), each recipe states its machine and its
expected result, and the data layouts they build (ImageNet-100's train.X1..X4, CIFAR-10's test/ as val/) are
read by the data code."""
import argparse
import os
import re
import shlex
import subprocess

import pytest

from conftest import REPO_ROOT
import data
import eval_knn
import eval_linear
import main_dino
import main_distill

RECIPES = sorted(p for p in (REPO_ROOT / "recipes").glob("*.sh") if p.name != "common.sh")
SCRIPTS = {  # script: (parser, check or None)
    "main_dino.py": (main_dino.get_args_parser, main_dino.check_args),
    "main_distill.py": (main_distill.get_args_parser, main_distill.check_args),
    "eval_knn.py": (eval_knn.get_args_parser, None),
    "eval_linear.py": (eval_linear.get_args_parser, eval_linear.check_args),
}
TRAINING = ("main_dino.py", "main_distill.py")


class Parser(argparse.ArgumentParser):
    def error(self, message):  # raise instead of exiting, so that the test names the recipe and the flag
        raise ValueError(message)


def run_recipe(recipe, env=None):
    proc = subprocess.run(["bash", str(recipe)], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHON": "python3", **(env or {})})
    assert proc.returncode == 0, f"{recipe.name} failed:\n{proc.stderr[-3000:]}"
    return proc.stdout


def script_commands(stdout):
    """(script name, its arguments) of every printed command line that runs one of the scripts."""
    commands = []
    for line in stdout.splitlines():
        words = shlex.split(line)
        scripts = [i for i, w in enumerate(words) if os.path.basename(w) in SCRIPTS]
        if scripts:
            commands.append((os.path.basename(words[scripts[0]]), words[scripts[0] + 1:]))
    return commands


def parse(script, argv):
    get_parser, check = SCRIPTS[script]
    args = Parser(script, parents=[get_parser()]).parse_args(argv)
    if check is not None:
        check(args)
    return args


def test_there_is_a_recipe_for_each_tested_configuration():
    names = {p.stem for p in RECIPES}
    assert {"cpu_laptop", "imagenette_vit_small", "imagenette_resnet50", "cifar10_vit_32px", "imagenet100_vit_small",
            "imagenet1k_vit_small_8gpu", "distill_dinov3_vitl_to_vits"} <= names


@pytest.mark.parametrize("recipe", RECIPES, ids=[p.stem for p in RECIPES])
def test_recipe_commands_parse_and_pass_the_checks(recipe):
    commands = script_commands(run_recipe(recipe, {"DRY_RUN": "1"}))
    assert commands and commands[0][0] in TRAINING, f"{recipe.name} does not start by training"
    for script, argv in commands:
        try:
            parse(script, argv)
        except Exception as e:
            raise AssertionError(f"{recipe.name}: {script} {' '.join(argv)}\n-> {e}") from None
    # experiment tracking flags reach every training command
    commands = script_commands(run_recipe(recipe, {"DRY_RUN": "1", "EXTRA": "--logger tensorboard --log_freq 50"}))
    for script, argv in commands:
        if script != "eval_knn.py":
            args = parse(script, argv)
            assert args.logger == ["tensorboard"] and args.log_freq == 50, (recipe.name, script)
    # pretraining flags (e.g. CPU bf16) reach the pretraining command, and only it
    commands = script_commands(run_recipe(recipe, {"DRY_RUN": "1", "TRAIN_EXTRA": "--amp_dtype bf16"}))
    for script, argv in commands:
        assert ("--amp_dtype" in argv) == (script in TRAINING), (recipe.name, script)
        if script in TRAINING:
            assert parse(script, argv).amp_dtype == "bf16", recipe.name

    # the header says on what machine and what to expect: figures, or that none were measured
    text = recipe.read_text()
    machine = re.search(r"^# Machine: +(\S.*)$", text, re.M)
    expected = re.search(r"^# Expected: +(\S.*)$", text, re.M)
    assert machine and expected, f"{recipe.name}: no '# Machine:' or '# Expected:' line"
    assert "not measured here" in expected.group(1) or re.search(r"\d%", expected.group(1)), recipe.name


def test_measured_recipe_is_the_readme_command():
    """The CPU recipe carries the README's measured figures: it must run the command they were measured with."""
    readme = (REPO_ROOT / "README.md").read_text()
    section = readme.split("### Measured: Imagenette on a 2-core CPU", 1)
    if len(section) == 1:
        pytest.skip("the README has no measured Imagenette section any more")
    section = section[1].split("\n## ", 1)[0]
    text = (REPO_ROOT / "recipes" / "cpu_laptop.sh").read_text()
    for figure in ("43.6%", "29.5%", "50.4%", "36.1%"):
        assert figure in text and figure in section, figure
    block = re.search(r"```bash\n(.*?)```", section, re.S)
    lines = block.group(1).replace("\\\n", " ").splitlines() if block else []
    readme_train = [shlex.split(line) for line in lines if "main_dino.py" in line]
    if not readme_train:  # the README may just point to the recipe
        return
    recipe = script_commands(run_recipe(REPO_ROOT / "recipes" / "cpu_laptop.sh",
                                        {"DRY_RUN": "1", "DATA": "../shared/data/imagenette"}))
    ours = vars(parse("main_dino.py", recipe[0][1]))
    theirs = vars(parse("main_dino.py", readme_train[0][readme_train[0].index("main_dino.py") + 1:]))
    ours.pop("output_dir"), theirs.pop("output_dir")
    assert ours == theirs, "the README's measured command and recipes/cpu_laptop.sh differ"


def image_tree(root, classes, per_class=2):
    from conftest import noise_image
    for c in classes:
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            noise_image((20, 20), seed=i).save(root / c / f"{i}.png")


def test_imagenet100_layout_is_read_as_one_dataset_and_evaluated(tmp_path):
    """train.X1/train.X2 (each a share of the classes) and val.X: the recipe's --data_path glob merges them, and
    the folder of links it builds has the train/ and val/ that the evaluations read."""
    root = tmp_path / "imagenet100"
    image_tree(root / "train.X1", ["n01", "n02"])
    image_tree(root / "train.X2", ["n03", "n04"])
    image_tree(root / "val.X", ["n01", "n02", "n03", "n04"], per_class=1)
    out = tmp_path / "out"
    # PYTHON=echo: the folder of links is made for real, the scripts are only printed
    stdout = run_recipe(REPO_ROOT / "recipes" / "imagenet100_vit_small.sh",
                        {"DATA": str(root), "OUT": str(out), "PYTHON": "echo"})
    commands = {script: argv for script, argv in script_commands(stdout)}
    train = data.build_dataset(parse("main_dino.py", commands["main_dino.py"]).data_path)
    assert train.classes == ["n01", "n02", "n03", "n04"] and len(train) == 8
    knn_train, knn_val = data.labeled_splits(parse("eval_knn.py", commands["eval_knn.py"]).data_path, 32, 32)
    assert knn_train.base.classes == knn_val.base.classes == ["n01", "n02", "n03", "n04"]
    assert len(knn_train) == 8 and len(knn_val) == 4


def test_cifar10_test_split_becomes_val_for_the_evaluations(tmp_path):
    root = tmp_path / "cifar10"
    image_tree(root / "train", ["cat", "dog"])
    image_tree(root / "test", ["cat", "dog"], per_class=1)
    stdout = run_recipe(REPO_ROOT / "recipes" / "cifar10_vit_32px.sh",
                        {"DATA": str(root), "OUT": str(tmp_path / "out"), "PYTHON": "echo"})
    commands = {script: argv for script, argv in script_commands(stdout)}
    knn_train, knn_val = data.labeled_splits(parse("eval_knn.py", commands["eval_knn.py"]).data_path, 32, 32)
    assert len(knn_train) == 4 and len(knn_val) == 2
