# Two commands on a fresh machine; each creates .venv (with every extra and the test tools) on first use
# and again whenever pyproject.toml changes.
#   make demo   the main job: the CPU-scale protocol on scikit-learn's digits, offline (runs/demo/report.md)
#   make test   ruff check, ruff format --check, then the whole test suite

PYTHON ?= python3
VENV ?= .venv
STAMP := $(VENV)/.mmtard-installed
DEMO_OUT ?= runs/demo

.PHONY: demo test lint install

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q -e ".[all,test]"
	touch $(STAMP)

demo: $(STAMP)
	HF_HUB_OFFLINE=1 $(VENV)/bin/mmtard demo --out $(DEMO_OUT)

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

test: lint
	HF_HUB_OFFLINE=1 $(VENV)/bin/python -m pytest -q
