# Two entry points for users: `make up` (the local stack) and `make test`.
# Both create the virtual environment and the model cache on first use and are
# no-ops for parts already done.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
PKGS   := -e 'shared[prepare,local]' -e services/drafter -e services/verifier \
          -e services/kvoffload -e services/scheduler -e bench

.PHONY: venv models system-packages up test lint bench clean

$(STAMP): requirements/lock.txt requirements/dev.txt shared/pyproject.toml services/*/pyproject.toml \
          bench/pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch first and pinned: an unpinned resolve would pull a multi-GB CUDA build.
	$(BIN)/python -m pip install -q -c requirements/lock.txt torch==2.13.0
	$(BIN)/python -m pip install -q -c requirements/lock.txt $(PKGS) -r requirements/dev.txt
	touch $(STAMP)

venv: $(STAMP)

models: venv
	$(BIN)/sled models prepare

# Debian's prometheus for the tests that run a real Prometheus server against the
# stack (as root when it is missing; the package's own service is stopped).
system-packages:
	.ci/system-packages

up: models
	$(BIN)/sled up

lint: venv
	$(BIN)/ruff check .

test: models lint system-packages
	$(BIN)/python -m pytest -q

bench: models
	$(BIN)/python -m sled_bench.report

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
