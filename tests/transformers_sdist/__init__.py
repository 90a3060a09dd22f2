"""transformers' own common tests, taken from the PyPI source distribution of the *installed* transformers.

`load()` downloads `transformers-<version>.tar.gz` once (pip, from the package index), keeps only
tests/test_modeling_common.py and tests/test_configuration_common.py under `<repo>/.cache/transformers-tests/<version>/`
(gitignored) and imports them as the package `transformers_tests`. Nothing of transformers' test code is in this
repository: the sdist is the test dependency.

The sdist lacks three modules those two files import (tests/generation/, tests/exporters/, tests/utils/); `stand_ins/`
holds one small stand-in for each of those imports, and nothing else.
"""

import importlib
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path
from types import ModuleType

import transformers

CACHE = Path(__file__).resolve().parents[2] / ".cache" / "transformers-tests"
PACKAGE = "transformers_tests"
FILES = ("test_modeling_common.py", "test_configuration_common.py")
STAND_INS = Path(__file__).resolve().parent / "stand_ins"


def _fetch(version: str) -> Path:
    """`<cache>/<version>`, holding the package `transformers_tests` with the sdist's two common-test files."""
    root = CACHE / version
    if all((root / PACKAGE / name).is_file() for name in FILES):
        return root
    CACHE.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=CACHE) as download:
        command = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:",
                   f"transformers=={version}", "-d", download]
        result = subprocess.run(command, capture_output=True, text=True, timeout=600,
                                env={**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"})
        if result.returncode != 0:
            raise RuntimeError(f"`{' '.join(command[1:])}` failed (no package index?):\n{result.stderr[-3000:]}")
        staged = Path(download) / "staged"
        (staged / PACKAGE).mkdir(parents=True)
        (staged / PACKAGE / "__init__.py").write_text("")
        with tarfile.open(Path(download) / f"transformers-{version}.tar.gz") as sdist:
            for name in FILES:
                (staged / PACKAGE / name).write_bytes(sdist.extractfile(f"transformers-{version}/tests/{name}").read())
        shutil.rmtree(root, ignore_errors=True)  # an incomplete one
        os.replace(staged, root)  # all files or none, should a run be interrupted
    return root


def load() -> tuple[ModuleType, ModuleType]:
    """transformers' `test_modeling_common` and `test_configuration_common` modules, of the installed version."""
    sys.path.insert(0, str(_fetch(transformers.__version__)))
    package = importlib.import_module(PACKAGE)
    package.__path__.append(str(STAND_INS))  # `.generation`, `.exporters`, `.utils` resolve to the stand-ins
    return (
        importlib.import_module(f"{PACKAGE}.test_modeling_common"),
        importlib.import_module(f"{PACKAGE}.test_configuration_common"),
    )
