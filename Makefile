# Two commands on a fresh machine: `make demo` (the main job, offline) and `make test`.
# Both build their own virtual environment; torch is installed first, pinned to the CPU build on disk,
# because a bare `torch` requirement pulls a multi-GB CUDA build.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH ?= torch==2.13.0

.PHONY: venv test demo space clean

venv: $(VENV)/.installed

$(VENV)/.installed: setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[test]"
	touch $@

test: venv
	$(PY) -m pytest -q

demo: venv
	$(PY) demo/run_demo.py

space: venv
	$(PY) space/app.py

clean:
	rm -rf $(VENV) outputs
