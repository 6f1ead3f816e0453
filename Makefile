# plasticity — every target documented in `make help`.
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
TEST_STAMP := $(VENV)/.installed-test
CONFIG  ?= configs/demo.yaml
PIPELINE ?= configs/pipeline/tiny.yaml
STUDY   ?= configs/study/cpu.yaml
STUDY_DIR ?= runs/study/cpu
ARGS    ?=
export OMP_NUM_THREADS ?= 2
export TOKENIZERS_PARALLELISM = false

.PHONY: help install demo test test-dist test-fast lint train pipeline study study-tiny report tensorboard \
        slurm-train slurm-study bench clean

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-12s %s\n", $$1, $$2}'

$(STAMP): requirements.txt setup.cfg pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q -r requirements.txt
	$(BIN)/pip install -q --no-deps --no-build-isolation -e .
	touch $(STAMP)

install: $(STAMP)  ## create .venv and install pinned requirements + this package (editable)

$(TEST_STAMP): $(STAMP) requirements-test.txt
	$(BIN)/python -c "import triton" 2>/dev/null || $(BIN)/pip install -q -r requirements-test.txt \
		|| echo "triton could not be installed here: the Triton kernel tests will be skipped"
	touch $(TEST_STAMP)

demo: $(STAMP)  ## pretrain a tiny GPT on the bundled corpus (CPU, a few minutes) -> runs/demo
	$(BIN)/plasticity train $(CONFIG) $(ARGS)

test: $(TEST_STAMP)  ## the whole test suite, distributed tests included (CPU)
	$(BIN)/python -m pytest tests $(ARGS)

test-fast: $(TEST_STAMP)  ## tests without the slow end-to-end and multi-process ones
	$(BIN)/python -m pytest tests -m "not slow and not dist" $(ARGS)

test-dist: $(TEST_STAMP)  ## only the multi-process DDP / DeepSpeed tests (2 CPU processes, gloo)
	$(BIN)/python -m pytest tests -m dist $(ARGS)

lint: $(STAMP)  ## byte-compile everything and check the package imports
	$(BIN)/python -m compileall -q trainer models data mitigations launch tests
	$(BIN)/python -c "import trainer.loop, trainer.cli, models.gpt, data.packing"

train: $(STAMP)  ## train CONFIG=path [ARGS="key=value ..."]
	$(BIN)/plasticity train $(CONFIG) $(ARGS)

pipeline: $(STAMP)  ## continual pretraining -> SFT -> RL on CPU (PIPELINE=configs/pipeline/tiny.yaml)
	$(BIN)/plasticity run $(PIPELINE) $(ARGS)

study: $(STAMP)  ## run the CPU scaling study (STUDY=configs/study/cpu.yaml, 2 runs at once) and its report
	$(BIN)/plasticity study run $(STUDY) --parallel 2 $(ARGS)
	$(BIN)/plasticity report $(STUDY) $(foreach w,$(filter-out -%,$(ARGS)),$(if $(findstring =,$(w)),$(w)))

study-tiny: $(STAMP)  ## 3-size smoke study + report -> runs/study/tiny/report/
	$(BIN)/plasticity study run configs/study/tiny.yaml $(ARGS)
	$(BIN)/plasticity report runs/study/tiny

report: $(STAMP)  ## Markdown + PNG report of a study dir (STUDY_DIR=runs/study/cpu)
	$(BIN)/plasticity report $(STUDY_DIR) $(ARGS)

tensorboard: $(STAMP)  ## serve TensorBoard for runs/
	$(BIN)/tensorboard --logdir runs

slurm-train: $(STAMP)  ## print the sbatch script for CONFIG (ARGS="--nodes 2 --gpus-per-node 8 [--submit]")
	$(BIN)/plasticity slurm $(CONFIG) $(ARGS)

slurm-study: $(STAMP)  ## print the Slurm array script for STUDY (ARGS="--array N --max-parallel M --gpus-per-node 1 [--submit]")
	$(BIN)/plasticity slurm $(STUDY) $(ARGS)

bench: $(STAMP)  ## CPU benchmarks -> bench/RESULTS.md (ARGS=--quick for a fast pass)
	$(BIN)/python -m bench.run_all --out bench/RESULTS.md $(ARGS)

clean:  ## remove caches and runs (keeps .venv)
	rm -rf runs .cache .pytest_cache build *.egg-info
	find . -name __pycache__ -prune -exec rm -rf {} +
