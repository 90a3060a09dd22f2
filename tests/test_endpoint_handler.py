"""The Inference Endpoints handler that every Hub-ready folder carries: run the way huggingface-inference-toolkit runs
it (the folder on `sys.path`, `handler.py` imported from its file, `EndpointHandler(model_dir)(body)`), in a Python
where the LoraCaptioner package cannot be imported."""

import ast
import functools
import http.server
import io
import json
import os
import subprocess
import sys
import textwrap
import threading

import pytest
from packaging.requirements import Requirement
from PIL import Image

from loracaptioner.hub import save_for_hub

TOOLKIT = textwrap.dedent(
    """
    import base64, importlib.util, io, json, sys
    from pathlib import Path
    sys.modules["loracaptioner"] = None  # a Hub user, an endpoint container: the package is not there
    from PIL import Image
    model_dir, image_dir, url = sys.argv[1:4]
    # huggingface_inference_toolkit.utils.check_and_register_custom_pipeline_from_directory, as it does it
    sys.path.insert(0, model_dir)
    spec = importlib.util.spec_from_file_location("handler.EndpointHandler", Path(model_dir) / "handler.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["handler.EndpointHandler"] = module
    spec.loader.exec_module(module)
    handler = module.EndpointHandler(model_dir)

    pngs = [(Path(image_dir) / f"{i}.png").read_bytes() for i in range(2)]
    encoded = base64.b64encode(pngs[0]).decode()
    bodies = {
        "bytes": {"inputs": pngs[0]},
        "base64": {"inputs": encoded},
        "data_url": {"inputs": "data:image/png;base64," + encoded},
        "url": {"inputs": url},
        "pil": {"inputs": Image.open(io.BytesIO(pngs[0]))},  # what the toolkit makes of an image/png body
        "beam": {"inputs": encoded, "parameters": {"num_beams": 3, "max_new_tokens": 8}},
        "two": {"inputs": [pngs[0], base64.b64encode(pngs[1]).decode()]},
        "two_beams_back": {"inputs": encoded, "parameters": {"num_beams": 3, "num_return_sequences": 2}},
        "prompt": {"inputs": encoded, "parameters": {"prompt": "a photo of"}},
        # bad requests
        "no_inputs": {"parameters": {"num_beams": 2}},
        "not_base64": {"inputs": "this is not an image"},
        "not_an_image": {"inputs": base64.b64encode(b"hello, world").decode()},
        "a_number": {"inputs": 42},
        "unknown_parameter": {"inputs": encoded, "parameters": {"beams": 3}},
        "wrong_type": {"inputs": encoded, "parameters": {"num_beams": "three"}},
        "dead_url": {"inputs": url.rsplit("/", 1)[0] + "/missing.png"},
    }
    answers = {}
    for name, body in bodies.items():
        try:
            answers[name] = {"output": handler(body)}
        except Exception as error:  # noqa: BLE001 - the toolkit turns any exception into a 400 with its message
            answers[name] = {"error": f"{type(error).__name__}: {error}"}
    print(json.dumps(answers))
    """
)


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def captions(model, processor, images, **options) -> list[str]:
    ids = model.generate(**processor(images=images, text=options.pop("prompt", None)), **options)
    return [caption.strip() for caption in processor.batch_decode(ids, skip_special_tokens=True)]


@pytest.fixture()
def image_server(tmp_path):
    root = tmp_path / "site"
    root.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield root, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_saved_folder_carries_a_handler_that_imports_only_torch_transformers_and_pillow(model, processor, tmp_path):
    folder = save_for_hub(model, processor, tmp_path / "model")
    handler_source = (folder / "handler.py").read_text()
    imported = set()
    for node in ast.walk(ast.parse(handler_source)):
        if isinstance(node, ast.Import):
            imported |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module != "__future__":
            imported.add(node.module.split(".")[0])
    assert imported - set(sys.stdlib_module_names) == {"torch", "transformers", "PIL"}
    assert "class EndpointHandler" in handler_source
    requirements = [Requirement(line) for line in (folder / "requirements.txt").read_text().splitlines() if line]
    assert {requirement.name for requirement in requirements} == {"transformers", "pillow", "sentencepiece"}
    assert next(r for r in requirements if r.name == "transformers").specifier.contains("5.20.0")


def test_endpoint_handler_called_as_the_toolkit_calls_it_captions_like_generate(model, processor, images, tmp_path,
                                                                              image_server):
    folder = save_for_hub(model, processor, tmp_path / "model")
    root, base_url = image_server
    pictures = [Image.open(io.BytesIO(png_bytes(image))) for image in images[:2]]  # what the handler will decode
    for i, picture in enumerate(pictures):
        (tmp_path / f"{i}.png").write_bytes(png_bytes(picture))
    (root / "0.png").write_bytes(png_bytes(pictures[0]))
    script = tmp_path / "toolkit.py"
    script.write_text(TOOLKIT)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_MODULES_CACHE=str(tmp_path / "modules"), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, str(script), str(folder), str(tmp_path), f"{base_url}/0.png"],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    answers = json.loads(result.stdout.strip().splitlines()[-1])

    greedy = captions(model, processor, pictures[:1])
    for name in ("bytes", "base64", "data_url", "url", "pil"):
        assert answers[name] == {"output": [{"generated_text": greedy[0]}]}, name
    beam = captions(model, processor, pictures[:1], num_beams=3, max_new_tokens=8)
    assert answers["beam"] == {"output": [{"generated_text": beam[0]}]}
    assert answers["two"] == {"output": [[{"generated_text": c}] for c in captions(model, processor, pictures)]}
    two_back = captions(model, processor, pictures[:1], num_beams=3, num_return_sequences=2)
    assert answers["two_beams_back"] == {"output": [{"generated_text": c} for c in two_back]}
    prompted = answers["prompt"]["output"][0]["generated_text"]
    assert prompted == captions(model, processor, pictures[:1], prompt="a photo of")[0]
    assert prompted.startswith("a photo of")

    errors = {name: answer.get("error", "") for name, answer in answers.items()}
    assert errors["no_inputs"].startswith('ValueError: the request needs "inputs"')
    assert errors["not_base64"].startswith("ValueError: inputs: a string must be an http(s) URL or a base64")
    assert errors["not_an_image"].startswith("ValueError: inputs: not an image that Pillow can read")
    assert errors["a_number"].startswith("ValueError: inputs: expected image bytes, a base64 string or an http(s)")
    assert errors["unknown_parameter"].startswith('ValueError: unknown parameter "beams"; accepted:')
    assert errors["wrong_type"] == "ValueError: parameter \"num_beams\" must be int, got str 'three'"
    assert errors["dead_url"].startswith("ValueError: inputs: cannot download") and "404" in errors["dead_url"]
