# `make run`: set up on first use, then the federated demo. `make test`: set up, then every test.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: run test setup clean gpu-check

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -e '.[dev]'
	touch $(STAMP)

setup: $(STAMP)

run: $(STAMP)
	$(VENV)/bin/photon run

test: $(STAMP)
	$(VENV)/bin/python -m pytest -q

# On a machine with a CUDA GPU: the tests marked `gpu` (and only those), then the trainer benchmark on the GPU
# at the paper's 125M shape (tokens/s and MFU against the device's bf16 peak; stored in docs/results/).
gpu-check: $(STAMP)
	$(VENV)/bin/python -m pytest -q -m gpu -rs
	$(VENV)/bin/photon bench trainer --device cuda --preset paper-125m --set train.batch_size=8 \
		--set train.micro_batch_size=8 --steps 10 --repeats 2 --settings bf16,bf16+compile

clean:
	rm -rf $(VENV) data runs
