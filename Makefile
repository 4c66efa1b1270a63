# Two entry points do all the set-up on a fresh machine: `make serve` and `make test` (README.md).
# Both are idempotent: a second run only re-installs when pyproject.toml or setup.py changed.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.dsv4-installed
PIP_FLAGS ?= --progress-bar off --quiet
SERVE_ARGS ?=
PYTEST_ARGS ?=

.PHONY: serve test test-unit lint install system-deps cluster-binaries demo-cluster

$(STAMP): pyproject.toml setup.py
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@echo "pip: installing dsv4 and its pinned dependencies into $(VENV) (torch is large; pip caches it)"
	$(BIN)/pip install $(PIP_FLAGS) -e '.[test]'
	@touch $@

install: $(STAMP)

system-deps:
	@scripts/apt-install.sh redis-server openssl

serve: install
	$(BIN)/dsv4 serve $(SERVE_ARGS)

# mypy and lint-imports cannot follow the editable install's import hook, so they read the folders through a farm of
# links that spells the installed names (dsv4/<folder> -> <folder>). lint-imports checks the layer contracts of
# pyproject.toml ([tool.importlinter]).
lint: install
	$(BIN)/ruff check .
	@mkdir -p build/mypy/dsv4 && for d in kernels model_runtime protocol services operator; do ln -sfn ../../../$$d build/mypy/dsv4/$$d; done
	MYPYPATH=build/mypy $(BIN)/mypy -p dsv4.kernels -p dsv4.model_runtime -p dsv4.protocol -p dsv4.services -p dsv4.operator
	PYTHONPATH=build/mypy $(BIN)/lint-imports --no-cache

# The real Kubernetes control plane for the cluster tests, built from pinned Go modules into
# ${DSV4_K8S_CACHE:-~/.cache/dsv4/k8s}; seconds when cached, long on a cold machine (README.md, docs/cluster.md).
cluster-binaries:
	tests/cluster/build.sh

test: install system-deps lint cluster-binaries
	$(BIN)/pytest $(PYTEST_ARGS)

test-unit: install
	$(BIN)/pytest -m unit $(PYTEST_ARGS)

# The examples on a local control plane with simulated NVIDIA/Ascend/CPU nodes: chart, operator, `kubectl get dsv4`.
demo-cluster: install cluster-binaries
	$(BIN)/python examples/demo_cluster.py $(DEMO_ARGS)
