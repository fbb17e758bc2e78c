# The two commands a newcomer needs, each working from nothing on a fresh machine:
#   make run      set up .venv and the data, train the Fashion-MNIST default, sweep w
#   make test     set up with the test extras, then run ruff and the test suite
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
DATA := /usr/share/datasets/fashion-mnist
WORKDIR ?= workdir/fashion_mnist
# More flags for train, sweep and sample, e.g. ARGS='--config.train.num_steps=1000'.
ARGS ?=
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
comma := ,

CONFIG := experiments/fashion_mnist.py
TABLE1 ?= workdir/table1
CLI := $(PY) -m cfgdiff.main --config=$(CONFIG)

REFERENCE_WORKDIR ?= workdir/reference

.PHONY: setup setup-test data jemalloc train sample sweep run table1 table1-reference compare reference test lint rehearse accel

# The JAX build: detected (nvidia-smi lists a GPU: cuda13 where the driver runs CUDA 13,
# else cuda12; a TPU VM's chips on PCI: tpu; otherwise cpu), or ACCEL=cpu|cuda12|cuda13|tpu.
# A value this machine cannot run stops here, before anything is written
# (cfgdiff/backend.py, which runs on any python3). PCI_DEVICES: for the tests' stand-ins.
PCI_DEVICES ?= /sys/bus/pci/devices
ACCEL_CHOICE := $(shell $(PYTHON) cfgdiff/backend.py --pci-devices=$(PCI_DEVICES) choose $(ACCEL))
ifeq ($(ACCEL_CHOICE),)
$(error $(PYTHON) could not run cfgdiff/backend.py to choose the JAX build; set PYTHON=python3.11 or similar)
else ifeq ($(firstword $(ACCEL_CHOICE)),error:)
$(error $(wordlist 2,1000,$(ACCEL_CHOICE)))
endif
override ACCEL := $(ACCEL_CHOICE)
# CPU keeps the marker it always had; an accelerator build has its own, so switching
# builds reinstalls (leaving the CPU build takes the accelerator plugins out again).
INSTALLED := $(VENV)/.installed$(if $(filter-out cpu,$(ACCEL)),-$(ACCEL))
ACCEL_MARKERS := $(VENV)/.installed-cuda12 $(VENV)/.installed-cuda13 $(VENV)/.installed-tpu
ACCEL_PLUGINS := jax-cuda12-plugin jax-cuda12-pjrt jax-cuda13-plugin jax-cuda13-pjrt libtpu

# The main job installs only what it imports (cfgdiff[train]: training's writers, and the
# JAX build for the accelerator); the tests add pytest, ruff and PyTorch (the parity tests
# and benchmarks/ compare against it), about 5 GB more.
$(INSTALLED): setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(if $(filter cpu,$(ACCEL)),[ -z "$$(ls $(ACCEL_MARKERS) 2>/dev/null)" ] || \
	  $(PY) -m pip uninstall --quiet -y $(ACCEL_PLUGINS))
	$(PY) -m pip install --quiet -e ".[train$(if $(filter-out cpu,$(ACCEL)),$(comma)$(ACCEL))]"
	rm -f $(VENV)/.installed $(ACCEL_MARKERS)
	touch $@

# What `make` chose, and why.
accel:
	@echo "ACCEL=$(ACCEL): $$($(PYTHON) cfgdiff/backend.py --pci-devices=$(PCI_DEVICES) describe)"

$(VENV)/.installed-test: $(INSTALLED)
	$(PY) -m pip install --quiet -e ".[test,fid]"
	touch $@

data:
	@[ -f $(DATA)/train-images-idx3-ubyte.gz ] || { \
	  echo "Installing Fashion-MNIST (Debian package dataset-fashion-mnist)"; \
	  $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq dataset-fashion-mnist; }

# jemalloc, which cfgdiff.main preloads on CPU hosts (training 1.1-1.3x faster,
# cfgdiff/allocator.py). Optional: without apt the job runs on the C library's malloc, and
# after a failed install (offline, no sudo) later runs do not try again until the marker
# (in .venv, so a new venv tries again) is removed.
JEMALLOC_FAILED := $(VENV)/.jemalloc-install-failed
jemalloc:
	@{ ldconfig -p || /sbin/ldconfig -p; } 2>/dev/null | grep -q libjemalloc.so.2 || ! command -v apt-get >/dev/null || \
	  { [ -f "$(JEMALLOC_FAILED)" ] && echo "jemalloc: not installed, not tried again (rm $(JEMALLOC_FAILED) to retry)"; } || { \
	  echo "Installing jemalloc (Debian package libjemalloc2)"; \
	  { $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq libjemalloc2; } || \
	  { mkdir -p "$(VENV)" && touch "$(JEMALLOC_FAILED)"; \
	    echo "jemalloc not installed: CPU training will run on the C library's malloc"; }; }

setup: $(INSTALLED) data jemalloc

setup-test: $(VENV)/.installed-test data jemalloc

train: setup
	$(CLI) --workdir=$(WORKDIR) $(ARGS)

sweep: setup
	$(CLI) --workdir=$(WORKDIR) --mode=sweep $(ARGS)

# The main job: train the default, then FID/score/precision/recall over w; prints the table.
run: train sweep

# The paper's Table 1 at CPU scale: p_uncond 0.1, 0.2, 0.5, then w from 0 to 4.
TABLE1_P_UNCOND := 0.1 0.2 0.5
TABLE1_WEIGHTS := "(0.0,0.1,0.3,0.5,1.0,2.0,4.0)"
table1: setup
	for p in $(TABLE1_P_UNCOND); do \
	  $(CLI) --workdir=$(TABLE1)/p_uncond_$$p --config.diffusion.p_uncond=$$p || exit 1; \
	done
	$(CLI) --workdir=$(TABLE1) --mode=sweep --config.sweep.guidance_weights=$(TABLE1_WEIGHTS)

# Table 1 at reference quality: each p_uncond trained like the shipped reference model
# (128k images, 40-60 min each on a 2-core Zen 3), then `make table1`'s grid of w with 500
# samples per cell (about 2.5 min each). Resumes where it stopped. p_uncond = 0.2 is
# `make reference`'s training (the same config and command): its run is copied in if present.
TABLE1_REFERENCE ?= workdir/table1_ref
table1-reference: setup
	@if [ -d $(REFERENCE_WORKDIR)/checkpoints ] && [ ! -e $(TABLE1_REFERENCE)/p_uncond_0.2 ]; then \
	  echo "p_uncond 0.2: copying make reference's run from $(REFERENCE_WORKDIR)"; \
	  mkdir -p $(TABLE1_REFERENCE)/p_uncond_0.2 && \
	  cp -r $(REFERENCE_WORKDIR)/checkpoints $(REFERENCE_WORKDIR)/config.json \
	    $(TABLE1_REFERENCE)/p_uncond_0.2/; fi
	for p in $(TABLE1_P_UNCOND); do \
	  $(PY) -m cfgdiff.main --config=experiments/fashion_mnist_reference.py \
	    --workdir=$(TABLE1_REFERENCE)/p_uncond_$$p --config.diffusion.p_uncond=$$p || exit 1; \
	done
	$(CLI) --workdir=$(TABLE1_REFERENCE) --mode=sweep --config.sweep.num_samples=500 \
	  --config.sweep.guidance_weights=$(TABLE1_WEIGHTS)

# The paper's claim checked on the shipped reference model: classifier-free guidance,
# classifier guidance (a noisy classifier trained here, about 7 min on a 2-core Zen 3) and
# autoguidance (by a quarter-width network trained 1,000 steps by the same command), swept
# on the same seeds with errors into $(COMPARE)/reference/sweep/. Resumes where it stopped.
COMPARE ?= workdir/compare
COMPARE_FLAGS := --config.sweep.methods="('cfg','classifier','auto')" \
  --config.sweep.classifier_weights="(0.0,0.3,1.0,2.0,4.0,8.0)" \
  --config.sweep.auto_weights="(0.0,0.3,1.0,2.0,4.0)" \
  --config.sample.classifier_workdir=$(COMPARE)/classifier \
  --config.sample.weak_workdir=$(COMPARE)/weak
compare: setup
	[ -d $(COMPARE)/reference/checkpoints ] || \
	  $(PY) -m cfgdiff.reference --name=fashion_mnist --unpack_to=$(COMPARE)/reference
	$(PY) -m cfgdiff.main --config=experiments/fashion_mnist_reference.py \
	  --workdir=$(COMPARE)/classifier --mode=train_classifier
	$(PY) -m cfgdiff.main --config=experiments/fashion_mnist_reference.py \
	  --workdir=$(COMPARE)/weak --config.model.ch=16 --config.model.head_channels=16 \
	  --config.train.num_steps=1000
	$(PY) -m cfgdiff.main --config=experiments/fashion_mnist_reference.py \
	  --workdir=$(COMPARE)/reference --mode=sweep $(COMPARE_FLAGS)

# The shipped reference model (cfgdiff/reference_models/fashion_mnist): the default network
# trained on 128k images (resumes when restarted), exported with its manifest, then swept.
reference: setup
	$(PY) -m cfgdiff.main --config=experiments/fashion_mnist_reference.py \
	  --workdir=$(REFERENCE_WORKDIR)
	$(PY) -m cfgdiff.reference --workdir=$(REFERENCE_WORKDIR) --name=fashion_mnist \
	  --command="make reference (python -m cfgdiff.main --config=experiments/fashion_mnist_reference.py --workdir=$(REFERENCE_WORKDIR))"
	$(CLI) --workdir=$(REFERENCE_WORKDIR) --mode=sweep --config.sweep.num_samples=500

lint: setup-test
	$(PY) -m ruff check .

# Two workers, one module each at a time, longest first (tests/conftest.py): most tests
# wait on one compile, which uses one core.
test: setup-test lint
	$(PY) -m cfgdiff.allocator $(PY) -m pytest -q --durations=25 -n 2 --dist loadfile \
	  --no-loadscope-reorder tests

sample: setup
	$(CLI) --workdir=$(WORKDIR) --mode=sample $(ARGS)

# The ImageNet pod and SLURM path end to end on this CPU, with stand-in gcloud/srun
# (tests/test_rehearsal.py); prints the rehearsal's log. Part of `make test` too.
rehearse: setup-test
	$(PY) -m pytest -m rehearsal -s -q -p no:cacheprovider tests/test_rehearsal.py
