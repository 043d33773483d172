# Two contracts, both from a fresh clone with nothing installed:
#   make train   create .venv, install mpinn, train on the bundled digits data on 2 MPI ranks
#   make test    create .venv, install mpinn with test extras, run the whole suite
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
RANKS  ?= 2
STAMP  := $(VENV)/.installed

.PHONY: train test test-mutants install clean bench bench-pipeline

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(STAMP): $(BIN)/python setup.cfg pyproject.toml
	$(BIN)/python -m pip install --quiet -e '.[mpich,test]'
	touch $@

install: $(STAMP)

train: $(STAMP)
	$(BIN)/mpiexec -n $(RANKS) $(BIN)/python -m mpinn train --run-dir runs/digits

test: $(STAMP)
	$(BIN)/python -m pytest -q

# one-line bugs of real risk, one at a time in a scratch copy: every one must make its tests fail
test-mutants: $(STAMP)
	$(BIN)/python tests/mutants.py

# mpinn vs PyTorch 2.13 CPU (installed here from PyPI if missing), side by side: ~15 minutes
bench: $(STAMP)
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python benchmarks/suite.py

bench-pipeline: $(STAMP)
	$(BIN)/python benchmarks/pipeline_bubble.py

clean:
	rm -rf $(VENV) runs .pytest_cache
