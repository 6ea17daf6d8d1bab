# Two commands on a fresh machine: `make demo` and `make test`.
# Each creates .venv when it is missing: the CPU build of torch first, then the project with its dev
# extras at the versions in constraints.txt (what `make test` last passed with; `make constraints`
# rewrites it from .venv).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.qfl-installed
TORCH  := torch==2.13.0
# PyPI's Linux torch is the multi-GB CUDA build; PyTorch's own CPU index has the CPU build for every OS.
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu

.PHONY: demo test test-deploy lint install constraints clean fuzz bench-codecs bench-qkd bench-kms bench-secagg bench-quantum \
	experiment-compression experiment-compression-100x experiment-key-budget experiment-quantum-mixed experiment-quantum-mixed-quick \
	experiment-streamsplit

# torch: a CPU build the configured indexes already offer (`+cpu`: never the CUDA one; a local wheel
# here, a mirror, a pip cache), else the CPU build from PyTorch's CPU index.
$(STAMP): pyproject.toml constraints.txt
	@echo "setup: .venv with the CPU build of torch and qfl's dependencies (a few minutes, about 2.2 GB) ..."
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet "$(TORCH)+cpu" 2>/dev/null \
		|| $(BIN)/python -m pip install --quiet --index-url $(TORCH_CPU_INDEX) "$(TORCH)"
	$(BIN)/python -m pip install --quiet -c constraints.txt -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

# constraints.txt from the installed .venv (qfl itself left out; torch without its local +cpu label,
# so that the same line holds for the CPU build on Linux and the only build on macOS).
constraints:
	echo "# Exact versions \`make\` installs (pip -c): rewrite with \`make constraints\` after changing dependencies." > constraints.txt
	$(BIN)/python -m pip freeze --exclude-editable | grep -v '^qfl[= ]' | sed 's/+cpu$$//' >> constraints.txt

# Prints each step with its rough duration (times: a 2-core machine; Ray's start-up grows with load).
demo: $(STAMP)
	@echo "demo: 20 rounds, 10 clients, masked sums over simulated QKD keys (1-2 minutes on an idle 2-core machine, several on a busy one: Ray starts in 10-60 s, round 1 also starts the clients, then seconds a round)"
	$(BIN)/qfl run
	@echo "demo: done; the run directory (runs/<timestamp>/) holds report.md, metrics.csv, run.log and the plots"

# ruff over the sources (config in pyproject.toml), then mypy over the package
# as installed (`-p qfl` from the repo root follows the qfl/<folder> symlinks).
lint: $(STAMP)
	$(BIN)/ruff check --quiet .
	$(BIN)/mypy -p qfl --no-error-summary

# Two workers (pytest-xdist, loadgroup): a file's tests stay together on one worker, and the loopback deployments
# share one worker (tests/conftest.py), so at most one deployment and one other test run at a time; the
# deployments go first, the longest piece of work. pytest < 9.2 keeps the groups (tests/test_scheduling.py).
test: $(STAMP) lint
	$(BIN)/python -m pytest -q -n 2 --dist loadgroup --no-loadscope-reorder

# The loopback deployments alone (SuperLink, KMS and edge daemons as processes; also part of `make test`).
test-deploy: $(STAMP)
	$(BIN)/python -m pytest -q -m deployment tests/test_deployment.py tests/test_edge_daemon.py tests/test_deploy_faults.py tests/test_edge_resume.py

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

# The two-way arms against fp32: the README's 100× figure and its plot (the 60-round frontier of every codec: README).
# ~17 min: fp32 against the shipped two-way setting (compression-100x.toml) and the same without
# DGC's options, 5 seeds × 60 rounds
experiment-compression-100x: $(STAMP)
	$(BIN)/qfl experiment compression --seeds 5 --rounds 60 --out runs/experiment-compression-100x \
		--arm fp32 --arm 'stc-3%+down-stc-3%' --arm 'stc-3%+dgc+down-stc-3%'

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
