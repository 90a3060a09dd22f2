"""`--quantize int8` (quantization.py): torchao int8 through transformers' `quantization_config`, on the CLI, with an
adapter, saved and loaded back by a Hub user who has torchao but not this package; and the message without torchao.

torchao is an optional extra (`pip install 'loracaptioner[int8]'`) and is not in the main test environment: when it is
installed, transformers imports it in every from_pretrained and it logs "Failed to load ..." on stderr, which the
clean-stderr tests elsewhere would catch. So it is installed once, with pip, into `<repo>/.cache/torchao-<version>/`
(reused; a marker file says it is complete), and the int8 checks run in subprocesses with it on PYTHONPATH. Without a
package index that cannot be built and the torchao tests skip, saying so.
"""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from loracaptioner.cli import main
from loracaptioner.loading import pick_dtype
from loracaptioner.quantization import INSTALL_HINT

REPO = Path(__file__).resolve().parents[1]
TORCHAO_VERSION = "0.18.0"  # the lower bound of the `int8` extra in setup.cfg
TORCHAO_DIR = REPO / ".cache" / f"torchao-{TORCHAO_VERSION}"
MARKER = TORCHAO_DIR / ".complete"


@pytest.fixture(scope="module")
def torchao_path() -> str:
    """A folder holding torchao, for PYTHONPATH: built with pip on first use, then reused."""
    if not MARKER.exists():
        result = subprocess.run(
            [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-compile", "--upgrade", "--target",
             str(TORCHAO_DIR), f"torchao=={TORCHAO_VERSION}"],
            capture_output=True, text=True, timeout=600, check=False)
        if result.returncode != 0:
            pytest.skip(f"cannot install torchao=={TORCHAO_VERSION} with pip (no package index reachable?): "
                        f"{result.stderr.strip()[-1000:]}")
        MARKER.write_text(TORCHAO_VERSION)
    return str(TORCHAO_DIR)


def run_python(script: str, args: list[str], torchao_path: str, cwd: Path, package: bool = True) -> dict:
    """`script` run by this Python with torchao importable (and, unless `package` is False, this package too); its
    last stdout line, as JSON."""
    path = [torchao_path, *([str(REPO)] if package else [])]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(path), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "HF_MODULES_CACHE": str(cwd / "modules")}
    (cwd / "script.py").write_text(textwrap.dedent(script))
    result = subprocess.run([sys.executable, "script.py", *args], cwd=cwd, env=env, capture_output=True, text=True,
                            timeout=300, check=False)
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def write_images(folder: Path, count: int = 3) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        pixels = np.random.default_rng(i).integers(0, 255, (30 + 10 * i, 40, 3), dtype=np.uint8)
        paths.append(str(folder / f"{i}.png"))
        Image.fromarray(pixels).save(paths[-1])
    return paths


# What the script below shares: the linear layers by kind of weight, and captions from a model's own generate().
COMMON = """
    import json, sys
    import torch
    from PIL import Image
    from torchao.quantization import Int8Tensor

    def weight_kinds(model):
        kinds = {}
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.Linear):
                kinds.setdefault("int8" if isinstance(module.weight, Int8Tensor) else "float", []).append(name)
        return kinds

    def captions(model, processor, paths):
        inputs = processor(images=[Image.open(path) for path in paths], return_tensors="pt")
        inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
        with torch.inference_mode():
            ids = model.generate(**inputs, max_new_tokens=8)
        return [caption.strip() for caption in processor.batch_decode(ids, skip_special_tokens=True)]
"""

USER = COMMON + """
    from loracaptioner import LoraCaptionerForConditionalGeneration, LoraCaptionerProcessor
    from loracaptioner.cli import main
    from loracaptioner.loading import load_model
    from loracaptioner.quantization import quantization_config

    model_dir, adapter, merged_dir, saved_dir, output = sys.argv[1:6]
    paths = sys.argv[6:]
    dtype = torch.float32  # what int8 computes in
    processor = LoraCaptionerProcessor.from_pretrained(model_dir)
    # By hand, as the README shows: from_pretrained with the quantization config
    reference = LoraCaptionerForConditionalGeneration.from_pretrained(
        model_dir, dtype=dtype, quantization_config=quantization_config("int8")).eval()
    float_model = LoraCaptionerForConditionalGeneration.from_pretrained(model_dir, dtype=dtype).eval()
    merged = LoraCaptionerForConditionalGeneration.from_pretrained(
        merged_dir, dtype=dtype, quantization_config=quantization_config("int8")).eval()
    # The CLI, and the loader it uses, with and without an adapter
    import contextlib, io
    from loracaptioner.quantization import int8_speedup
    cli_err = io.StringIO()
    with contextlib.redirect_stderr(cli_err):
        code = main(["caption", model_dir, *paths, "--quantize", "int8", "--max-new-tokens", "8", "-q", "-o",
                     output])
    loaded, _ = load_model(model_dir, None, None, torch.device("cpu"), dtype, quantize="int8")
    with_adapter, _ = load_model(model_dir, None, adapter, torch.device("cpu"), dtype, quantize="int8")
    reference.save_pretrained(saved_dir)
    processor.save_pretrained(saved_dir)
    # the saved int8 folder, captioned with the CLI's defaults (no --quantize: it loads as it was saved)
    saved_code = main(["caption", saved_dir, *paths, "--max-new-tokens", "8", "-q", "-o", output + ".saved"])
    cli, cli_saved = ([json.loads(line)["caption"] for line in open(path)] for path in (output, output + ".saved"))
    print(json.dumps({
        "code": code, "cli": cli, "cli_err": cli_err.getvalue(), "int8_speedup": int8_speedup(torch.device("cpu")),
        "reference": captions(reference, processor, paths),
        "float": captions(float_model, processor, paths),
        "saved_code": saved_code, "cli_saved": cli_saved,
        "loaded": captions(loaded, processor, paths), "kinds": weight_kinds(loaded),
        "adapter": captions(with_adapter, processor, paths), "adapter_kinds": weight_kinds(with_adapter),
        "merged": captions(merged, processor, paths), "unmerged": captions(reference, processor, paths),
    }))
"""

HUB_USER = COMMON + """
    sys.modules["loracaptioner"] = None  # a Hub user: the folder's own code files serve, not this package
    try:
        import loracaptioner
        sys.exit("loracaptioner must not be importable here")
    except ImportError:
        pass
    from transformers import AutoModelForImageTextToText, AutoProcessor

    folder, paths = sys.argv[1], sys.argv[2:]
    model = AutoModelForImageTextToText.from_pretrained(folder, trust_remote_code=True).eval()
    processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
    print(json.dumps({"captions": captions(model, processor, paths), "kinds": weight_kinds(model),
                      "module": type(model).__module__}))
"""


@pytest.fixture(scope="module")
def image_bound_model_dir(model_dir, tmp_path_factory) -> str:
    """The tiny model with its decoder's cross-attention outputs scaled 30x: its captions follow the image closely
    enough that int8's rounding in the image encoder changes them (the tiny model's own hardly heed the image)."""
    from loracaptioner import LoraCaptionerForConditionalGeneration, LoraCaptionerProcessor

    folder = tmp_path_factory.mktemp("image-bound")
    model = LoraCaptionerForConditionalGeneration.from_pretrained(model_dir)
    with torch.no_grad():
        for name, weight in model.decoder.named_parameters():
            if name.endswith("EncDecAttention.o.weight"):
                weight.mul_(30)
    model.save_pretrained(folder)
    LoraCaptionerProcessor.from_pretrained(model_dir).save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def adapter(image_bound_model_dir, tmp_path_factory) -> tuple[str, str]:
    """A peft adapter with random LoRA weights (it changes the model), and the model with it merged, saved."""
    import warnings

    from peft import PeftModel, get_peft_model

    from loracaptioner import LoraCaptionerForConditionalGeneration, LoraCaptionerProcessor
    from loracaptioner.lora import decoder_lora_config

    model_dir, folder = image_bound_model_dir, tmp_path_factory.mktemp("adapter")
    base = LoraCaptionerForConditionalGeneration.from_pretrained(model_dir)
    config = decoder_lora_config(base, r=4, alpha=8, dropout=0.0)
    config.init_lora_weights = False
    torch.manual_seed(1)
    with warnings.catch_warnings():  # peft reads `is_gradient_checkpointing`, deprecated in transformers 5.24
        warnings.filterwarnings("ignore", "`is_gradient_checkpointing` is deprecated", FutureWarning)
        get_peft_model(base, config).save_pretrained(folder / "adapter")
        merged = PeftModel.from_pretrained(LoraCaptionerForConditionalGeneration.from_pretrained(model_dir),
                                           folder / "adapter").merge_and_unload()
    merged.save_pretrained(folder / "merged")
    LoraCaptionerProcessor.from_pretrained(model_dir).save_pretrained(folder / "merged")
    return str(folder / "adapter"), str(folder / "merged")


@pytest.fixture(scope="module")
def int8_run(image_bound_model_dir, adapter, torchao_path, tmp_path_factory) -> tuple[dict, Path, list[str]]:
    """The USER script's report, its folder (with the saved int8 model) and its images."""
    work = tmp_path_factory.mktemp("int8")
    paths = write_images(work / "images")
    report = run_python(USER, [image_bound_model_dir, *adapter, str(work / "saved"), str(work / "captions.jsonl"),
                               *paths], torchao_path, work)
    return report, work, paths


def test_int8_cli_captions_equal_the_quantized_models_own_generate(int8_run):
    report = int8_run[0]
    assert report["code"] == 0
    assert report["cli"] == report["reference"] == report["loaded"]
    assert all(report["cli"]), report["cli"]
    assert report["cli"] != report["float"]  # int8 is not float under another name


def test_int8_is_measured_against_float32_and_the_cli_says_when_it_is_slower(int8_run):
    """torchao int8 products have no fast kernel on some CPUs (AVX2: ~20x slower than float32): `--quantize int8`
    measures (`int8_speedup`, once per process) and says so on stderr, then runs as asked."""
    report = int8_run[0]
    assert 0 < report["int8_speedup"] < float("inf")
    said = f"measured {report['int8_speedup']:.2f}x as fast as float32 on this CPU" in report["cli_err"]
    assert said == (report["int8_speedup"] < 1), report["cli_err"]


@pytest.mark.parametrize("speedup, said", [(0.05, True), (0.99, True), (1.0, False), (2.5, False)])
def test_a_slower_int8_is_announced_and_a_faster_one_is_not(monkeypatch, capsys, speedup, said):
    from loracaptioner import loading, quantization

    monkeypatch.setattr(quantization, "int8_speedup", lambda device: speedup)  # the measurement, injected
    loading.announce.cache_clear()
    loading.warn_if_int8_is_slow(torch.device("cpu"))
    err = capsys.readouterr().err
    assert (err == f"loracaptioner: --quantize int8: torchao int8 linear layers measured {speedup:.2f}x as fast as "
                   f"float32 on this CPU ({torch.backends.cpu.get_cpu_capability()}): this run will be slower than "
                   "without --quantize\n") if said else err == ""


def test_int8_puts_the_image_encoders_linear_layers_in_torchao_int8_and_keeps_the_decoder_in_float(int8_run):
    for kinds in (int8_run[0]["kinds"], int8_run[0]["adapter_kinds"]):
        assert all(name.startswith("encoder.") for name in kinds["int8"])
        assert {"encoder.vision_tower.encoder.layers.0.self_attn.q_proj", "encoder.bridge",
                "encoder.vision_tower.encoder.layers.1.mlp.fc2"} <= set(kinds["int8"])
        assert all(name.startswith(("decoder.", "lm_head")) for name in kinds["float"])
        assert {"decoder.block.0.layer.2.DenseReluDense.wo", "decoder.block.1.layer.1.EncDecAttention.q",
                "lm_head"} <= set(kinds["float"])


def test_int8_with_an_adapter_merges_first_then_quantizes(int8_run):
    report = int8_run[0]
    assert report["adapter"] == report["merged"]  # = from_pretrained(merged folder, quantization_config=...)
    assert report["adapter"] != report["unmerged"]  # the adapter did change the model


def test_a_saved_int8_model_loads_back_without_the_package(int8_run, torchao_path):
    report, work, paths = int8_run
    config = json.loads((work / "saved" / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "torchao"
    hub_user = work / "hub-user"
    hub_user.mkdir()
    loaded = run_python(HUB_USER, [str(work / "saved"), *paths], torchao_path, hub_user, package=False)
    assert report["saved_code"] == 0 and report["cli_saved"] == report["reference"]  # and with the CLI
    assert loaded["module"].startswith("transformers_modules.")
    assert loaded["kinds"] == report["kinds"]
    assert loaded["captions"] == report["reference"]


def test_int8_without_torchao_is_a_usage_error_that_says_what_to_install(model_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "torchao", None)  # not installed (as in this environment): import fails
    image = write_images(tmp_path)[0]
    code = main(["caption", model_dir, image, "--quantize", "int8", "--dtype", "float32", "-q"])
    err = capsys.readouterr().err
    assert code == 2
    assert err == f"loracaptioner: error: --quantize int8: int8 needs torchao: {INSTALL_HINT}\n"


def test_int8_computes_in_float32_which_dtype_auto_picks_and_other_dtypes_are_refused(model_dir, tmp_path, capsys):
    assert pick_dtype("auto", torch.device("cpu"), quantize="int8") == torch.float32
    assert capsys.readouterr().err == ""  # nothing measured, nothing announced
    image = write_images(tmp_path)[0]
    assert main(["caption", model_dir, image, "--quantize", "int8", "--dtype", "bfloat16", "-q"]) == 2
    assert capsys.readouterr().err == (
        "loracaptioner: error: --quantize int8 computes in float32: use --dtype auto or float32 with it (where "
        "--dtype bfloat16 is fast, it is faster alone)\n")
