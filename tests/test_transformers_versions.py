"""Remote-code users run the saved folder's three code files on *their* transformers. setup.cfg declares
`transformers>=5.20,<6`: load + caption + loss must hold on the oldest declared release and on the newest one.

The newest release is the one in this (main) virtual environment. The oldest gets a virtual environment of its own,
`<repo>/.venv-transformers-5.20.0`, built once and reused (a marker file says it is complete), holding what a Hub
user needs: torch, transformers, pillow, sentencepiece, safetensors, numpy -- not this package, not peft -- and the
two test runners transformers' own common tests need (pytest, parameterized).

Each runs, as a Hub user would, a folder saved here: from_pretrained(trust_remote_code=True), greedy and beam
captions, pipeline("image-text-to-text") captions, a training loss; all must match this package's own model exactly.
The oldest also runs test_transformers_common.py, i.e. transformers' common model tests of that release, against this
checkout's model.

Building it needs pip to reach a package index. Without one the test fails; set LORACAPTIONER_ALLOW_SKIP_VERSIONS=1
to skip it instead (never in CI, which must run it).
"""

import functools
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import transformers

REPO = Path(__file__).resolve().parents[1]
OLDEST = "5.20.0"  # the lower bound of `transformers>=5.20,<6` in setup.cfg
NEWEST = transformers.__version__  # the main venv has the newest release
VERSIONS = list(dict.fromkeys([OLDEST, NEWEST]))
TORCH_REQUIREMENT = "torch==2.13.0"  # first and pinned: a bare `torch` would pull a multi-GB CUDA build
USER_PACKAGES = ["pillow", "sentencepiece", "safetensors", "numpy"]
TEST_PACKAGES = ["pytest", "parameterized"]  # for test_transformers_common.py
MARKER = ".loracaptioner-venv-complete"
ALLOW_SKIP = os.environ.get("LORACAPTIONER_ALLOW_SKIP_VERSIONS") == "1"
LABEL_CAPTIONS = ["a red circle on the left", "the big dog with a tree"]

HUB_USER = textwrap.dedent(
    """
    import sys
    # A Hub user does not have the package (the main venv has it, editable): every import of it must fail, so only
    # the folder's own code files can serve.
    sys.modules["loracaptioner"] = None
    import glob, json, os, warnings
    warnings.simplefilter("default")  # show DeprecationWarning / FutureWarning from every module (the test rejects them)
    try:
        import loracaptioner
        sys.exit("loracaptioner must not be importable here")
    except ImportError:
        pass
    import numpy as np, torch, transformers
    from PIL import Image
    from safetensors.torch import load_file
    from transformers import AutoModelForImageTextToText, AutoProcessor, pipeline

    folder, label_captions = sys.argv[1], json.loads(sys.argv[2])
    model = AutoModelForImageTextToText.from_pretrained(folder, trust_remote_code=True).eval()
    processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
    rng = np.random.default_rng(0)  # the first two of conftest's `images`
    images = [Image.fromarray(rng.integers(0, 255, (40, 60, 3), dtype=np.uint8)),
              Image.fromarray(rng.integers(0, 255, (90, 30, 3), dtype=np.uint8))]
    inputs = processor(images=images, return_tensors="pt")
    with torch.no_grad():
        greedy = processor.batch_decode(model.generate(**inputs), skip_special_tokens=True)
        beam = processor.batch_decode(model.generate(**inputs, num_beams=3), skip_special_tokens=True)
        labels = processor(text_target=label_captions)["labels"]
        loss = model(pixel_values=inputs["pixel_values"], labels=labels).loss.item()
    captioner = pipeline("image-text-to-text", model=folder, trust_remote_code=True)
    piped = [captioner(images=image, text="")[0]["generated_text"] for image in images]

    saved = {}
    for path in sorted(glob.glob(os.path.join(folder, "*.safetensors"))):
        saved.update(load_file(path))
    state = model.state_dict()
    weight_diff = {
        name: (tensor.detach().float() - saved[name].float()).abs().max().item()
        if tensor.shape == saved[name].shape else float("inf")
        for name, tensor in state.items() if name in saved
    }
    print(json.dumps({
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "module": type(model).__module__,
        "greedy": greedy,
        "beam": beam,
        "pipeline": piped,
        "loss": loss,
        "weight_max_abs_diff": weight_diff,
        "not_in_file": sorted(set(state) - set(saved)),
        "not_in_model": sorted(set(saved) - set(state)),
    }))
    """
)


def _run(cmd: list[str], **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, **kwargs)


def _clean_env(**updates) -> dict[str, str]:
    # PYTHONDONTWRITEBYTECODE goes too: the old venv is installed without byte-compiling (see _build_venv), so its
    # first run writes the .pyc files of the modules it imports, and later runs reuse them (15 s -> 7 s of imports).
    dropped = ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "PYTHONDONTWRITEBYTECODE")
    env = {k: v for k, v in os.environ.items() if k not in dropped}
    env.update(updates)
    return env


def _build_venv(version: str) -> Path:
    """`<repo>/.venv-transformers-<version>` with a Hub user's packages (+ test runners); built once, rebuilt if
    incomplete."""
    venv = REPO / f".venv-transformers-{version}"
    python = venv / "bin" / "python"
    requirements = [TORCH_REQUIREMENT, f"transformers=={version}", *USER_PACKAGES, *TEST_PACKAGES]
    marker = venv / MARKER
    if marker.is_file() and python.exists() and marker.read_text() == json.dumps(requirements):
        return python
    shutil.rmtree(venv, ignore_errors=True)  # incomplete or built for other requirements
    env = _clean_env(PIP_DISABLE_PIP_VERSION_CHECK="1")
    # Byte-compiling all of torch and transformers takes longer than compiling, on first import, the part we use.
    pip_install = [str(python), "-m", "pip", "install", "-q", "--no-compile"]
    steps = [
        [sys.executable, "-m", "venv", str(venv)],
        [*pip_install, TORCH_REQUIREMENT],  # first, pinned (see TORCH_REQUIREMENT)
        [*pip_install, *requirements],
    ]
    for step in steps:
        result = _run(step, env=env, cwd=REPO, timeout=900)
        if result.returncode != 0:
            reason = (
                f"cannot build the transformers=={version} environment (`{' '.join(step[1:])}` exited "
                f"{result.returncode}; no package index reachable?):\n{result.stdout[-2000:]}{result.stderr[-3000:]}"
            )
            if ALLOW_SKIP:
                pytest.skip(reason)
            pytest.fail(reason + "\nSet LORACAPTIONER_ALLOW_SKIP_VERSIONS=1 to skip instead (not in CI).")
    marker.write_text(json.dumps(requirements))
    return python


@functools.cache
def _python(version: str) -> str:
    """The python of an environment with transformers `version`: this one for the newest, else a venv of its own."""
    return sys.executable if version == NEWEST else str(_build_venv(version))


@pytest.mark.parametrize("version", VERSIONS, ids=[f"transformers-{v}" for v in VERSIONS])
def test_remote_code_loads_and_captions_on_each_supported_transformers(version, model, processor, images, tmp_path):
    python = _python(version)
    folder = tmp_path / "model"
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    work = tmp_path / "work"
    work.mkdir()
    script = work / "hub_user.py"
    script.write_text(HUB_USER)
    # One thread: a tiny model's ops are all thread start-up on a loaded 2-core CI machine (20x slower with two).
    env = _clean_env(
        HF_MODULES_CACHE=str(work / "modules"), HF_HUB_OFFLINE="1", PYTHONWARNINGS="", OMP_NUM_THREADS="1"
    )
    result = _run(
        [python, str(script), str(folder), json.dumps(LABEL_CAPTIONS)], cwd=work, env=env, timeout=300
    )
    assert result.returncode == 0, f"transformers {version}:\n{result.stderr[-6000:]}"
    assert "deprecat" not in result.stderr.lower(), f"transformers {version}:\n{result.stderr[-6000:]}"
    report = json.loads(result.stdout.strip().splitlines()[-1])

    assert report["transformers"] == version
    assert report["module"].startswith("transformers_modules."), report["module"]
    assert report["not_in_file"] == [] and report["not_in_model"] == [], report
    changed = {name: diff for name, diff in report["weight_max_abs_diff"].items() if diff != 0}
    assert not changed, f"transformers {version}: weights differ from the saved file: {changed}"

    # The reference: this package's own model, in this process (on one thread too, for speed; restored after).
    inputs = processor(images=images[:2])  # the subprocess rebuilds these two from the same seed
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.no_grad():
            greedy = processor.batch_decode(model.generate(**inputs), skip_special_tokens=True)
            beam = processor.batch_decode(model.generate(**inputs, num_beams=3), skip_special_tokens=True)
            labels = processor(text_target=LABEL_CAPTIONS)["labels"]
            loss = model(pixel_values=inputs["pixel_values"], labels=labels).loss
    finally:
        torch.set_num_threads(threads)
    assert all(greedy) and all(beam), (greedy, beam)  # a real comparison, not of empty captions
    assert report["greedy"] == greedy, f"transformers {version}"
    assert report["beam"] == beam, f"transformers {version}"
    assert abs(report["loss"] - loss.item()) <= 1e-5, (report["loss"], loss.item())
    assert report["pipeline"] == greedy, f"transformers {version}: pipeline('image-text-to-text') != generate()"


@pytest.mark.skipif(OLDEST == NEWEST, reason="the main venv has the oldest version")
def test_old_environment_is_a_bare_hub_user(tmp_path):
    """Only a Hub user's packages: not this package (the subprocess could not import it anyway), not peft."""
    probe = (
        "import importlib.util, json; "
        "print(json.dumps({m: importlib.util.find_spec(m) is not None for m in ('loracaptioner', 'peft')}))"
    )
    result = _run([_python(OLDEST), "-c", probe], cwd=tmp_path, env=_clean_env(), timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads(result.stdout) == {"loracaptioner": False, "peft": False}


@pytest.mark.skipif(OLDEST == NEWEST, reason="the main venv has the oldest version and runs the common tests")
def test_transformers_common_tests_pass_on_the_oldest_transformers():
    """transformers' own common model tests, from the oldest release's sdist, pass in its environment too."""
    command = [_python(OLDEST), "-m", "pytest", "-q", "tests/test_transformers_common.py"]
    result = _run(command, cwd=REPO, env=_clean_env(HF_HUB_OFFLINE="1"), timeout=900)
    summary = result.stdout.strip().splitlines()[-1] if result.stdout.strip() else ""
    assert result.returncode == 0 and " passed" in summary, f"{result.stdout[-8000:]}\n{result.stderr[-3000:]}"
    print(f"transformers {OLDEST}: {summary}")
