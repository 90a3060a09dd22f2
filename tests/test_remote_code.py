"""A saved folder is all a Hub user gets: it must load and caption where `loracaptioner` is not importable."""

import json
import os
import subprocess
import sys
import textwrap

import torch

REMOTE_USER = textwrap.dedent(
    """
    import json, sys, warnings
    # The package may be installed in this environment (editable); a Hub user does not have it. Make every
    # import of it fail, so only the folder's own code files can serve.
    sys.modules["loracaptioner"] = None
    warnings.simplefilter("error", DeprecationWarning)
    warnings.simplefilter("error", FutureWarning)
    try:
        import loracaptioner
        sys.exit("loracaptioner must not be importable here")
    except ImportError:
        pass
    import numpy as np, torch
    from PIL import Image
    from safetensors.torch import save_file
    from transformers import AutoModel, AutoModelForImageTextToText, AutoProcessor, pipeline
    folder = sys.argv[1]
    model = AutoModelForImageTextToText.from_pretrained(folder, trust_remote_code=True).eval()
    processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
    assert type(AutoModel.from_pretrained(folder, trust_remote_code=True)) is type(model)
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (40, 60, 3), dtype=np.uint8)),
              Image.fromarray(rng.integers(0, 255, (90, 30, 3), dtype=np.uint8))]
    ids = model.generate(**processor(images=images, return_tensors="pt"), num_beams=4)
    captor = pipeline("image-text-to-text", model=folder, trust_remote_code=True)
    piped = [captor(images=image, text="")[0]["generated_text"] for image in images]
    piped_list = [out["generated_text"] for out in captor(images=images, text=["", ""], batch_size=2)]
    prompted = [out["generated_text"] for out in captor(images=images, text=["a photo of"] * 2)]
    prompted_ids = model.generate(**processor(images=images, text="a photo of", return_tensors="pt"))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, sys.argv[2])
    print(json.dumps({"captions": processor.batch_decode(ids, skip_special_tokens=True), "pipeline": piped,
                      "pipeline_list": piped_list, "pipeline_prompt": prompted,
                      "prompted": processor.batch_decode(prompted_ids, skip_special_tokens=True),
                      "module": type(model).__module__}))
    """
)


def run_as_hub_user(folder, tmp_path) -> tuple[dict, dict]:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_MODULES_CACHE=str(tmp_path / "modules"), HF_HUB_OFFLINE="1", PYTHONWARNINGS="")
    script = tmp_path / "user.py"
    script.write_text(REMOTE_USER)
    result = subprocess.run(
        [sys.executable, str(script), str(folder), str(tmp_path / "weights.safetensors")],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "deprecat" not in result.stderr.lower(), result.stderr[-3000:]
    from safetensors.torch import load_file

    return json.loads(result.stdout.strip().splitlines()[-1]), load_file(tmp_path / "weights.safetensors")


def test_saved_folder_carries_code_and_auto_map(model, processor, tmp_path):
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    names = set(os.listdir(tmp_path))
    assert {"configuration_loracaptioner.py", "modeling_loracaptioner.py", "processing_loracaptioner.py"} <= names
    auto_map = json.loads((tmp_path / "config.json").read_text())["auto_map"]
    assert set(auto_map) == {"AutoConfig", "AutoModel", "AutoModelForImageTextToText"}
    processor_map = json.loads((tmp_path / "processor_config.json").read_text())["auto_map"]
    assert processor_map == {"AutoProcessor": "processing_loracaptioner.LoraCaptionerProcessor"}
    for reference in [*auto_map.values(), *processor_map.values()]:
        assert reference.split(".")[0] + ".py" in names


def test_remote_code_load_gives_identical_weights_and_captions(model, processor, images, tmp_path):
    folder = tmp_path / "model"
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    result, weights = run_as_hub_user(folder, tmp_path)
    assert result["module"].startswith("transformers_modules.")
    for name, tensor in model.state_dict().items():
        assert torch.equal(weights[name], tensor), name
    same_images = images[:2]  # the subprocess rebuilds them from the same seed
    beam = processor.batch_decode(model.generate(**processor(images=same_images), num_beams=4), skip_special_tokens=True)
    assert result["captions"] == beam
    greedy = processor.batch_decode(model.generate(**processor(images=same_images)), skip_special_tokens=True)
    assert result["pipeline"] == greedy
    assert result["pipeline_list"] == greedy  # a list of images in one call, batched
    assert result["pipeline_prompt"] == result["prompted"]  # text= prompts: the caption continues the prompt
    assert all(caption.startswith("a photo of") for caption in result["prompted"])
