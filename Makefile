# Two contracts, both from a fresh clone with nothing installed:
#   make train   create .venv, install mpinn, train on the bundled digits data on 2 MPI ranks
#                (into runs/digits, replacing the previous make train's run there)
#   make test    create .venv, install mpinn with the test extras, run the whole suite
#   (make test-fast: the unit tier only, for the inner loop)
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
RANKS  ?= 2
STAMP  := $(VENV)/.installed       # mpinn + MPICH: all that make train needs
TESTED := $(VENV)/.installed-test  # + the test extras (PyTorch, onnxruntime, ...: make test, lint)

.PHONY: train test test-fast test-mutants lint format install clean bench bench-pipeline two-nodes \
	two-nodes-check

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(STAMP): $(BIN)/python setup.cfg pyproject.toml
	$(BIN)/python -m pip install --quiet -e '.[mpich]'
	touch $@

$(TESTED): $(STAMP)
	$(BIN)/python -m pip install --quiet -e '.[mpich,test]'
	touch $@

install: $(STAMP)

train: $(STAMP)
	$(BIN)/mpiexec -n $(RANKS) -bind-to core $(BIN)/python -m mpinn train --run-dir runs/digits --overwrite

# two pytest-xdist workers, each running whole files (module fixtures run once): while one waits
# (Slurm, a shaped link, pip, a signal's grace) or runs one process, the other uses the second
# core. 8:40 instead of 10:48 on a 2-core Zen 3 (docs/testing.md).
TEST_WORKERS ?= 2
test: $(TESTED)
	$(BIN)/python -m pytest -q -rs -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder

# the unit tier for the inner loop: no mpiexec launch, no Slurm or namespaces (under a minute)
test-fast: $(TESTED)
	MPINN_TEST_TIER=unit MPINN_TEST_NUMBA_CACHE=$(VENV)/numba-cache \
	  $(BIN)/python -m pytest -q -m "not system" -n $(TEST_WORKERS) --dist loadfile

# ruff's linter (rules in pyproject.toml): CI runs it before the suite
lint: $(TESTED)
	$(BIN)/ruff check mpinn tests benchmarks

# ruff's formatter, on request, for the files named (FILES=...): the code keeps its hand-aligned
# continuation lines, which a wholesale reformat would replace
format: $(TESTED)
	@test -n "$(FILES)" || { echo "make format FILES='a.py b.py'"; exit 2; }
	$(BIN)/ruff format $(FILES)

# one-line bugs of real risk, one at a time in a scratch copy: every one must make its tests fail
test-mutants: $(TESTED)
	$(BIN)/python tests/mutants.py

# mpinn vs JAX and PyTorch 2.13 CPU (the bench extra, installed if missing), side by side: ~20
# minutes. The BLAS override some machines set (OPENBLAS_CORETYPE, OPENBLAS_L2_SIZE) is lifted for
# this command only; the results name the kernel that ran. JAX at 2 ranks needs mpi4jax (see
# docs/performance.md for its build).
bench: $(STAMP)
	$(BIN)/python -c "import torch, jax" 2>/dev/null || $(BIN)/python -m pip install --quiet -e '.[bench]'
	env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE $(BIN)/python benchmarks/suite.py

# a command across two "nodes" (network namespaces joined by a link of RATE; root only), e.g.
# make two-nodes ARGS="--rate 1gbit --ranks 2 --per-node 1 -- python -m mpinn bench --steps 20"
two-nodes: $(TESTED)
	$(BIN)/python tests/twonodes/run.py $(ARGS)

# the scaling model against two nodes at 1 and 2 Gbit/s (a few minutes; exit 1 on a miss > 15%)
two-nodes-check: $(TESTED)
	env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE $(BIN)/python tests/twonodes/check.py $(ARGS)

bench-pipeline: $(TESTED)
	$(BIN)/python benchmarks/pipeline_bubble.py

clean:
	rm -rf $(VENV) runs .pytest_cache
