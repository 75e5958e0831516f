# Two commands do all set-up on a fresh machine:
#   make demo   -> creates .venv, installs sd_lora, trains the demo LoRA into out/demo
#   make test   -> creates .venv, installs sd_lora with test tools, runs the test suite
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: demo test install clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

demo: install
	$(PY) -m sd_lora.demo

test: install
	$(PY) -m pytest -q $(PYTEST_ARGS)

clean:
	rm -rf out .pytest_cache
