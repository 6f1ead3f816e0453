# plasticity — every target documented in `make help`.
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
CONFIG  ?= configs/demo.yaml
PIPELINE ?= configs/pipeline/tiny.yaml
ARGS    ?=
export OMP_NUM_THREADS ?= 2
export TOKENIZERS_PARALLELISM = false

.PHONY: help install demo test test-dist test-fast lint train pipeline tensorboard slurm-train clean

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-12s %s\n", $$1, $$2}'

$(STAMP): requirements.txt setup.cfg pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q -r requirements.txt
	$(BIN)/pip install -q --no-deps --no-build-isolation -e .
	touch $(STAMP)

install: $(STAMP)  ## create .venv and install pinned requirements + this package (editable)

demo: $(STAMP)  ## pretrain a tiny GPT on the bundled corpus (CPU, a few minutes) -> runs/demo
	$(BIN)/plasticity train $(CONFIG) $(ARGS)

test: $(STAMP)  ## the whole test suite, distributed tests included (CPU)
	$(BIN)/python -m pytest tests $(ARGS)

test-fast: $(STAMP)  ## tests without the slow end-to-end and multi-process ones
	$(BIN)/python -m pytest tests -m "not slow and not dist" $(ARGS)

test-dist: $(STAMP)  ## only the multi-process DDP / DeepSpeed tests (2 CPU processes, gloo)
	$(BIN)/python -m pytest tests -m dist $(ARGS)

lint: $(STAMP)  ## byte-compile everything and check the package imports
	$(BIN)/python -m compileall -q trainer models data mitigations launch tests
	$(BIN)/python -c "import trainer.loop, trainer.cli, models.gpt, data.packing"

train: $(STAMP)  ## train CONFIG=path [ARGS="key=value ..."]
	$(BIN)/plasticity train $(CONFIG) $(ARGS)

pipeline: $(STAMP)  ## continual pretraining -> SFT -> RL on CPU (PIPELINE=configs/pipeline/tiny.yaml)
	$(BIN)/plasticity run $(PIPELINE) $(ARGS)

tensorboard: $(STAMP)  ## serve TensorBoard for runs/
	$(BIN)/tensorboard --logdir runs

slurm-train: $(STAMP)  ## print the sbatch script for CONFIG (ARGS="--nodes 2 --gpus-per-node 8 [--submit]")
	$(BIN)/plasticity slurm $(CONFIG) $(ARGS)

clean:  ## remove caches and runs (keeps .venv)
	rm -rf runs .cache .pytest_cache build *.egg-info
	find . -name __pycache__ -prune -exec rm -rf {} +
