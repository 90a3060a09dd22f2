"""The demo learns everything it knows (demo/): no demo code writes into a model, the base starts as the model's own
random initialisation, every trained model is what the recorded train_hf.py commands produce, and configs/demo.yaml
is the LoRA stage."""

import ast
import json
import os
import shlex
import subprocess
import sys

import pytest
import torch
import yaml
from safetensors.torch import load_file

from conftest import REPO

sys.path.insert(0, str(REPO / "demo"))
import run_demo  # noqa: E402

from loracaptioner import LoraCaptionerConfig, LoraCaptionerForConditionalGeneration  # noqa: E402

DEMO_FILES = sorted((REPO / "demo").glob("*.py"))
# Names through which code reaches into a module's tensors or behaviour: tensors (.data, .weight, .bias), any
# in-place tensor op (a name ending in "_": copy_, fill_, zero_, normal_, masked_fill_...), hooks, state dicts,
# module walks, replacing layers, and the gradient switches one writes weights under.
FORBIDDEN_NAMES = {
    "data", "weight", "bias", "load_state_dict", "state_dict", "named_parameters", "modules", "named_modules",
    "children", "named_children", "buffers", "named_buffers", "get_parameter", "get_submodule",
    "register_forward_hook", "register_forward_pre_hook", "register_full_backward_hook",
    "register_full_backward_pre_hook", "register_backward_hook", "register_module", "register_parameter",
    "register_buffer", "set_input_embeddings", "set_output_embeddings", "no_grad", "inference_mode", "init",
    "setattr", "delattr", "getattr", "__dict__", "vars",
}  # fmt: skip


def writes_into_models(path) -> list[str]:
    """Every place in a file that could write into a model: a forbidden name, an attribute assigned, or
    `.parameters()` used for anything but counting (`sum(p.numel() for p in ....parameters())`)."""
    tree = ast.parse(path.read_text(), str(path))
    counting = {id(generator.iter) for node in ast.walk(tree) if isinstance(node, ast.GeneratorExp)
                for generator in node.generators
                if isinstance(node.elt, ast.Call) and getattr(node.elt.func, "attr", None) == "numel"}
    problems = []
    for node in ast.walk(tree):
        name = node.attr if isinstance(node, ast.Attribute) else node.id if isinstance(node, ast.Name) else None
        where = f"{path.name}:{getattr(node, 'lineno', '?')}"
        if name in FORBIDDEN_NAMES or (name and name.endswith("_") and not name.startswith("_")):
            problems.append(f"{where} uses {name!r}")
        if isinstance(node, (ast.Assign, ast.AugAssign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            problems += [f"{where} assigns an attribute" for target in targets for sub in ast.walk(target)
                         if isinstance(sub, ast.Attribute)]
        if isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "parameters":
            if id(node) not in counting:
                problems.append(f"{where} uses .parameters() for something else than counting")
    return problems


def test_no_demo_code_writes_into_a_model():
    assert DEMO_FILES and [path.name for path in DEMO_FILES if path.name == "run_demo.py"]
    problems = [problem for path in DEMO_FILES for problem in writes_into_models(path)]
    assert problems == []


def test_the_check_catches_hand_wiring(tmp_path):
    wired = tmp_path / "wired.py"
    wired.write_text(
        "import torch\n"
        "with torch.no_grad():\n"
        "    model.lm_head.weight[3] = 0\n"
        "model.decoder.embed_tokens.weight.data.copy_(other)\n"
        "model.encoder.bridge = torch.nn.Identity()\n"
        "for p in model.parameters():\n"
        "    p.mul_(0)\n"
        "handle = layer.register_forward_hook(lambda *args: None)\n"
    )
    problems = "\n".join(writes_into_models(wired))
    for expected in ("'no_grad'", "'weight'", "'data'", "'copy_'", "assigns an attribute", "'mul_'",
                     ".parameters()", "'register_forward_hook'"):
        assert expected in problems


def test_the_base_starts_as_the_models_own_random_initialisation(tmp_path):
    run_demo.build_base_init(tmp_path)
    saved = load_file(tmp_path / "model.safetensors")
    torch.manual_seed(run_demo.BASE_MODEL["seed"])
    constructed = LoraCaptionerForConditionalGeneration(LoraCaptionerConfig.from_pretrained(tmp_path)).state_dict()
    assert saved.keys() == constructed.keys()
    for name, tensor in constructed.items():
        assert torch.equal(saved[name], tensor), name


def train_hf_commands(demo: "os.PathLike") -> list[tuple[dict, list[str]]]:
    """The (environment, arguments) of every train_hf.py run the demo recorded in commands.sh."""
    commands = []
    for line in (demo / "commands.sh").read_text().splitlines():
        if line and not line.startswith("#"):
            words = shlex.split(line)
            env = dict(word.split("=", 1) for word in words[: words.index("python")])
            commands.append((env, words[words.index("train_hf.py") + 1 :]))
    return commands


def run_train_hf(arguments: list[str], env: dict) -> None:
    completed = subprocess.run([sys.executable, "train_hf.py", *arguments], cwd=REPO, capture_output=True, text=True,
                               env={**os.environ, "HF_HUB_OFFLINE": "1", **env}, timeout=600)
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]


def assert_same_weights(folder, other) -> None:
    first, second = load_file(folder / "model.safetensors"), load_file(other / "model.safetensors")
    assert first.keys() == second.keys()
    for name in first:
        assert torch.equal(first[name], second[name]), name


@pytest.fixture(scope="module")
def quick_demo(tmp_path_factory):
    """`make demo` in miniature: 48 training images, 3 steps per stage."""
    demo = tmp_path_factory.mktemp("demo")
    completed = subprocess.run([sys.executable, "demo/run_demo.py", "--quick", "--output_dir", str(demo)], cwd=REPO,
                               capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=900)
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    return demo


def test_the_demo_reports_four_rows_on_the_same_test_images(quick_demo):
    report = (quick_demo / "report.md").read_text()
    for name in ("base, no adapter", "bridge only (LoRA off)", "LoRA r=8, alpha=16, 7 targets + bridge",
                 "full decoder fine-tuning (--lora_r 0)"):
        assert f"| {name} |" in report
    assert (quick_demo / "report.png").stat().st_size > 10_000
    assert len(train_hf_commands(quick_demo)) == 4  # base, bridge, LoRA, full fine-tuning


def test_the_bridge_only_row_changes_nothing_but_the_bridge(quick_demo):
    base, bridge = load_file(quick_demo / "base" / "model.safetensors"), load_file(
        quick_demo / "bridge" / "model.safetensors")
    changed = {name for name in base if not torch.equal(base[name], bridge[name])}
    assert changed == {"encoder.bridge.weight", "encoder.bridge.bias"}


def test_the_base_is_what_its_train_hf_command_makes(quick_demo, tmp_path):
    env, arguments = train_hf_commands(quick_demo)[0]
    arguments[arguments.index("--output_dir") + 1] = str(tmp_path / "base")
    run_train_hf(arguments, env)
    assert_same_weights(quick_demo / "base", tmp_path / "base")


def test_configs_demo_yaml_is_the_lora_stage_and_runs(quick_demo, tmp_path):
    """configs/demo.yaml, pointed at the quick demo's folders and cut to its 3 steps, gives the demo's LoRA model."""
    config = yaml.safe_load((REPO / "configs" / "demo.yaml").read_text())
    env, recorded = next((env, words) for env, words in train_hf_commands(quick_demo)
                         if words[words.index("--output_dir") + 1] == str(quick_demo / "model"))
    for key in ("model_name_or_path", "train_dir", "validation_dir", "output_dir"):
        config[key] = str(quick_demo / os.path.relpath(REPO / config[key], REPO / "outputs" / "demo"))
    assert run_demo.command_line(config) + ["--max_steps", "3"] == recorded  # the yaml is the demo's LoRA run

    config.update(output_dir=str(tmp_path / "model"), max_steps=3)
    (tmp_path / "demo.yaml").write_text(yaml.safe_dump(config))
    run_train_hf([str(tmp_path / "demo.yaml")], env)
    assert_same_weights(quick_demo / "model", tmp_path / "model")
    assert json.loads((tmp_path / "model" / "adapter" / "adapter_config.json").read_text())["r"] == 8
