# Two commands on a fresh machine: `make demo` and `make test`.
# Each creates .venv when it is missing: torch==2.13.0 first (a CPU build
# that lies on this disk), then the project with its dev extras.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.qfl-installed

.PHONY: demo test test-deploy lint install clean fuzz bench-codecs bench-qkd bench-kms bench-secagg bench-quantum \
	experiment-compression experiment-compression-100x experiment-key-budget experiment-quantum-mixed experiment-quantum-mixed-quick \
	experiment-streamsplit

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/qfl run

# ruff over the sources (config in pyproject.toml), then mypy over the package
# as installed (`-p qfl` from the repo root follows the qfl/<folder> symlinks).
lint: $(STAMP)
	$(BIN)/ruff check --quiet .
	$(BIN)/mypy -p qfl --no-error-summary

test: $(STAMP) lint
	$(BIN)/python -m pytest -q

# The loopback deployments alone (SuperLink, KMS and edge daemons as processes; also part of `make test`).
test-deploy: $(STAMP)
	$(BIN)/python -m pytest -q -m deployment tests/test_edge_daemon.py tests/test_deploy_faults.py tests/test_edge_resume.py

# Slower work, kept out of `make test`.
# 10^5 hostile payloads against every decoder; exits 1 on any crash, hang or oversize allocation.
fuzz: $(STAMP)
	$(BIN)/python -m qfl.benchmarks.fuzz_decoders --cases 100000

bench-codecs: $(STAMP)
	$(BIN)/qfl bench codecs

bench-qkd: $(STAMP)
	$(BIN)/qfl bench qkd

bench-kms: $(STAMP)
	$(BIN)/qfl bench kms

bench-secagg: $(STAMP)
	$(BIN)/qfl bench secagg

bench-quantum: $(STAMP)
	$(BIN)/qfl bench quantum

experiment-compression: $(STAMP)
	$(BIN)/qfl experiment compression --seeds 3 --out runs/experiment-compression

# The two-way arms against fp32 (3 seeds): the README's 100× figure and its frontier plot.
experiment-compression-100x: $(STAMP)
	$(BIN)/qfl experiment compression --seeds 3 --out runs/experiment-compression-100x \
		--arm fp32 --arm 'stc-3%+ef' --arm 'stc-3%+down-stc-3%' --arm 'stc-3%+dgc+down-stc-3%'

experiment-key-budget: $(STAMP)
	$(BIN)/qfl experiment key-budget --out runs/experiment-key-budget

experiment-quantum-mixed: $(STAMP)
	$(BIN)/qfl experiment quantum-mixed --out runs/experiment-quantum-mixed

experiment-streamsplit: $(STAMP)
	$(BIN)/qfl experiment streamsplit --seeds 3 --quick --out runs/experiment-streamsplit

experiment-quantum-mixed-quick: $(STAMP)
	$(BIN)/qfl experiment quantum-mixed --quick --out runs/experiment-quantum-mixed-quick

clean:
	rm -rf $(VENV) runs .pytest_cache .hypothesis .mypy_cache .ruff_cache
