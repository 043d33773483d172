# Two contracts, both from a fresh clone with nothing installed:
#   make train   create .venv, install mpinn, train on the bundled digits data on 2 MPI ranks
#   make test    create .venv, install mpinn with test extras, run the whole suite
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
RANKS  ?= 2
STAMP  := $(VENV)/.installed

.PHONY: train test install clean bench-pipeline

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

bench-pipeline: $(STAMP)
	$(BIN)/python benchmarks/pipeline_bubble.py

clean:
	rm -rf $(VENV) runs .pytest_cache
