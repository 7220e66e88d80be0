# Two commands do everything on a fresh machine:  `make demo`  and  `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
DEMO   ?= outputs/demo
SEEDS  ?= 0,1,2
DEMO_EXPERIMENTS ?= digits/ce,digits/kd,digits/gendd
DEMO_JOBS ?= 3

export HF_HUB_OFFLINE := 1
export WANDB_MODE ?= offline

.PHONY: install demo test lint format clean

install: $(STAMP)

# torch==2.14.1 / torchvision==0.29.1 are pinned in setup.cfg (served from the local package mirror).
$(STAMP): setup.cfg pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[dev,tensorboard,wandb]"
	touch $(STAMP)

## Teacher (trained once, then cached) + every demo method x 3 seeds on digits, then the results table.
## Jobs run three at a time through Hydra's joblib launcher, one thread each: the three GenDD seeds share
## the 2 cores in one round instead of two rounds (results do not depend on it: one thread per job).
demo: install
	rm -rf $(DEMO)
	$(BIN)/gendd-train experiment=digits/ce trainer.epochs=1 hydra.run.dir=$(DEMO)/_teacher >/dev/null
	OMP_NUM_THREADS=1 $(BIN)/gendd-train -m experiment=$(DEMO_EXPERIMENTS) seed=$(SEEDS) \
		trainer.progress=false hydra/launcher=joblib hydra.launcher.n_jobs=$(DEMO_JOBS) hydra.sweep.dir=$(DEMO)/runs
	@echo; echo "Digits test accuracy (%), mean ± std over seeds $(SEEDS):"
	$(BIN)/gendd-report $(DEMO)/runs

test: install
	$(BIN)/python -m pytest -q -n 2

lint: install
	$(BIN)/ruff check src tests registry benchmarks examples
	$(BIN)/ruff format --check src tests registry benchmarks

format: install
	$(BIN)/ruff format src tests registry benchmarks
	$(BIN)/ruff check --fix src tests registry benchmarks

clean:
	rm -rf outputs multirun .cache .pytest_cache .ruff_cache
