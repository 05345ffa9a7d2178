# The two commands a fresh machine needs (see README): `make run` and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
TSTAMP := $(VENV)/.installed-test
DSTAMP := $(VENV)/.installed-deploy-lint

.PHONY: run test lint lint-deploy unit install install-test install-deploy-lint servers \
        container-tools clean test-faults soak reliability-report

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e .
	touch $@

$(TSTAMP): $(STAMP)
	$(BIN)/pip install -q -e '.[test]'
	touch $@

install: $(STAMP)

install-test: $(TSTAMP)

$(DSTAMP): $(STAMP)
	$(BIN)/pip install -q -e '.[deploy-lint]'
	touch $@

install-deploy-lint: $(DSTAMP)

## Start the service on its embedded defaults (SQLite, in-process bus, built-in worker).
run: install
	$(BIN)/enginedge serve

servers: install-test
	./scripts/ensure-test-servers.sh $(BIN)/pip

lint: install-test
	$(BIN)/ruff check src tests
	$(BIN)/mypy

## Offline checks of the Dockerfile, compose file, Kubernetes manifests and Helm chart.
lint-deploy: install-deploy-lint
	VENV_BIN=$(BIN) ./scripts/lint-deploy.sh

## tini, the image's init, for tests/deploy/test_container_like.py (as root, via apt-get).
container-tools:
	./scripts/ensure-tini.sh

unit: install-test
	$(BIN)/pytest tests/unit -q

## Install everything, then lint, type-check and run the whole suite against real servers.
test: servers container-tools lint lint-deploy
	$(BIN)/pytest -q

## The fault, bad-input and load suite alone (also part of `make test`, which runs all of
## tests/); its figures go to artifacts/reliability/. See docs/reliability.md.
test-faults: servers
	$(BIN)/pytest tests/faults -q

## The full 10-minute soak (CI runs it for 60 s inside the fault suite).
soak: servers
	SOAK_SECONDS=600 $(BIN)/pytest tests/faults/test_soak.py -q

## Rewrite the tables of docs/reliability.md from artifacts/reliability/*.json.
reliability-report:
	$(BIN)/python scripts/reliability_report.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis build dist
