"""The package as a user installs it: a wheel built from the repository, installed (not editable) into a fresh virtual
environment, used from a directory that is not the checkout. Training with evaluation (caption metrics), writing the
model card and `loracaptioner caption` must work there: everything they read ships inside the wheel."""

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import venv
from pathlib import Path

from conftest import REPO
from test_resume import write_imagefolder

# What a build reads: the package and its metadata (README.md is the long description).
BUILD_INPUTS = ("loracaptioner", "setup.cfg", "pyproject.toml", "README.md")


def run(command: list[str], cwd: Path, env: dict) -> subprocess.CompletedProcess:
    completed = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, f"{command}\n{completed.stdout[-3000:]}\n{completed.stderr[-3000:]}"
    return completed


def test_the_installed_wheel_trains_evaluates_writes_the_card_and_captions_outside_the_checkout(backbones, tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": "", "PYTHONNOUSERSITE": "1"}
    # 1. A wheel, built from a copy of the sources (no build/ left in the checkout).
    source = tmp_path / "source"
    source.mkdir()
    for name in BUILD_INPUTS:
        if (REPO / name).is_dir():
            shutil.copytree(REPO / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(REPO / name, source / name)
    run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path / "dist"),
         str(source)], tmp_path, env)
    wheel = next((tmp_path / "dist").glob("loracaptioner-*.whl"))

    # 2. A fresh environment: the wheel installed without its dependencies, which come from this environment's
    # site-packages through a path file (a path file's own path files, the editable checkout's among them, are not
    # read: the checkout stays off sys.path).
    environment = tmp_path / "venv"
    venv.create(environment, with_pip=False)
    python = environment / "bin" / "python"
    site_packages = Path(run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             tmp_path, env).stdout.strip())
    (site_packages / "dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-index", "-q", str(wheel)],
        tmp_path, env)
    workdir = tmp_path / "elsewhere"
    workdir.mkdir()
    where = run([str(python), "-c", "import loracaptioner; print(loracaptioner.__file__)"], workdir, env).stdout
    assert Path(where.strip()).is_relative_to(site_packages), where

    # 3. train_hf.py (a top-level script, not in the wheel) run from a copy outside the checkout: a short LoRA run
    # with evaluation, caption metrics, the merged model and its card.
    shutil.copy(REPO / "train_hf.py", workdir / "train_hf.py")
    data = write_imagefolder(tmp_path / "data", count=4)
    run([str(python), "train_hf.py", "--vision_model_name_or_path", backbones[0], "--text_model_name_or_path",
         backbones[1], "--train_dir", str(data), "--validation_dir", str(data), "--output_dir", "out", "--do_train",
         "--do_eval", "--max_steps", "2", "--per_device_train_batch_size", "4", "--lora_r", "4", "--report_to", "none",
         "--use_cpu", "--disable_tqdm", "true", "--save_strategy", "no"], workdir, env)
    assert "eval_cider" in json.loads((workdir / "out" / "eval_results.json").read_text())
    card = (workdir / "out" / "README.md").read_text()
    assert "CIDEr-D" in card and "LoRA" in card

    # 4. The console script of the installed package captions with the trained model.
    image = next(data.glob("*.png"))
    captions = run([str(environment / "bin" / "loracaptioner"), "caption", "out", str(image), "--device", "cpu"],
                   workdir, env).stdout
    assert image.name in captions
