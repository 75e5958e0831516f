# Two commands do all set-up on a fresh machine:
#   make demo   -> creates .venv, installs sd_lora, trains the demo LoRA into out/demo and measures it
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

# The main command with no --model: the built-in demo base and its tuned options (a few minutes on 2 CPU cores).
demo: install
	$(PY) -m sd_lora.train --data datasets/chars --output-dir out/demo
	$(PY) -m sd_lora.demo.evaluate out/demo/chars.safetensors --grid out/demo/evaluation.png
	$(PY) -m sd_lora.demo.figure out/demo out/demo/progression.png

test: install
	$(PY) -m pytest -q $(PYTEST_ARGS)

clean:
	rm -rf out .pytest_cache
