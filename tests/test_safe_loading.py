"""Loading a LoraCaptioner runs no code but its own: weights are safetensors (never pickles), every torch.load in the
project refuses pickled code, and the remote-code files touch no file or network when imported."""

import ast
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap

import pytest
from conftest import REPO

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
# What the Trainer writes into checkpoint-*/ to resume a run, and reads back itself with torch.load(weights_only=True).
TRAINER_RESUME_STATE = {"optimizer.pt", "scheduler.pt", "rng_state.pth", "training_args.bin", "scaler.pt"}
REMOTE_CODE_FILES = ("configuration_loracaptioner.py", "modeling_loracaptioner.py", "processing_loracaptioner.py")
REMOTE_CODE_DIR = REPO / "loracaptioner" / "remote_code"
# What Hub users' Python is sure to have: torch, transformers, and the two transformers' image processing needs.
REMOTE_CODE_MAY_IMPORT = {"torch", "transformers", "numpy", "PIL"}


def test_the_remote_code_folder_holds_the_three_hub_files_and_imports_nothing_of_the_package():
    """loracaptioner/remote_code/ is the boundary Hub users execute: exactly the three files `auto_map` names (and a
    docstring-only `__init__`), each importing only the standard library, torch, transformers (numpy, PIL) and, by
    relative import, one another."""
    assert sorted(path.name for path in REMOTE_CODE_DIR.glob("*.py")) == sorted([*REMOTE_CODE_FILES, "__init__.py"])
    assert ast.parse((REMOTE_CODE_DIR / "__init__.py").read_text()).body[1:] == []  # nothing past the docstring
    for name in REMOTE_CODE_FILES:
        for node in ast.walk(ast.parse((REMOTE_CODE_DIR / name).read_text())):
            if isinstance(node, ast.Import):
                roots = {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                roots = {node.module.split(".")[0]}
            elif isinstance(node, ast.ImportFrom):
                assert node.level == 1 and f"{node.module}.py" in REMOTE_CODE_FILES, (name, ast.dump(node))
                continue
            else:
                continue
            outside = roots - REMOTE_CODE_MAY_IMPORT - set(sys.stdlib_module_names)
            assert not outside, f"{name} imports {sorted(outside)}"


def pickles_in(folder) -> list[str]:
    return sorted(str(path.relative_to(folder)) for path in folder.rglob("*") if path.name.endswith(PICKLE_SUFFIXES))


def test_saved_model_and_processor_folder_holds_safetensors_and_no_pickles(model, processor, tmp_path):
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    assert pickles_in(tmp_path) == []


@pytest.fixture(scope="module")
def short_run(backbones, tmp_path_factory):
    """Two train_hf.py steps with a checkpoint after each: the final folder, the adapter and the checkpoints."""
    from PIL import Image

    sys.path.insert(0, str(REPO))
    import train_hf

    data, output_dir = tmp_path_factory.mktemp("data"), tmp_path_factory.mktemp("run")
    with open(data / "metadata.jsonl", "w") as metadata:
        for i, colour in enumerate(["red", "blue"]):
            Image.new("RGB", (32, 32), colour).save(data / f"{i}.png")
            metadata.write(json.dumps({"file_name": f"{i}.png", "caption": f"a {colour} square"}) + "\n")
    original = sys.argv
    sys.argv = ["train_hf.py", "--vision_model_name_or_path", backbones[0], "--text_model_name_or_path", backbones[1],
                "--train_dir", str(data), "--output_dir", str(output_dir), "--do_train", "--max_steps", "2",
                "--per_device_train_batch_size", "2", "--lora_r", "4", "--save_strategy", "steps", "--save_steps", "1",
                "--report_to", "none", "--use_cpu", "--disable_tqdm", "true"]
    try:
        train_hf.main()
    finally:
        sys.argv = original
    return output_dir


def test_train_hf_writes_weights_as_safetensors_only(short_run):
    final = [name for name in pickles_in(short_run) if not name.startswith("checkpoint-")]
    assert final == []
    assert (short_run / "model.safetensors").is_file() and (short_run / "adapter" / "adapter_model.safetensors").is_file()
    checkpoints = sorted(short_run.glob("checkpoint-*"))
    assert checkpoints and all((checkpoint / "adapter_model.safetensors").is_file() for checkpoint in checkpoints)
    resume_state = {name.split("/")[-1] for name in pickles_in(short_run) if name.startswith("checkpoint-")}
    assert resume_state <= TRAINER_RESUME_STATE


def project_python_files():
    """Every Python file of the project (package, scripts, demo, benchmarks, Space, metrics), not the tests."""
    skipped = {"tests", "outputs", "build", "dist"}
    for path in sorted(REPO.rglob("*.py")):
        parts = path.relative_to(REPO).parts
        if not (parts[0] in skipped or any(part.startswith(".") or part.endswith(".egg-info") for part in parts)):
            yield path


def test_every_torch_load_in_the_project_sets_weights_only_true():
    calls, unsafe = 0, []
    for path in project_python_files():
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Attribute):
                continue
            owner = node.func.value.id if isinstance(node.func.value, ast.Name) else None
            where = f"{path.relative_to(REPO)}:{node.lineno}"
            if owner == "torch" and node.func.attr == "load":
                calls += 1
                weights_only = [k.value for k in node.keywords if k.arg == "weights_only"]
                if not (weights_only and isinstance(weights_only[0], ast.Constant) and weights_only[0].value is True):
                    unsafe.append(where)
            elif owner in ("pickle", "dill", "joblib") and node.func.attr in ("load", "loads"):
                unsafe.append(where)
    assert unsafe == []
    assert calls >= 1  # the converter's read of the original's projection.pt is among them


AUDITED_IMPORT = textwrap.dedent(
    """
    import json, os, sys
    import torch, transformers  # the user's own imports, before the model's code is loaded

    STDLIB = os.path.dirname(os.__file__)
    events, recording = [], False

    def actor():
        # The innermost caller outside the import system and the standard library: whose code asked for the I/O.
        frame = sys._getframe(2)
        while frame is not None:
            name = frame.f_code.co_filename
            if not (name.startswith("<frozen") or (name.startswith(STDLIB) and "site-packages" not in name)):
                return name
            frame = frame.f_back
        return ""

    def record(event, args):
        if recording and (event == "open" or event.startswith(("socket.", "http.", "urllib.", "subprocess.", "os.system"))):
            flags = args[2] if event == "open" and len(args) > 2 and isinstance(args[2], int) else 0
            events.append({"event": event, "target": str(args[0]) if args else "", "flags": flags, "by": actor()})

    sys.addaudithook(record)
    sys.path.insert(0, sys.argv[1])
    recording = True
    import remote.configuration_loracaptioner, remote.modeling_loracaptioner, remote.processing_loracaptioner
    recording = False
    print(json.dumps(events))
    """
)


def test_remote_code_files_do_no_io_of_their_own_when_imported(tmp_path):
    """Importing the three Hub files (as transformers does: one package) opens no socket and writes no file; the only
    files their own code opens are Python modules. (transformers' lazy imports, which the files trigger, read package
    metadata and /proc through accelerate, psutil and torch: library code, read-only, listed on failure.)"""
    package = tmp_path / "remote"
    package.mkdir()
    (package / "__init__.py").write_text("")
    for name in REMOTE_CODE_FILES:
        shutil.copy(REPO / "loracaptioner" / "remote_code" / name, package / name)
    (tmp_path / "user.py").write_text(AUDITED_IMPORT)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONDONTWRITEBYTECODE"] = "1"  # Python's own bytecode cache is not the files' I/O
    result = subprocess.run([sys.executable, str(tmp_path / "user.py"), str(tmp_path)], check=False, cwd=tmp_path,
                            env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    events = json.loads(result.stdout.strip().splitlines()[-1])
    assert [event for event in events if event["event"] != "open"] == []
    assert any(event["target"].endswith("modeling_loracaptioner.py") for event in events)  # the hook saw the import
    writes = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND
    assert [event for event in events if event["flags"] & writes] == []
    by_our_code = [event for event in events if event["by"].startswith(str(package))]
    assert [event for event in by_our_code if not re.search(r"\.pyc?$", event["target"])] == []


def test_readme_pins_revision_wherever_it_loads_with_trust_remote_code():
    readme = (REPO / "README.md").read_text()
    code = "\n".join(re.findall(r"```python\n(.*?)```", readme, flags=re.DOTALL))
    loads = [line.strip() for line in code.splitlines() if "trust_remote_code=True" in line]
    assert loads and [line for line in loads if "revision=" not in line] == []
    assert "Pin `revision=`" in readme
