"""What a push to the Hub commits, without a network: huggingface_hub's real upload code runs against an in-memory
Hub behind its documented HTTP seam (`huggingface_hub.set_client_factory` + an httpx2 mock transport).

The fake Hub answers `uploadMode: regular` for every file, so each file's bytes travel inside the commit request and
the test sees exactly what would be committed. The real Hub sends large files (the weights) through LFS/Xet instead;
that transfer is huggingface_hub's own, and is not exercised here.
"""

import base64
import hashlib
import io
import json
import sys
import threading
from pathlib import Path

import httpx2
import numpy as np
import pytest
from huggingface_hub import ModelCard, constants, set_client_factory
from huggingface_hub.utils._http import default_client_factory, hf_request_event_hook
from PIL import Image
from test_remote_code import run_as_hub_user

import train_hf  # the repository root is on sys.path (conftest)
from loracaptioner.hub import missing_hub_files, push_folder, push_to_hub

REPO_ID = "someone/tiny-captioner"


class FakeHub:
    """The Hub endpoints a model push uses (create repo, validate README metadata, preupload, commit, resolve), in
    memory. Any other request fails the test."""

    def __init__(self):
        self.files: dict[str, dict[str, bytes]] = {}  # repo id -> path -> content, after all commits
        self.commits: list[dict] = []  # {"repo", "message", "paths"}
        self.unexpected: list[str] = []
        self.lock = threading.Lock()  # the Trainer pushes from background threads

    def __call__(self, request: httpx2.Request) -> httpx2.Response:
        with self.lock:
            return self.answer(request)

    def answer(self, request: httpx2.Request) -> httpx2.Response:
        if request.url.host != "huggingface.co":  # other hosts (download counters, ...): no network, as in CI
            raise httpx2.ConnectError(f"fake Hub: no network for {request.url}", request=request)
        method, path, base = request.method, request.url.path, f"{request.url.scheme}://{request.url.host}"
        parts = path.strip("/").split("/")
        if method == "POST" and path == "/api/repos/create":
            body = json.loads(request.content)
            repo_id = f"{body['organization'] or 'someone'}/{body['name']}"
            self.files.setdefault(repo_id, {})
            return httpx2.Response(200, json={"url": f"{base}/{repo_id}", "name": repo_id})
        if method == "POST" and path == "/api/validate-yaml":  # the Hub checks README metadata before a commit
            try:
                ModelCard(json.loads(request.content)["content"], ignore_metadata_errors=False)
            except Exception as error:  # noqa: BLE001 - the Hub answers 400 with the reason
                return httpx2.Response(400, json={"errors": [{"message": str(error)}]})
            return httpx2.Response(200, json={"warnings": []})
        if method == "POST" and parts[:2] == ["api", "models"] and parts[4] == "preupload":
            files = json.loads(request.content)["files"]
            return httpx2.Response(200, json={"files": [
                {"path": file["path"], "uploadMode": "regular", "shouldIgnore": False} for file in files]})
        if method == "POST" and parts[:2] == ["api", "models"] and parts[4] == "commit":
            return self.commit("/".join(parts[2:4]), request.content, base)
        if method == "GET" and path == "/api/agent-harnesses":  # huggingface_hub's user-agent registry
            return httpx2.Response(200, json={"standardEnvVars": [], "harnesses": {}})
        if method in ("HEAD", "GET") and len(parts) > 4 and parts[2] == "resolve":
            content = self.files.get("/".join(parts[:2]), {}).get("/".join(parts[4:]))
            if content is None:
                return httpx2.Response(404, headers={"X-Error-Code": "EntryNotFound"})
            headers = {"X-Repo-Commit": self.commits[-1]["oid"], "ETag": f'"{hashlib.sha1(content).hexdigest()}"',
                       "Content-Length": str(len(content))}
            return httpx2.Response(200, headers=headers, content=content if method == "GET" else b"")
        self.unexpected.append(f"{method} {path}")
        return httpx2.Response(400, json={"error": f"fake Hub: unexpected {method} {path}"})

    def commit(self, repo_id: str, payload: bytes, base: str) -> httpx2.Response:
        lines = [json.loads(line) for line in payload.splitlines() if line.strip()]
        header = next(line["value"] for line in lines if line["key"] == "header")
        added = {}
        for line in lines:
            if line["key"] == "file":
                added[line["value"]["path"]] = base64.b64decode(line["value"]["content"])
            elif line["key"] != "header":
                self.unexpected.append(f"commit operation {line['key']}")
        self.files.setdefault(repo_id, {}).update(added)
        oid = hashlib.sha1(payload).hexdigest()
        self.commits.append({"repo": repo_id, "message": header["summary"], "paths": set(added), "oid": oid})
        return httpx2.Response(200, json={"commitUrl": f"{base}/{repo_id}/commit/{oid}", "commitOid": oid,
                                          "pullRequestUrl": None})

    def materialize(self, repo_id: str, folder: Path) -> Path:
        """The repo's files, exactly as committed, in a fresh folder."""
        for path, content in self.files[repo_id].items():
            (folder / path).parent.mkdir(parents=True, exist_ok=True)
            (folder / path).write_bytes(content)
        return folder


def serve(fake: FakeHub, monkeypatch, tmp_path):
    """Route huggingface_hub's HTTP client to `fake` for one test (the network boundary, nothing else)."""
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)  # conftest sets HF_HUB_OFFLINE=1 for everything else
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    monkeypatch.setattr(constants, "AGENT_HARNESSES_PATH", str(tmp_path / "agent_harnesses.json"))
    monkeypatch.delenv("HF_TOKEN", raising=False)
    set_client_factory(lambda: httpx2.Client(transport=httpx2.MockTransport(fake), follow_redirects=True,
                                             event_hooks={"request": [hf_request_event_hook]}))
    yield fake
    set_client_factory(default_client_factory)
    assert not fake.unexpected, fake.unexpected


@pytest.fixture()
def hub(monkeypatch, tmp_path):
    yield from serve(FakeHub(), monkeypatch, tmp_path)


def code_files(folder: Path) -> set[str]:
    """Every file named by an auto_map in the folder's config, processor and tokenizer configs."""
    names = set()
    for config in ("config.json", "processor_config.json", "tokenizer_config.json"):
        for reference in json.loads((folder / config).read_text()).get("auto_map", {}).values():
            names.add(reference.split(".")[0] + ".py")
    return names


def assert_hub_ready(paths: set[str], folder: Path):
    assert {"configuration_loracaptioner.py", "modeling_loracaptioner.py", "processing_loracaptioner.py"} <= paths
    assert code_files(folder) <= paths
    assert {"config.json", "model.safetensors", "generation_config.json", "processor_config.json",
            "tokenizer_config.json", "tokenizer.json", "README.md"} <= paths
    assert not [path for path in paths if path.endswith((".bin", ".pt", ".pth", ".pkl", ".ckpt"))]  # no pickles


def test_push_to_hub_commits_code_weights_processor_generation_config_and_card_at_once(model, processor, hub, tmp_path):
    push_to_hub(model, processor, REPO_ID, eval_metrics={"eval_cider": 0.25, "eval_bleu_4": 0.125})
    assert len(hub.commits) == 1
    repo = hub.materialize(REPO_ID, tmp_path / "repo")
    assert_hub_ready(hub.commits[0]["paths"], repo)
    card = ModelCard.load(repo / "README.md")
    assert card.data.pipeline_tag == "image-to-text" and "custom_code" in card.data.tags
    assert {result.metric_type: result.metric_value for result in card.data.eval_results} == {
        "cider": 0.25, "bleu_4": 0.125}
    assert f'repo_id = "{REPO_ID}"' in card.text


def test_the_committed_files_alone_load_with_trust_remote_code_without_loracaptioner(model, processor, hub, tmp_path):
    push_to_hub(model, processor, REPO_ID)
    repo = hub.materialize(REPO_ID, tmp_path / "repo")
    result, weights = run_as_hub_user(repo, tmp_path)
    assert result["module"].startswith("transformers_modules.")
    assert all(np.array_equal(weights[name].numpy(), tensor.numpy()) for name, tensor in model.state_dict().items())


def test_model_and_processor_push_to_hub_upload_code_and_keep_the_card_already_there(model, processor, hub, tmp_path):
    """transformers' own `push_to_hub` (two commits) uploads the code files with the weights and the processor, and
    keeps the repo's LoraCaptioner card instead of writing its generic one."""
    push_to_hub(model, processor, REPO_ID, eval_metrics={"eval_cider": 0.5})
    model.push_to_hub(REPO_ID)
    processor.push_to_hub(REPO_ID)
    model_paths, processor_paths = hub.commits[1]["paths"], hub.commits[2]["paths"]
    assert {"config.json", "model.safetensors", "generation_config.json", "configuration_loracaptioner.py",
            "modeling_loracaptioner.py"} <= model_paths
    assert {"processor_config.json", "tokenizer.json", "processing_loracaptioner.py"} <= processor_paths
    repo = hub.materialize(REPO_ID, tmp_path / "repo")
    assert_hub_ready(model_paths | processor_paths, repo)
    card = ModelCard.load(repo / "README.md")
    assert card.data.eval_results[0].metric_value == 0.5 and "automatically generated" not in card.text


def test_push_folder_refuses_a_folder_that_would_not_load_before_uploading(model, hub, tmp_path):
    model.save_pretrained(tmp_path / "no-processor")
    with pytest.raises(ValueError, match=r"missing processor_config\.json, README\.md"):
        push_folder(tmp_path / "no-processor", REPO_ID)
    assert not hub.commits and not hub.files


def png(colour) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (32, 32), colour).save(buffer, format="PNG")
    return buffer.getvalue()


def test_train_hf_push_to_hub_commits_the_merged_folder_without_checkpoints_or_pickles(backbones, hub, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    with open(data / "metadata.jsonl", "w") as metadata:
        for i, (name, colour) in enumerate([("red", (220, 30, 30)), ("blue", (30, 30, 220))] * 2):
            (data / f"{i}.png").write_bytes(png(colour))
            metadata.write(json.dumps({"file_name": f"{i}.png", "caption": f"a {name} square"}) + "\n")
    output_dir = tmp_path / "run"
    argv = ["train_hf.py", "--vision_model_name_or_path", backbones[0], "--text_model_name_or_path", backbones[1],
            "--train_dir", str(data), "--validation_dir", str(data), "--output_dir", str(output_dir),
            "--do_train", "--do_eval", "--max_steps", "2", "--per_device_train_batch_size", "4",
            "--save_strategy", "steps", "--save_steps", "1", "--report_to", "none", "--use_cpu",
            "--disable_tqdm", "true", "--generation_max_length", "6", "--push_to_hub", "--hub_model_id", REPO_ID]
    original, sys.argv = sys.argv, argv
    try:
        train_hf.main()
    finally:
        sys.argv = original
    repo = hub.materialize(REPO_ID, tmp_path / "repo")
    assert [commit["message"] for commit in hub.commits] == ["train_hf.py"]  # one commit: the final folder
    paths = hub.commits[0]["paths"]
    assert_hub_ready(paths, repo)
    assert missing_hub_files(repo) == []
    assert not [path for path in paths if path.startswith(("checkpoint-", "runs/"))]
    assert "adapter_config.json" not in paths  # a root adapter would make peft users load an adapter, not the model
    assert "eval_cider" in json.loads((output_dir / "all_results.json").read_text())
    assert ModelCard.load(repo / "README.md").data.eval_results[0].metric_type == "cider"
