# `make run`: set up on first use, then the federated demo. `make test`: set up, then every test.
VENV ?= .venv
PY := $(VENV)/bin/python
# The optional extras to install beside Photon: CI adds eval (the evaluation harness) so its tests run.
EXTRAS ?= dev
comma := ,
STAMP := $(VENV)/.installed-$(subst $(comma),-,$(EXTRAS))

.PHONY: run test setup clean gpu-check

$(STAMP): pyproject.toml
	@echo "setting up $(VENV): Photon and its pinned dependencies (about 2 GB, a few minutes on first use)"
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -e '.[$(EXTRAS)]'
	touch $(STAMP)

setup: $(STAMP)

run: $(STAMP)
	$(VENV)/bin/photon run

test: $(STAMP)
	$(VENV)/bin/python -m pytest -q

# On a machine with a CUDA GPU: the trainer benchmark on the GPU at the paper's 125M shape, then the tests marked
# `gpu` (and only those); see scripts/gpu-check, which also runs without this venv: PYTHON=python3.
gpu-check: $(STAMP)
	PYTHON=$(PY) scripts/gpu-check

clean:
	rm -rf $(VENV) data runs
