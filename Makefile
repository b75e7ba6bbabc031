# Everything a fresh machine needs: `make test` and `make demo` set themselves up.
PYTHON ?= python3
VENV ?= .venv
VLLM_VENV ?= .venv-vllm
BIN := $(VENV)/bin
MODELS := .e2e/models

.PHONY: help venv install install-dev lint test unit process e2e e2e-env models demo bench faults clean

help:
	@echo "make test     lint + unit + process + real-vLLM end-to-end tests (E2E=0 skips e2e outside CI)"
	@echo "make demo     a real vLLM server and the sidecar following a config, step by step"
	@echo "make lint     ruff, hadolint, kubernetes-validate"
	@echo "make bench    benchmark table (bench/results/latest.json)"
	@echo "make faults   fault matrix table"
	@echo "make clean    remove venvs, models and caches"

# The project venv: runtime pins plus test and lint tools.
$(BIN)/.installed: requirements.txt requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -r requirements-dev.txt
	touch $@

venv install install-dev: $(BIN)/.installed

lint: $(BIN)/.installed
	$(BIN)/ruff check .
	VENV=$(VENV) bash .ci/validate-manifests

unit: $(BIN)/.installed
	$(BIN)/python -m pytest -q test_sidecar.py

process: $(BIN)/.installed
	$(BIN)/python -m pytest -q tests

# The real vLLM server lives in its own venv (3.4 GB); both steps are cached.
e2e-env:
	@if [ "$(E2E)" = "0" ] && [ "$(CI)" != "true" ]; then echo "E2E=0: not building the vLLM environment"; \
	else bash e2e/setup_vllm.sh && $(VLLM_VENV)/bin/python e2e/build_model.py; fi

models: e2e-env

e2e: $(BIN)/.installed e2e-env
	$(BIN)/python -m pytest -q e2e

test: lint e2e-env
	$(BIN)/python -m pytest test_sidecar.py tests e2e

demo: $(BIN)/.installed
	@E2E=1 $(MAKE) --no-print-directory e2e-env
	$(BIN)/python demo/demo.py

bench: $(BIN)/.installed
	$(BIN)/python bench/bench.py

faults: $(BIN)/.installed
	$(BIN)/python tests/faults.py

clean:
	rm -rf $(VENV) $(VLLM_VENV) .e2e .pytest_cache .ruff_cache .hypothesis bench/results
	find . -name __pycache__ -prune -exec rm -rf {} +
