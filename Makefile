# Quick start: `make demo` pretrains on the bundled Fashion-MNIST subset; `make test` runs the suite.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: venv demo test lint format bench bench-gpu clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

venv: $(VENV)/.installed

# No thread or precision flag: train.py uses every core and picks bf16 only where the CPU runs it natively.
demo: venv
	$(VENV)/bin/accelerate launch --num_processes 1 --num_machines 1 --dynamo_backend no \
		train.py --resume_from_checkpoint latest

lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: venv
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

test: lint
	$(PY) -m pytest -q tests

bench: venv
	$(PY) bench/loss.py
	$(PY) bench/train_step.py
	$(PY) bench/train_step.py --check_trajectory
	$(PY) bench/pipeline.py
	$(PY) bench/scaling.py
	$(PY) bench/end_to_end.py
	$(PY) bench/small_folder.py --dataset fashion4k
	$(PY) bench/small_folder.py --dataset textures

bench-gpu: venv
	$(PY) bench/gpu.py

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
