# The two commands a newcomer needs, each working from nothing on a fresh machine:
#   make train    set up .venv and the data, then train the Fashion-MNIST default
#   make test     set up, then run ruff and the test suite
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
DATA := /usr/share/datasets/fashion-mnist
WORKDIR ?= workdir/fashion_mnist
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: setup data train sample test lint

$(VENV)/.installed: setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[test]"
	touch $@

data:
	@[ -f $(DATA)/train-images-idx3-ubyte.gz ] || { \
	  echo "Installing Fashion-MNIST (Debian package dataset-fashion-mnist)"; \
	  $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq dataset-fashion-mnist; }

setup: $(VENV)/.installed data

train: setup
	$(PY) -m cfgdiff.main --config=experiments/fashion_mnist.py --workdir=$(WORKDIR)

lint: setup
	$(PY) -m ruff check .

test: setup lint
	$(PY) -m pytest -q tests

sample: setup
	$(PY) -m cfgdiff.main --config=experiments/fashion_mnist.py --workdir=$(WORKDIR) --mode=sample
