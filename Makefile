# `make demo` and `make test` set everything up from a fresh clone (see README).
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.bissl_det-installed
# The torch build served on this platform; other machines may pin their own (README, Install).
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1

.PHONY: install test test-quick lint format demo bench gpu-check study clean

install: $(STAMP)

$(STAMP): setup.py pyproject.toml tools/install_detectron2.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade "pip" "setuptools<82" wheel
	$(PY) -m pip install -q $(TORCH_SPEC)
	$(PY) tools/install_detectron2.py
	$(PY) -m pip install -q --no-build-isolation -e ".[dev]"
	touch $(STAMP)

lint: install
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/ruff check .

format: install
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

# The whole suite (CI): lint, unit tests, tools as processes, gloo process groups, slow runs; one
# pytest worker per core (tests/conftest.py shares the cores' threads out among them).
test: lint
	$(PY) -m pytest -q -n auto --dist worksteal

# The edit loop: tests in this process only (no tools as processes, no process groups, no long
# runs); under 3 minutes on 2 cores.
test-quick: install
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -n auto --dist worksteal -m "not slow and not dist and not e2e and not gpu"

demo: install
	$(PY) tools/run_demo.py

bench: install
	$(PY) -m benchmarks.bench_bilevel

# GPU tests, one full-size stage and both benchmarks on CUDA (< 8 min); a dry run without CUDA.
gpu-check: install
	$(PY) -m benchmarks.gpu_check

# The CPU reference study (docs/studies.md): Fashion-MNIST from Debian's dataset-fashion-mnist
# (installed when missing and apt-get is there), converted to folders, then tools/study.py.
FMNIST_SOURCE ?= /usr/share/datasets/fashion-mnist
study: install
	test -f $(FMNIST_SOURCE)/train-images-idx3-ubyte.gz || \
		(apt-get update && apt-get install -y dataset-fashion-mnist)
	test -d datasets/fashion_mnist || \
		$(PY) datasets/get_fashion_mnist.py --source $(FMNIST_SOURCE)
	$(PY) tools/study.py --config-file configs/study/fashion_mnist.yaml --jobs 2

clean:
	rm -rf $(VENV) output build *.egg-info
