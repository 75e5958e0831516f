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

# One pytest worker per core (at most 4): most tests run small models whose steps don't use a second thread
# well, and the end-to-end runs wait on subprocesses. On 2 cores: 11 min 18 s against 23 min 02 s in one process.
test: install
	$(PY) -m pytest -q -n auto --maxprocesses 4 --durations 10 $(PYTEST_ARGS)

clean:
	rm -rf out .pytest_cache
