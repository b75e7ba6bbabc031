# Everything a fresh machine needs: `make test` and `make demo` set themselves up.
PYTHON ?= python3
VENV ?= .venv
VLLM_VENV ?= .venv-vllm
BIN := $(VENV)/bin
MODELS := .e2e/models
# The scripts run directly (bench, faults, demo) import the test harness the way pytest does
# (pyproject.toml's pythonpath): the repository root and tests/.
HARNESS := PYTHONPATH=$(CURDIR):$(CURDIR)/tests
BENCH_ARGS ?=
FAULTS_ARGS ?=

.PHONY: help venv install install-dev lint check check-first check-rest test unit process e2e e2e-env models demo bench faults clean prometheus-tools monitoring

help:
	@echo "make check    the edit loop, under 2 minutes: ruff, unit tests, process tests not marked slow,"
	@echo "              properties at 200 examples each"
	@echo "make test     what CI runs: lint, unit, every process test, properties at 10^4 examples each,"
	@echo "              the fault matrix, the soak, real-vLLM end-to-end tests (E2E=0 skips those outside CI)"
	@echo "make demo     a real vLLM server and the sidecar following a config, step by step"
	@echo "make lint     ruff, hadolint, kubernetes-validate, promtool check rules"
	@echo "make monitoring  alert rules (promtool check/test) and the real-Prometheus tests of monitoring/"
	@echo "make bench    benchmark table (bench/results/latest.json); BENCH_ARGS=\"--only reaction\" ..."
	@echo "make faults   fault matrix table; FAULTS_ARGS=\"--rows down,hang\" ..."
	@echo "make clean    remove venvs, models and caches"

# The project venv: runtime pins plus test and lint tools.
$(BIN)/.installed: requirements.txt requirements-s3.txt requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -r requirements-dev.txt
	touch $@

venv install install-dev: $(BIN)/.installed

# prometheus + promtool from Debian's `prometheus` package (needs root, as in CI); nothing if
# both are already on PATH or in /usr/bin.
prometheus-tools:
	bash monitoring/install-prometheus.sh

lint: $(BIN)/.installed prometheus-tools
	$(BIN)/ruff check .
	VENV=$(VENV) bash .ci/validate-manifests
	$(BIN)/python monitoring/build.py --check
	promtool check rules monitoring/rules.yaml

monitoring: $(BIN)/.installed prometheus-tools
	promtool check rules monitoring/rules.yaml
	promtool test rules monitoring/alerts_test.yaml
	$(BIN)/python -m pytest -q tests/test_monitoring.py

# The quick tier. Tests marked slow (pyproject.toml) wait out slow loads, long windows, the fault
# matrix and the soak; the properties run HYPOTHESIS_PROFILE=dev (200 examples instead of 10^4).
# The tests run as two pytest processes side by side (about a minute each; most of the time the
# process tests wait on the sidecars they start): the unit, property and config tests with the
# hardening, security and fault checks, and every other file of tests/.
CHECK_PYTEST := HYPOTHESIS_PROFILE=dev $(BIN)/python -m pytest -q -p no:cacheprovider -m "not slow"
CHECK_FIRST := test_sidecar.py tests/test_properties.py tests/test_manifests.py tests/test_hardening.py \
	tests/test_security.py tests/test_faults.py tests/test_drift.py tests/test_rollouts.py

check: $(BIN)/.installed
	$(BIN)/ruff check .
	@$(MAKE) --no-print-directory -j2 --output-sync=target check-first check-rest

check-first:
	$(CHECK_PYTEST) $(CHECK_FIRST)

check-rest:
	$(CHECK_PYTEST) tests $(addprefix --ignore=,$(filter tests/%,$(CHECK_FIRST)))

unit: $(BIN)/.installed
	$(BIN)/python -m pytest -q test_sidecar.py

process: $(BIN)/.installed prometheus-tools
	$(BIN)/python -m pytest -q tests

# The real vLLM server lives in its own venv (3.4 GB); both steps are cached.
e2e-env:
	@if [ "$(E2E)" = "0" ] && [ "$(CI)" != "true" ]; then echo "E2E=0: not building the vLLM environment"; \
	else bash e2e/setup_vllm.sh && $(VLLM_VENV)/bin/python e2e/build_model.py; fi

models: e2e-env

e2e: $(BIN)/.installed e2e-env
	$(BIN)/python -m pytest -q e2e

test: lint e2e-env
	promtool test rules monitoring/alerts_test.yaml
	$(BIN)/python -m pytest test_sidecar.py tests e2e

demo: $(BIN)/.installed
	@E2E=1 $(MAKE) --no-print-directory e2e-env
	$(HARNESS) $(BIN)/python demo/demo.py

bench: $(BIN)/.installed
	$(HARNESS) $(BIN)/python bench/bench.py $(BENCH_ARGS)

faults: $(BIN)/.installed
	$(HARNESS) $(BIN)/python tests/faults.py $(FAULTS_ARGS)

clean:
	rm -rf $(VENV) $(VLLM_VENV) .e2e .pytest_cache .ruff_cache .hypothesis bench/results
	find . -name __pycache__ -prune -exec rm -rf {} +
