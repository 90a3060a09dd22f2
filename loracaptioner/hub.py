"""Hub-ready folders and pushes: model + processor + code files + generation config + model card, in one commit.

`model.push_to_hub()` and `processor.push_to_hub()` alone upload their files in two commits, each with transformers'
generic README (unless the repo has a card already); `push_to_hub` here writes LoraCaptioner's card and commits
everything at once. The card machinery stays out of the model class (the remote-code files import only torch and
transformers).
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

from huggingface_hub import CommitInfo, HfApi

from .model_card import write_model_card

# Never uploaded from a model folder: Trainer checkpoints and logs, pickles (`training_args.bin`, `*.pt`), and a
# stray root-level adapter (the Trainer's own hub push copies one there; transformers would then load the folder
# as a peft adapter instead of as the merged model). `adapter/` itself is kept: it is the LoRA adapter, for peft.
IGNORE_PATTERNS = ["checkpoint-*", "runs/*", "*.bin", "*.pt", "*.pth", "*.pkl", "*.ckpt",
                   "adapter_config.json", "adapter_model.*", "__pycache__/*", "*.pyc"]
# What Inference Endpoints installs before it imports handler.py (torch comes with its containers).
ENDPOINT_REQUIREMENTS = "transformers>=5.20,<6\npillow>=10.0\nsentencepiece\n"


def write_endpoint_handler(folder) -> None:
    """`handler.py` (`EndpointHandler`, which Hugging Face Inference Endpoints runs: see `loracaptioner/handler.py`)
    and its `requirements.txt`, into a Hub-ready folder."""
    folder = Path(folder)
    shutil.copyfile(Path(__file__).with_name("handler.py"), folder / "handler.py")
    (folder / "requirements.txt").write_text(ENDPOINT_REQUIREMENTS)


def save_for_hub(model, processor, output_dir, eval_metrics: dict | None = None, **card_options) -> Path:
    """The one way a Hub-ready LoraCaptioner folder is written (train_hf.py, convert_original, `push_to_hub`): `model`
    and `processor` (weights as safetensors, code files, auto_map, generation config), the model card, written from
    what the folder then holds (`card_options`: `repo_id`, `revision`, `space_id`, ... of `write_model_card`), and
    the Inference Endpoints `handler.py` with its `requirements.txt`. `eval_metrics` (`eval_cider`, ...: the card's
    model-index) are kept as the folder's `eval_results.json`, where a training run leaves its own."""
    output_dir = Path(output_dir)
    model.save_pretrained(output_dir)
    processor.save_pretrained(output_dir)
    if eval_metrics is not None:
        (output_dir / "eval_results.json").write_text(json.dumps(eval_metrics, indent=2) + "\n")
    write_model_card(output_dir, **card_options)
    write_endpoint_handler(output_dir)
    return output_dir


def missing_hub_files(folder) -> list[str]:
    """What a folder lacks to load from the Hub with `trust_remote_code=True` ([] when nothing)."""
    folder = Path(folder)
    needed = ["config.json", "generation_config.json", "processor_config.json", "README.md"]
    missing = [name for name in needed if not (folder / name).is_file()]
    if not any((folder / name).is_file() for name in ("model.safetensors", "model.safetensors.index.json")):
        missing.append("model.safetensors")
    for config_name in ("config.json", "processor_config.json"):
        if (folder / config_name).is_file():
            auto_map = json.loads((folder / config_name).read_text()).get("auto_map", {})
            if not auto_map:
                missing.append(f"auto_map in {config_name}")
            for reference in auto_map.values():
                code_file = reference.split(".")[0] + ".py"
                if not (folder / code_file).is_file() and code_file not in missing:
                    missing.append(code_file)
    return missing


def push_folder(folder, repo_id: str, *, token: str | bool | None = None, private: bool | None = None,
                revision: str | None = None, commit_message: str = "Upload LoraCaptioner",
                create_pr: bool = False) -> CommitInfo:
    """Upload a saved LoraCaptioner folder (from `save_for_hub` or train_hf.py) to `repo_id` in one commit, without
    checkpoints, logs or pickles. Raises `ValueError` naming what is missing before anything is uploaded. A folder
    without the Inference Endpoints `handler.py` gets one first."""
    missing = missing_hub_files(folder)
    if missing:
        raise ValueError(f"{folder} is not a loadable LoraCaptioner folder: missing {', '.join(missing)}")
    if not (Path(folder) / "handler.py").is_file():
        write_endpoint_handler(folder)
    api = HfApi(token=token)
    repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
    if revision is not None and not create_pr:
        api.create_branch(repo_id, branch=revision, exist_ok=True)
    return api.upload_folder(repo_id=repo_id, folder_path=folder, commit_message=commit_message, revision=revision,
                             create_pr=create_pr, ignore_patterns=list(IGNORE_PATTERNS))


def push_to_hub(model, processor, repo_id: str, *, token: str | bool | None = None, private: bool | None = None,
                revision: str | None = None, commit_message: str = "Upload LoraCaptioner", create_pr: bool = False,
                **card_options) -> CommitInfo:
    """Save `model` + `processor` with a model card (`card_options`, see `write_model_card`) and push them in one
    commit. The card's snippets load `repo_id`."""
    card_options.setdefault("revision", revision)  # the card's snippets pin the branch pushed to
    with tempfile.TemporaryDirectory() as folder:
        save_for_hub(model, processor, folder, repo_id=repo_id, **card_options)
        return push_folder(folder, repo_id, token=token, private=private, revision=revision,
                           commit_message=commit_message, create_pr=create_pr)
